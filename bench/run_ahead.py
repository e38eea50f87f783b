"""How long a SIGTERM takes to become a saved checkpoint and an exit, and the training
throughput, for one or more checkouts of jaxlm side by side (e.g. before and after a change).

    python bench/run_ahead.py [--code DIR ...] [--log-every N ...] [--repeats R] [--measure WHAT ...]

For every checkout (default: this one) and every `train.log_every`, a run on the built-in corpus
with steps made slow enough to matter on a CPU (a 4-layer, width-256 GPT, batch 32 x 256) is
sent SIGTERM a fixed time after training starts; the script prints the seconds from the signal
to the process's exit and the step it stopped at. Then it measures tokens/s of the default run
(`configs/gpt_tiny.yaml`, 150 steps) and of `gpt2_small` shapes at batch 8 x 128 (12 steps),
from the train log (first logged interval, which includes compilation, left out). Checkouts
alternate, so a noisy machine affects them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOW = ["model.num_layers=4", "model.embed_dim=256", "data.seq_len=256", "train.batch_size=32",
        "train.steps=100000", "train.eval_every=100000", "checkpoint.every=100000"]
THROUGHPUT = {  # name -> arguments of a run whose tokens/s is measured (each checkout its own presets)
    "default": ["--config", "configs/gpt_tiny.yaml", "train.steps=150", "train.log_every=25",
                "train.eval_every=100000"],  # 32 x 128
    "gpt2_small": ["--config", "configs/gpt2_small.yaml", "train.batch_size=8", "data.seq_len=128",
                   "model.dtype=float32", "mesh.data=1", "train.steps=12", "train.log_every=2",
                   "train.eval_every=100000", "train.eval_batches=1", "optim.warmup_steps=2",
                   "checkpoint.every=100000"],
}


def env_for(code: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(code))
    env.pop("XLA_FLAGS", None)
    return env


def signal_to_exit(code: Path, log_every: int, after_s: float, workdir: Path) -> tuple[float, int]:
    """(seconds from SIGTERM to exit, step saved) of one run."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.train", "--workdir", str(workdir), *SLOW,
                             f"train.log_every={log_every}"], env=env_for(code), cwd=code,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("training ") and " parameters for " in line:  # not "training a ... BPE"
            break
    time.sleep(after_s)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait()
    took = time.time() - start
    if "stopped at step " not in err:
        raise SystemExit(f"{code}: the run did not stop cleanly:\n{err[-2000:]}")
    return took, int(err.split("stopped at step ")[1].split(";")[0])


def tokens_per_s(code: Path, args: list[str], workdir: Path) -> float:
    """Median logged tokens/s of a run, without its first interval (compilation)."""
    subprocess.run([sys.executable, "-m", "jaxlm.train", "--workdir", str(workdir), *args], env=env_for(code),
                   cwd=code, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logged if r["kind"] == "train"][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", action="append", type=Path, help="a jaxlm checkout (repeatable)")
    parser.add_argument("--log-every", action="append", type=int, help="train.log_every values (repeatable)")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of training before the signal")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--measure", action="append", choices=["signal", *THROUGHPUT],
                        help="what to measure (repeatable; default: everything)")
    args = parser.parse_args()
    codes = [c.resolve() for c in (args.code or [ROOT])]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("JAXLM_CACHE", str(Path(tmp) / "cache"))
        runs = 0

        def workdir() -> Path:
            nonlocal runs
            runs += 1
            return Path(tmp) / f"run{runs}"

        measure = args.measure or ["signal", *THROUGHPUT]
        for log_every in (args.log_every or [10, 50]) if "signal" in measure else []:
            for _ in range(args.repeats):
                for code in codes:
                    took, step = signal_to_exit(code, log_every, args.after, workdir())
                    print(f"signal to exit  log_every={log_every:<5} {code.name:<12} {took:6.1f} s "
                          f"(stopped at step {step})", flush=True)
        for name, run_args in THROUGHPUT.items():
            if name not in measure:
                continue
            for _ in range(args.repeats):
                for code in codes:
                    rate = tokens_per_s(code, run_args, workdir())
                    print(f"tokens/s        {name:<12} {code.name:<12} {rate:8,.0f}", flush=True)


if __name__ == "__main__":
    main()
