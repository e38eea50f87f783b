"""Building a token store with Apache Beam: the store `jaxlm.data.build` makes, on a cluster.

`data.prepare_runner` names the runner: `DirectRunner` (this machine's cores, in worker
processes), or `DataflowRunner`, `SparkRunner`, `FlinkRunner`, `PortableRunner` with their
`data.beam_options`. The pipeline:

  1. read: each piece of the corpus (a file, or a range of a TFDS split's records) is read by
     one worker; its documents go on, and a summary (each document's length and whether the
     split keeps it) goes to
  2. plan: one worker applies the corpus-wide rules (`Corpus.settle`) and places the split's
     documents in shards in order with the local build's rule (`build.ShardCutter`), a few
     bytes a document; the plan itself holds a few numbers a shard;
  3. shard: each document is keyed by its shard, the documents of a shard are grouped (the
     runner's shuffle), and a worker tokenizes and writes each shard (`store.write_shard`);
  4. manifest: one worker writes the manifest once every shard is written.

So the store is byte for byte the local build's (a test checks it). Shards an interrupted
build finished are not tokenized again. The corpus's files, the data cache and the TFDS folder
must be at the same paths on every worker (a shared filesystem).
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from tokenizers import Tokenizer

from jaxlm.config import DataConfig
from jaxlm.data import build, store
from jaxlm.data.sources import Corpus, Settled, load_corpus
from jaxlm.errors import UserError

Plan = dict[str, Any]  # settled rules, shards, and per piece: (positions where a shard starts, shards)


def _open(cfg: DataConfig, fingerprint: str) -> Corpus:
    """The corpus on a worker; refuses one that changed since the pipeline was made."""
    corpus = load_corpus(cfg)
    if corpus.fingerprint != fingerprint:
        raise UserError(f"the corpus of data.source={cfg.source} changed while its token store was being built; "
                        "rerun jaxlm.prepare")
    return corpus


class _Read(beam.DoFn):
    """A piece's documents, keyed by (piece, position), and a summary of the piece."""

    def __init__(self, cfg: DataConfig, fingerprint: str, split: str):
        self.cfg, self.fingerprint, self.split = cfg, fingerprint, split

    def setup(self) -> None:
        self.corpus = _open(self.cfg, self.fingerprint)

    def process(self, piece: int) -> Iterator[Any]:
        lengths, kept = [], []
        for position, (text, keep) in enumerate(self.corpus.piece(self.split, piece)):
            lengths.append(len(text))
            kept.append(keep)
            yield (piece, position), text, keep
        yield beam.pvalue.TaggedOutput("summary", (piece, np.array(lengths, np.int64), np.array(kept, bool)))


def _plan(summaries: list[tuple[int, np.ndarray, np.ndarray]], cfg: DataConfig, fingerprint: str, split: str,
          shard_chars: int) -> Plan:
    """The split's shards: the local build's placement, from the pieces' summaries in order."""
    summaries = sorted(summaries, key=lambda s: s[0])
    counts = [(int(kept.sum()), int(len(kept) - kept.sum())) for _, _, kept in summaries]
    settled = _open(cfg, fingerprint).settle(split, counts)
    cutter, pieces = build.ShardCutter(shard_chars), {}
    for piece, lengths, kept in summaries:
        chosen = kept.copy()
        if settled.drop and settled.drop[0] == piece:
            chosen[settled.drop[1]] = False
        if settled.add and settled.add[0] == piece:
            chosen[settled.add[1]] = True
        if settled.cut:  # the corpus's only document; its head or tail alone is one shard
            chosen[:] = True
        starts, shards = [], []
        for position in np.flatnonzero(chosen).tolist():
            shard = cutter.place(int(lengths[position]))
            if not shards or shards[-1] != shard:
                starts.append(position)
                shards.append(shard)
        if starts:
            pieces[piece] = (starts, shards)
    return {"settled": settled, "shards": cutter.shards, "pieces": pieces}


def _key(document: tuple[tuple[int, int], str, bool], plan: Plan, done: frozenset[int]) -> Iterator[Any]:
    """(shard, (position, text)) of a document the split keeps, in a shard not yet written."""
    at, text, kept = document
    settled: Settled = plan["settled"]
    text = settled.select(at, text, kept)
    if text is None:
        return
    starts, shards = plan["pieces"][at[0]]
    shard = shards[bisect.bisect_right(starts, at[1]) - 1]
    if shard not in done:
        yield shard, (at, text)


class _Write(beam.DoFn):
    """Tokenizes and writes one shard; yields (shard, counts)."""

    def __init__(self, tokenizer_json: str, bos_id: int, directory: str):
        self.tokenizer_json, self.bos_id, self.directory = tokenizer_json, bos_id, Path(directory)

    def setup(self) -> None:
        os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: the workers are the parallelism
        self.tokenizer = Tokenizer.from_str(self.tokenizer_json)
        self.dtype = store.dtype_for(self.tokenizer.get_vocab_size())

    def process(self, element: tuple[int, list[tuple[tuple[int, int], str]]]) -> Iterator[tuple[int, dict]]:
        shard, documents = element
        texts = [text for _, text in sorted(documents, key=lambda d: d[0])]
        ids = build.encode(self.tokenizer, texts, self.dtype)
        yield shard, store.write_shard(self.directory, shard, ids, self.bos_id, self.dtype)


def _manifest(written: list[tuple[int, dict]], plan: Plan, done: dict[int, dict], directory: str,
              dtype: str, tokenizer_hash: str, source: str, bos_id: int, eos_id: int) -> None:
    counts = {**done, **dict(written)}
    if sorted(counts) != list(range(plan["shards"])):
        raise RuntimeError(f"shards {sorted(set(range(plan['shards'])) - set(counts))} were not written")
    store.write_manifest(Path(directory), [counts[i] for i in range(plan["shards"])], np.dtype(dtype),
                         tokenizer_hash, source, bos_id, eos_id)


def options(runner: str, flags: list[str], workers: int) -> PipelineOptions:
    """The runner's pipeline options. The DirectRunner runs `workers` processes by default and
    logs only errors (its workers' start-up lines would bury the progress)."""
    extra: dict[str, Any] = {}
    if runner == "DirectRunner":
        defaults = {"direct_num_workers": workers, "direct_running_mode": "multi_processing",
                    "default_sdk_harness_log_level": "ERROR"}
        extra = {k: v for k, v in defaults.items() if f"--{k}" not in " ".join(flags)}
        logging.getLogger("apache_beam").setLevel(logging.ERROR)
    return PipelineOptions(flags, runner=runner, **extra)


def run(corpus: Corpus, split: str, tokenizer: Tokenizer, bos_id: int, eos_id: int, directory: Path,
        shard_chars: int, tokenizer_hash: str, runner: str, flags: list[str], workers: int) -> None:
    """Builds the split's token store in `directory` with a Beam pipeline on `runner` (resuming
    a partial one)."""
    cfg = getattr(corpus, "config", None)
    if cfg is None:
        raise UserError(f"a {corpus.name} corpus cannot be prepared with Apache Beam; "
                        "leave data.prepare_runner empty")
    directory.mkdir(parents=True, exist_ok=True)
    done = store.finished_shards(directory)
    dtype = store.dtype_for(tokenizer.get_vocab_size()).name
    start = time.time()
    try:
        with beam.Pipeline(options=options(runner, flags, workers)) as p:
            read = (p | "pieces" >> beam.Create(range(corpus.pieces(split)))
                    | "spread" >> beam.Reshuffle()
                    | "read" >> beam.ParDo(_Read(cfg, corpus.fingerprint, split)).with_outputs("summary", main="docs"))
            plan = (read.summary | "summaries" >> beam.combiners.ToList()
                    | "plan" >> beam.Map(_plan, cfg, corpus.fingerprint, split, shard_chars))
            written = (read.docs
                       | "key" >> beam.FlatMap(_key, beam.pvalue.AsSingleton(plan), frozenset(done))
                       | "group" >> beam.GroupByKey()
                       | "write" >> beam.ParDo(_Write(tokenizer.to_str(), bos_id, str(directory))))
            _ = (written | "written" >> beam.combiners.ToList()
                 | "manifest" >> beam.Map(_manifest, beam.pvalue.AsSingleton(plan), done, str(directory), dtype,
                                          tokenizer_hash, corpus.fingerprint, bos_id, eos_id))
    except UserError:
        raise
    except Exception as e:  # a runner reports a worker's error inside its own
        message = str(e).strip().splitlines()
        user = [line for line in message if "UserError" in line]
        raise UserError(user[-1].split("UserError: ")[-1] if user else
                        f"the Beam pipeline on {runner} failed: {message[-1] if message else type(e).__name__}") from e
    made = store.TokenStore(directory, tokenizer_hash)
    took = time.time() - start
    print(f"{corpus.name} {split}: {made.documents:,} documents, {made.tokens:,} tokens in "
          f"{len(made.offsets) - 1} shard(s) with {runner}, {made.tokens / max(took, 1e-9):,.0f} tokens/s, "
          f"done in {took:,.0f} s", file=sys.stderr)
