#!/usr/bin/env bash
# Runs `python -m jaxlm.train` on every worker of a Cloud TPU VM slice at once, through
# `gcloud compute tpus tpu-vm ssh --worker=all`; the workers find each other by themselves.
set -euo pipefail

usage() {
  cat <<'TEXT'
usage: launch/tpu_vm.sh [--dry-run] [--zone ZONE] [--project PROJECT] [--repo DIR] [--env K=V]...
                        TPU_NAME [train args...]

Starts one training process on every worker of the TPU VM slice TPU_NAME. Each worker runs
  cd DIR && JAXLM_DISTRIBUTED=auto python -m jaxlm.train [train args...]
where DIR (--repo, default: jaxlm) is a checkout of this repository with jaxlm installed, on every
worker. JAX detects the slice's coordinator, process count and process id itself; process 0
writes the logs. Use a --workdir every worker can reach (a gs:// bucket mounted with gcsfuse, or
a shared disk) so checkpoints are written together and resume on any slice size.

--zone and --project are passed to gcloud (default: gcloud's configured ones). --env K=V adds an
environment variable on every worker (repeatable). --dry-run prints the gcloud command instead of
running it. Set PYTHON to choose the interpreter on the workers (default: python).

example: launch/tpu_vm.sh --zone us-central2-b my-v4-32 --config configs/gpt2_small.yaml \
           --workdir /mnt/runs/gpt2 mesh.fsdp=-1 mesh.data=1 model.dtype=bfloat16
TEXT
}

dry_run=0
repo=jaxlm
gcloud_args=()
env_vars=("JAXLM_DISTRIBUTED=auto")
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --zone) gcloud_args+=("--zone=$2"); shift 2 ;;
    --project) gcloud_args+=("--project=$2"); shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --env) env_vars+=("$2"); shift 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 || $1 == -* ]]; then
  usage >&2
  exit 2
fi
tpu=$1
shift

# the remote command line, each argument quoted for the workers' shell
remote="cd $(printf '%q' "$repo") && env"
for var in "${env_vars[@]}"; do
  remote+=" $(printf '%q' "$var")"
done
remote+=" $(printf '%q' "${PYTHON:-python}") -m jaxlm.train"
for arg in "$@"; do
  remote+=" $(printf '%q' "$arg")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all --command="$remote")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
