"""`python -m jaxlm.evaluate`: the metrics of a checkpoint on a split.

    python -m jaxlm.evaluate --workdir DIR [--step N] [--split NAME] [--beam-size K] [--json] [key=value ...]

Each task reports its own: loss, perplexity and bits per byte of a language model; accuracy and
macro-F1 of a classifier; exact match and F1 of a question-answering reader; BLEU, chrF and
ROUGE-1/2/L of a sequence-to-sequence run, whose whole split is decoded (beam search of
`--beam-size`, default `seq2seq.eval_beam_size`). Where a task's metrics come from
predictions, the predictions are written beside the metrics, so any figure can be recomputed by
hand: `<workdir>/eval/predictions-<split>-<step>.json` (SQuAD's official format, question id ->
answer) or `<workdir>/eval/hypotheses-<split>-<step>.txt` (one output a line, in the split's
order), and the metrics to `<workdir>/eval/metrics-<split>-<step>.json`. A decode whose settings
the command line gives keeps its own files: with `--beam-size K` the names end in `-beamK`
(`hypotheses-test-2000-beam1.txt`), with `seq2seq.length_penalty=A` in `-lpA` and with
`seq2seq.no_repeat_ngram=N` in `-norepeatN`, so a greedy decode does not replace the beam
search's files.

The held-out and training splits are scored on `train.eval_batches` batches (0: all of them), as
during training; `--split test` scores the whole test split unless the command line gives
`train.eval_batches`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from jaxlm import tasks
from jaxlm.config import Config
from jaxlm.errors import UserError, cli
from jaxlm.train import evaluate_outputs
from jaxlm.workdir import open_run

# decoding settings a command line may change, and how the files of such a decode are tagged
DECODING_TAGS = {"seq2seq.eval_beam_size": "beam", "seq2seq.length_penalty": "lp", "seq2seq.no_repeat_ngram": "norepeat"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--split", choices=("eval", "test", "train"), default="eval",
                        help="held-out split (default), the test split (data.test_paths, or a catalog "
                             "dataset's test split) or the training split")
    parser.add_argument("--beam-size", type=int, help="sequence to sequence: beam size (1: greedy)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.eval_batches=0 for the whole split")
    return parser.parse_args(argv)


def test_config(config: Config) -> Config:
    """The config whose eval split is the test split: `data.test_paths`, or a catalog dataset's
    `test` split."""
    data = config.data
    if data.source == "tfds":
        return dataclasses.replace(config, data=dataclasses.replace(data, eval_split="test"))
    if not data.test_paths:
        raise UserError("--split test needs data.test_paths (held-out files for final figures), e.g. "
                        "data.test_paths=[test.json]")
    return dataclasses.replace(config, data=dataclasses.replace(data, eval_paths=data.test_paths))


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    overrides = [*args.overrides, *([f"seq2seq.eval_beam_size={args.beam_size}"] if args.beam_size else [])]
    if args.split == "test" and not any(o.startswith("train.eval_batches=") for o in overrides):
        overrides.append("train.eval_batches=0")  # final figures: the whole test split, not a sample
    run, ckpt = open_run(args.workdir, overrides)
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, args.step)
    config = test_config(run.config) if args.split == "test" else run.config
    task = tasks.task_class(config)
    rows = task.rows(config, tasks.load_splits(config), run.tokenizer)["train" if args.split == "train" else "eval"]
    metrics, files = evaluate_outputs(run, params, rows, decoded=None)
    if files:  # the predictions behind the metrics, and the metrics, beside each other
        out = Path(args.workdir) / "eval"
        out.mkdir(exist_ok=True)
        files = {**files, "metrics.json": json.dumps({"step": step, "split": args.split, **metrics}, indent=1)}
        given = dict(o.split("=", 1) for o in overrides)
        tag = "".join(f"-{short}{given[key]}" for key, short in DECODING_TAGS.items() if key in given)
        for name, text in files.items():
            stem, _, suffix = name.rpartition(".")
            (out / f"{stem}-{args.split}-{step}{tag}.{suffix}").write_text(text, encoding="utf-8")
        print(f"wrote {', '.join(files)} of step {step} ({args.split}) to {out}", file=sys.stderr)
    if args.json:
        print(json.dumps({"step": step, "split": args.split, **metrics}))
    else:
        print(f"step {step} {args.split}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"evaluated in {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
