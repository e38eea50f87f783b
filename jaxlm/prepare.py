"""`python -m jaxlm.prepare`: tokenize a run's data once, before training.

    python -m jaxlm.prepare [--config FILE] [--workdir DIR] [--runner RUNNER [--option=value ...]] [key=value ...]

Takes the same arguments as `python -m jaxlm.train`: it trains (or loads) the tokenizer and
builds the task's train and eval data in the data cache (`data.cache_dir`, else $JAXLM_CACHE,
else ~/.cache/jaxlm), where `train` with the same arguments finds them. Language-model text
becomes a sharded token store, tokenized by `data.prepare_workers` processes; a killed
preparation resumes where it stopped. `train` runs the same preparation itself when the data
is missing; preparing first keeps that work off the accelerators' clock. With --workdir the
tokenizer is also saved there, as `train` would. With --runner the stores are built by an Apache
Beam pipeline on that runner (`pip install -e ".[beam]"`), given the runner's own options as
--option=value; it writes the same stores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from jaxlm import config as config_lib
from jaxlm.errors import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.prepare", description=__doc__.split("\n\n")[0],
                                     epilog="examples:\n  python -m jaxlm.prepare --config configs/gpt2_small.yaml "
                                            "data.source=text 'data.paths=[corpus/*.txt]'\n"
                                            "  python -m jaxlm.prepare --config configs/gpt2_small.yaml data.source=text "
                                            "'data.paths=[corpus/*.txt]' --runner DirectRunner --direct_num_workers=8",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: built-in gpt_tiny)")
    parser.add_argument("--workdir", help="the run directory `train` will use (keeps its tokenizer)")
    parser.add_argument("--runner", help="build with Apache Beam on this runner (DirectRunner, DataflowRunner, "
                                         "SparkRunner, FlinkRunner, PortableRunner); the runner's options follow "
                                         "as --option=value (sets data.prepare_runner and data.beam_options)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args, beam_options = parser.parse_known_args(argv)
    if beam_options and not args.runner:
        parser.error(f"unrecognized arguments: {' '.join(beam_options)} (runner options need --runner)")
    args.beam_options = beam_options
    return args


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
    if args.runner:
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, prepare_runner=args.runner, beam_options=[*config.data.beam_options, *args.beam_options]))
    config = tasks.task_class(config).resolve(inherit_model(config))
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        _, rows = task_data(config, Path(args.workdir) if args.workdir else Path(scratch))
    for name, split in rows.items():
        print(describe(name, split))
    print(f"prepared in {time.time() - start:,.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
