"""Fault injection: a training run killed again and again ends where an uninterrupted one does.

    python bench/faults.py [--cycles N] [--seed S] [--damage P] [--out DIR] [key=value ...]

Trains a small GPT on the built-in corpus twice: once without interruption (the reference) and
once in N cycles of start, SIGKILL at a random moment, restart. Each kill lands at one of:
  startup  a random time after launch (imports, data, compilation, restore)
  step     a random time after a random number of further steps
  save     the moment a checkpoint's temporary directory appears (the middle of an async save)
With `--damage P`, after a kill the newest checkpoint is damaged (a byte of its parameters
flipped, or a file truncated) with probability P, so the restart must find that out and resume
from the one before it.

The last run goes to the end. Then every logged training loss and gradient norm and every
final parameter must equal the reference's bit for bit; the script prints one row per cycle
(what was killed when, the step it resumed from) and exits 1 if anything differs.
`key=value` arguments override the run's config (e.g. `train.steps=200`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MOMENTS = ("startup", "step", "save")
RUN = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=4", "data.seq_len=64", "model.max_len=64",
       "train.batch_size=16", "train.log_every=1", "train.eval_every=1000000", "checkpoint.every=3",
       "checkpoint.keep=2", "optim.warmup_steps=5"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/faults.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="kills before the run is let finish (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--damage", type=float, default=0.0, metavar="P",
                        help="probability of damaging the newest checkpoint after a kill (default 0)")
    parser.add_argument("--moments", help="kill moments to cycle through in order, e.g. save,step "
                                          "(default: a random one of startup, step, save each cycle)")
    parser.add_argument("--out", help="directory for the two runs (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of the run")
    args = parser.parse_args(argv)
    if args.cycles < 1 or not 0 <= args.damage <= 1:
        parser.error("--cycles must be >= 1 and --damage within [0, 1]")
    args.moments = args.moments.split(",") if args.moments else []
    if not set(args.moments) <= set(MOMENTS):
        parser.error(f"--moments: each one of {', '.join(MOMENTS)}")
    return args


def train_records(workdir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) of the run's train log."""
    path, out = workdir / "metrics.jsonl", {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short
                continue
            if record["kind"] == "train":
                out[record["step"]] = (record["loss"], record["grad_norm"])
    return out


def start(workdir: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxlm.train", "--workdir", str(workdir), *overrides],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=os.environ.copy())


def unfinished_saves(workdir: Path) -> set[str]:
    """The temporary directories of checkpoints being written (or left by a kill)."""
    return {p.name for p in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*")}


def kill_at(proc: subprocess.Popen, workdir: Path, moment: str, rng: random.Random, before: set[str]) -> bool:
    """Waits for `moment`, then SIGKILLs `proc`; False if the run ended first. `before`: the
    unfinished saves an earlier kill left (the run removes them when it starts)."""
    deadline = time.time() + 600
    if moment == "startup":
        until = time.time() + rng.uniform(0.5, 8.0)
        while time.time() < until and proc.poll() is None:
            time.sleep(0.01)
    elif moment == "step":
        target = max([0, *train_records(workdir)]) + rng.randint(1, 6)
        while proc.poll() is None and time.time() < deadline and max([0, *train_records(workdir)]) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
    else:  # "save": the first moment a checkpoint is being written
        while proc.poll() is None and time.time() < deadline and not unfinished_saves(workdir) - before:
            time.sleep(0.001)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def damage(workdir: Path, rng: random.Random) -> str:
    """Damages the newest complete checkpoint; says how."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    if len(steps) < 2:  # keep one to fall back to: this harness checks recovery, not loss
        return ""
    data = max((workdir / "checkpoints" / str(steps[-1]) / "params" / "d").iterdir(), key=lambda p: p.stat().st_size)
    blob = bytearray(data.read_bytes())
    if rng.random() < 0.5:
        blob[len(blob) // 2] ^= 0xFF
        how = "flipped a byte"
    else:
        blob = blob[: len(blob) // 3]
        how = "truncated a file"
    data.write_bytes(bytes(blob))
    return f"{how} of checkpoint {steps[-1]}"


def resumed_from(log: Path) -> str:
    text = log.read_text()
    return text.split("resumed from step ")[1].split()[0] if "resumed from step " in text else "-"


def final_params(workdir: Path) -> list[np.ndarray]:
    import jax

    from jaxlm.workdir import open_run
    run, ckpt = open_run(workdir)
    params, _ = ckpt.restore_params(run.compiled.abstract_state.params)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="jaxlm-faults-"))
    overrides = RUN + [f"train.steps={6 * args.cycles + 12}", *args.overrides]
    print(f"reference run in {out / 'reference'}", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "jaxlm.train", "--workdir", str(out / "reference"), *overrides],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1

    workdir, rows = out / "faulted", []
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'cycle':>5}  {'killed at':<9} {'last step':>9}  {'mid-save':<8}  {'resumed from':>12}  damage")
    cycle = 0
    while True:
        cycle += 1
        log = out / f"cycle-{cycle}.log"
        left = unfinished_saves(workdir)
        proc = start(workdir, overrides, log)
        if cycle > args.cycles:  # the last run goes to the end
            code = proc.wait()
            if code != 0:
                print(log.read_text()[-3000:], file=sys.stderr)
                return 1
            print(f"{cycle:>5}  {'(none)':<9} {max(train_records(workdir)):>9}  {'':<8}  {resumed_from(log):>12}")
            break
        moment = args.moments[(cycle - 1) % len(args.moments)] if args.moments else rng.choice(MOMENTS)
        if not kill_at(proc, workdir, moment, rng, left):
            print(log.read_text()[-3000:], file=sys.stderr)
            print(f"the run ended (exit {proc.returncode}) before its kill; give it more train.steps", file=sys.stderr)
            return 1
        mid_save = bool(unfinished_saves(workdir) - left)
        hurt = damage(workdir, rng) if rng.random() < args.damage else ""
        rows.append((cycle, moment, max([0, *train_records(workdir)]), mid_save, resumed_from(log), hurt))
        print(f"{cycle:>5}  {moment:<9} {rows[-1][2]:>9}  {'yes' if mid_save else 'no':<8}  {rows[-1][4]:>12}  {hurt}",
              flush=True)

    want, got = train_records(out / "reference"), train_records(workdir)
    different = [s for s in want if got.get(s) != want[s]]
    same_params = all(np.array_equal(a, b) for a, b in zip(final_params(out / "reference"), final_params(workdir)))
    kills = {m: sum(r[1] == m for r in rows) for m in MOMENTS}
    print(f"{args.cycles} kills ({', '.join(f'{n} at {m}' for m, n in kills.items())}; "
          f"{sum(r[3] for r in rows)} left a save unfinished, {sum(bool(r[5]) for r in rows)} damaged a checkpoint): "
          f"{len(want) - len(different)}/{len(want)} logged steps equal the uninterrupted run's bit for bit, "
          f"final parameters {'equal' if same_params else 'DIFFERENT'}")
    if different:
        print(f"steps that differ: {different[:20]}", file=sys.stderr)
    return 0 if not different and same_params and len(got) == len(want) else 1


if __name__ == "__main__":
    sys.exit(main())
