"""LoRA against full fine-tuning on `configs/sft_tiny.yaml`: held-out loss, optimizer state, step time.

    python bench/sft_lora.py [--out DIR] [--base-steps N] [key=value ...]

Pretrains the default small decoder (`configs/gpt_tiny.yaml`) on the built-in corpus (once;
reused from `--out`), then fine-tunes it
twice on the Debian package descriptions, with `sft_tiny.yaml`'s LoRA adapters and with every
weight (`model.lora_rank=0`, at a tenth of the learning rate, as full fine-tuning wants), and
prints one row each: held-out loss before and after, optimizer-state bytes, training tokens/s.
`key=value` arguments apply to both fine-tuning runs. Run it from the repository root (the
preset names `../shared/data`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
BASE = ["train.log_every=100", "train.eval_every=100000", "checkpoint.every=100000"]  # gpt_tiny's shapes
RUNS = {"LoRA (rank 8)": [], "full": ["model.lora_rank=0", "optim.learning_rate=1e-4"]}


def records(workdir: Path, kind: str) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def optimizer_bytes(workdir: Path) -> int:
    from jaxlm.workdir import open_run
    run, _ = open_run(workdir)
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(run.compiled.abstract_state.opt_state))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/sft_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory of the runs (default: a temporary one)")
    parser.add_argument("--base-steps", type=int, default=600, help="pretraining steps of the base decoder")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="jaxlm-sft-lora-"))
    base = out / "base"

    def train(workdir: Path, *extra: str) -> None:
        subprocess.run([sys.executable, "-m", "jaxlm.train", "--workdir", str(workdir), *extra], check=True, cwd=ROOT)

    if not (base / "checkpoints").is_dir():
        train(base, *BASE, f"train.steps={args.base_steps}")
    print("| run | held-out loss at step 0 | held-out loss after | optimizer state | train tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, extra in RUNS.items():
        workdir = out / name.split()[0].lower()
        common = ["--config", "configs/sft_tiny.yaml", f"init.from_workdir={base}", *extra, *args.overrides]
        train(workdir / "start", *common, "train.steps=1", "optim.learning_rate=1e-30", "optim.warmup_steps=0",
              "train.eval_every=1")  # the held-out loss the base model starts from
        train(workdir, *common)
        start, evals, trained = records(workdir / "start", "eval"), records(workdir, "eval"), records(workdir, "train")
        speed = [r["tokens_per_s"] for step, r in sorted(trained.items())[1:]]  # the first interval compiles
        print(f"| {name} | {start[1]['loss']:.3f} | {evals[max(evals)]['loss']:.3f} | "
              f"{optimizer_bytes(workdir) / 2**20:.2f} MiB | {sum(speed) / len(speed):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
