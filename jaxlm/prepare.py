"""`python -m jaxlm.prepare`: tokenize a run's data once, before training.

    python -m jaxlm.prepare [--config FILE] [--workdir DIR] [key=value ...]

Takes the same arguments as `python -m jaxlm.train`: it trains (or loads) the tokenizer and
builds the task's train and eval data in the data cache (`data.cache_dir`, else $JAXLM_CACHE,
else ~/.cache/jaxlm), where `train` with the same arguments finds them. Language-model text
becomes a sharded token store, tokenized by `data.prepare_workers` processes; a killed
preparation resumes where it stopped. `train` runs the same preparation itself when the data
is missing; preparing first keeps that work off the accelerators' clock. With --workdir the
tokenizer is also saved there, as `train` would.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from jaxlm import config as config_lib
from jaxlm.errors import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.prepare", description=__doc__.split("\n\n")[0],
                                     epilog="example:\n  python -m jaxlm.prepare --config configs/gpt2_small.yaml "
                                            "data.source=text 'data.paths=[corpus/*.txt]'",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: built-in gpt_tiny)")
    parser.add_argument("--workdir", help="the run directory `train` will use (keeps its tokenizer)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def describe(name: str, rows) -> str:
    """A line about a split's prepared data (a line per source of a mixture)."""
    from jaxlm.data.pipeline import parts_of
    lines = []
    for label, part in parts_of(rows).items():
        what, store = f"{name} {label}".strip(), getattr(part, "store", None)  # rows of a token store
        about = (f"{store.tokens:,} tokens in {store.documents:,} documents, {len(store.offsets) - 1} shard(s) "
                 f"of {store.dtype.name} in {store.directory}; " if store is not None else "")
        lines.append(f"{what}: {about}{len(part):,} rows of {part.seq_len} tokens")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    # imported here: tokenizing worker processes import this module, and need none of it
    from jaxlm import tasks
    from jaxlm.train import task_data
    from jaxlm.workdir import inherit_model

    args = parse_args(argv)
    config = config_lib.load(args.config, args.overrides)
    config = tasks.task_class(config).resolve(inherit_model(config))
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        _, rows = task_data(config, Path(args.workdir) if args.workdir else Path(scratch))
    for name, split in rows.items():
        print(describe(name, split))
    print(f"prepared in {time.time() - start:,.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
