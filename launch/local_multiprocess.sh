#!/usr/bin/env bash
# Starts N `python -m jaxlm.train` processes on this machine, joined through jax.distributed
# (gloo collectives on CPU): a real multi-process run without a cluster.
set -euo pipefail

usage() {
  cat <<'TEXT'
usage: launch/local_multiprocess.sh [--dry-run] [--port PORT] [--devices-per-process D] [--grace S]
                                   N [train args...]

Runs N training processes on localhost; process 0 coordinates on PORT (default 12355) and writes
the logs. Train args are passed to `python -m jaxlm.train` unchanged (use the same --workdir for
all). --devices-per-process D gives each CPU process D fake devices. --dry-run prints the
commands instead of running them. Set PYTHON to choose the interpreter.

If one process fails, or on Ctrl-C / SIGTERM, the others get SIGTERM (they save a checkpoint and
stop) and, if still running after S seconds (--grace, default 60), SIGKILL: a process waiting
in a collective for a dead peer never finishes on its own.

example: launch/local_multiprocess.sh 2 --workdir runs/mp train.steps=20
TEXT
}

dry_run=0
port=12355
devices=""
grace=60
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --port) port=$2; shift 2 ;;
    --devices-per-process) devices=$2; shift 2 ;;
    --grace) grace=$2; shift 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  usage >&2
  exit 2
fi
count=$1
shift

pids=()
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  for ((waited = 0; waited < grace; waited++)); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0  # all gone (kill -0 fails only if none is left)
    sleep 1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < count; i++)); do
  vars=("JAXLM_COORDINATOR=localhost:$port" "JAXLM_NUM_PROCESSES=$count" "JAXLM_PROCESS_ID=$i")
  if [[ -n $devices ]]; then
    vars+=("XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
  fi
  if ((dry_run)); then
    printf '%q ' env "${vars[@]}" "${PYTHON:-python}" -m jaxlm.train "$@"
    echo
    continue
  fi
  env "${vars[@]}" "${PYTHON:-python}" -m jaxlm.train "$@" &
  pids+=($!)
done
((dry_run)) && exit 0

# the first process to fail stops the others (they would wait for it until the timeout)
status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    stop_all
  fi
done
exit $status
