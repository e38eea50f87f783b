"""`python -m jaxlm.evaluate`: eval loss, perplexity and bits per byte of a checkpoint.

    python -m jaxlm.evaluate --workdir DIR [--step N] [--split NAME] [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxlm import tasks
from jaxlm.errors import cli
from jaxlm.train import evaluate
from jaxlm.workdir import open_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval",
                        help="held-out split (default) or the training split")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.eval_batches=0 for the whole split")
    return parser.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    run, ckpt = open_run(args.workdir, args.overrides)
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, args.step)
    task = tasks.task_class(run.config)
    rows = task.rows(run.config, task.load_splits(run.config), run.tokenizer)[args.split]
    metrics = evaluate(run, params, rows)
    if args.json:
        print(json.dumps({"step": step, "split": args.split, **metrics}))
    else:
        print(f"step {step} {args.split}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"evaluated in {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
