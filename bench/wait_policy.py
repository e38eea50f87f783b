"""Step time of one compiled train step driven with different run-ahead bounds, in one process.

    python bench/wait_policy.py [--config FILE] [--rounds 8] [--steps 3] [key=value ...]

Builds the run of a config (default: `gpt2_small` shapes at batch 8 x 128, float32, one device)
and drives its compiled step in blocks of `--steps` steps, each block with one policy: wait for
step N-1 after dispatching step N (one ahead, what `jaxlm.train` does), wait for step N-2 (two
ahead), or wait for every step before dispatching the next (none ahead). The policies take
turns in a shuffled order every round, so a noisy machine affects them alike; the script prints
each block's seconds a step and, per policy, the median and the fastest block.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxlm import config as config_lib  # noqa: E402
from jaxlm.train import open_data, prepare  # noqa: E402

POLICIES = {"one ahead": 1, "two ahead": 2, "none ahead": 0}
SHAPES = ["train.batch_size=8", "data.seq_len=128", "model.dtype=float32", "mesh.data=1", "train.steps=100000",
          "optim.warmup_steps=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/gpt2_small.yaml"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps a block")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = config_lib.load(args.config, [*SHAPES, *args.overrides])
    with tempfile.TemporaryDirectory() as workdir:
        run, rows = prepare(config, Path(workdir))
        c = run.compiled
        state, data, rng = c.init_state(0), open_data(run, rows["train"], None), jax.random.key(0)
        times: dict[str, list[float]] = {p: [] for p in POLICIES}
        order = list(POLICIES)
        with c.context():
            for _ in range(2):  # compile and warm up
                state, metrics = c.train_step(state, c.put_batch(next(data)), rng)
            jax.block_until_ready(metrics)
            for block in range(args.rounds):
                random.Random(block).shuffle(order)
                for policy in order:
                    inflight, start = [], time.perf_counter()
                    for _ in range(args.steps):
                        state, metrics = c.train_step(state, c.put_batch(next(data)), rng)
                        inflight.append(metrics)
                        while len(inflight) > POLICIES[policy]:
                            jax.block_until_ready(inflight.pop(0))
                    jax.block_until_ready(inflight)
                    times[policy].append((time.perf_counter() - start) / args.steps)
                    print(f"round {block}: {policy:<10} {times[policy][-1]:.3f} s/step", flush=True)
        for policy, values in times.items():
            print(f"{policy:<10} median {statistics.median(values):.3f} s/step, fastest block {min(values):.3f}")


if __name__ == "__main__":
    main()
