"""Language-model rows from a token store, read with grain by global row index.

A split is tokenized once into a token store (`jaxlm.data.store`, cached, read row by row):
each document contributes `inputs = [BOS, t1..tn]` and `targets = [t1..tn, EOS]` to one
stream, in document order. Row `r` is the slice `[r * seq_len, (r + 1) * seq_len)` of that
stream, so rows are random access and may span the store's shards. A batch is a dict of int32
arrays [batch, seq_len]:
  inputs       token ids fed to the model (each document starts with BOS)
  targets      the next token at each position (each document ends with EOS)
  segment_ids  1, 2, ... per document piece in the row; 0 is padding
  positions    index of each token within its document piece
and `row_ids` [batch, 2] uint32, each row's global index in the stream as (high, low) 32-bit
words (keys per-row randomness, e.g. masked-LM masks, and never wraps in a long run). A document cut at a row's end continues in the next row as a new segment.

Training reads an endless sequence of rows (every epoch a fresh permutation) by *global* row
index: process `i` of `n` takes rows `[next_row + i * b, next_row + (i + 1) * b)` of each step's
`n * b` rows. The data position is therefore one number, `next_row`, equal on every process,
and a run resumed with another process count, device count or batch size continues at the
same row: within an epoch no row is repeated or skipped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxlm.config import DataConfig
from jaxlm.data import build, store
from jaxlm.data.sources import SPLITS, Corpus, MixtureCorpus, cache_dir
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]
KEYS = ("inputs", "targets", "segment_ids", "positions")
DATA_FORMAT = 2  # in a checkpoint's data state: rows come from a token store (document order of the files)


class TokenRows:
    """Random-access rows of `seq_len` tokens over a token store."""

    def __init__(self, tokens: store.TokenStore, seq_len: int, whole_rows: bool):
        """whole_rows: drop the last, partial row (training) instead of padding it (eval)."""
        self.store = tokens
        self.seq_len = seq_len
        self.tokens = tokens.tokens
        self._len = self.tokens // seq_len if whole_rows else math.ceil(self.tokens / seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, r: int) -> Batch:
        length = self.seq_len
        a = int(r) * length
        b = min(a + length, self.tokens)
        window = self.store.window(a, b)
        doc = window["document"]  # [b - a]
        row = {"inputs": window["inputs"], "targets": window["targets"], "segment_ids": doc - doc[0] + 1,
               "positions": np.arange(a, b) - np.maximum(window["start"], a)}
        return {k: np.pad(np.asarray(v, np.int32), (0, length - (b - a))) for k, v in row.items()}

    def empty(self) -> Batch:
        """A padding row: no tokens, weight zero."""
        return {k: np.zeros(self.seq_len, np.int32) for k in KEYS}


def tokenizer_hash(tokenizer: TextTokenizer) -> str:
    return hashlib.sha1(tokenizer.tokenizer.to_str().encode()).hexdigest()[:12]


def store_dir(corpus: Corpus, tokenizer: TextTokenizer, cfg: DataConfig) -> Path:
    """Where the corpus's token store for this tokenizer lives (a folder per split)."""
    return cache_dir(cfg) / "stores" / f"{corpus.name}-{corpus.fingerprint}-{tokenizer_hash(tokenizer)}"


def workers(cfg: DataConfig) -> int:
    """Tokenizing processes: data.prepare_workers, or one per CPU core this process may use."""
    if cfg.prepare_workers:
        return cfg.prepare_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def token_stores(corpus: Corpus, tokenizer: TextTokenizer, cfg: DataConfig) -> dict[str, store.TokenStore]:
    """The train and eval token stores of a corpus, prepared first where they do not exist yet."""
    root = store_dir(corpus, tokenizer, cfg)
    digest = tokenizer_hash(tokenizer)
    for split in SPLITS:
        directory = root / split
        if store.is_finished(directory):
            continue
        _note_older_caches(cfg)
        print(f"preparing the {split} token store of {corpus.name} in {directory} (once; later runs reuse it)",
              file=sys.stderr)
        if cfg.prepare_runner:
            _beam().run(corpus, split, tokenizer.tokenizer, tokenizer.bos_id, tokenizer.eos_id, directory,
                        int(cfg.shard_mb * 1e6), digest, cfg.prepare_runner, list(cfg.beam_options), workers(cfg))
        else:
            build.build(corpus.texts(split), tokenizer.tokenizer, tokenizer.bos_id, tokenizer.eos_id, directory,
                        int(cfg.shard_mb * 1e6), workers(cfg), corpus.fingerprint, digest, f"{corpus.name} {split}",
                        corpus.count(split), corpus.approx_bytes(split))
    return {split: store.TokenStore(root / split, digest) for split in SPLITS}


def _no_cloud_client_warning(record: logging.LogRecord) -> bool:
    """Drops the warning Beam's import gives that Google Cloud clients are missing, which only
    Dataflow needs (and its own workers have)."""
    return "apitools not found" not in record.getMessage()


def _beam():
    """`jaxlm.data.beam`, whose Apache Beam is an optional extra."""
    if importlib.util.find_spec("apache_beam") is None:
        raise UserError("data.prepare_runner needs Apache Beam: pip install -e \".[beam]\" "
                        "(or leave data.prepare_runner empty to prepare with local worker processes)")
    logging.getLogger().addFilter(_no_cloud_client_warning)  # the same filter is added once
    from jaxlm.data import beam
    return beam


def _note_older_caches(cfg: DataConfig) -> None:
    """Says once that a cache made before token stores is no longer read."""
    old = [cache_dir(cfg) / name for name in ("tokens", "datasets")]
    old = [str(p) for p in old if p.is_dir()]
    if old and not getattr(_note_older_caches, "said", False):
        _note_older_caches.said = True
        print(f"note: {' and '.join(old)} hold tokenized text in the format before token stores; "
              "it is no longer read (the data is rebuilt once as a token store) and can be deleted",
              file=sys.stderr)


def token_rows(corpus: Corpus, tokenizer: TextTokenizer, cfg: DataConfig) -> dict[str, Any]:
    """Language-model rows of the train split (whole rows only) and the eval split (all of it);
    of a mixture, each source's rows, drawn by weight."""
    if isinstance(corpus, MixtureCorpus):
        parts = {label: token_rows(part, tokenizer, cfg) for label, part, _ in corpus.parts}
        weights = [w for _, _, w in corpus.parts]
        return {split: MixedRows({label: rows[split] for label, rows in parts.items()}, weights)
                for split in SPLITS}
    stores = token_stores(corpus, tokenizer, cfg)
    return {"train": TokenRows(stores["train"], cfg.seq_len, whole_rows=True),
            "eval": TokenRows(stores["eval"], cfg.seq_len, whole_rows=False)}


class MixedRows:
    """The rows of several sources, one after the other, trained on by weight (`data.mixture`).

    Row `i` is row `i - offset[k]` of source `k`. Training does not read them in that order:
    `order` interleaves the sources in proportion to their weights (grain's deterministic
    mixing, so every global row has its source fixed by its index), and each source runs
    through its own permutations, a new one each time it runs out. Eval reports each source
    (`parts`) apart.
    """

    def __init__(self, parts: dict[str, Any], weights: list[float]):
        self.parts, self.weights = parts, weights
        rows = list(parts.values())
        self.seq_len = rows[0].seq_len
        self.offsets = np.cumsum([0] + [len(r) for r in rows])
        self.tokens = sum(r.tokens for r in rows)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Batch:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return list(self.parts.values())[k][int(i) - int(self.offsets[k])]

    def empty(self) -> Batch:
        return next(iter(self.parts.values())).empty()

    def order(self, seed: int) -> grain.MapDataset:
        """Endless row indices: the sources by weight, each in its own per-epoch permutations."""
        for label, rows in self.parts.items():
            if len(rows) == 0:
                raise UserError(f"data.mixture source '{label}' has {rows.tokens:,} training tokens, fewer than "
                                f"one row of data.seq_len={self.seq_len}; give it more text")
        sources = [grain.MapDataset.range(len(rows)).shuffle(seed=seed + k).repeat(None).map(
                   lambda r, first=int(self.offsets[k]): first + r) for k, rows in enumerate(self.parts.values())]
        return grain.MapDataset.mix(sources, self.weights)


def parts_of(rows: Any) -> dict[str, Any]:
    """Rows as the parts they are reported in: each source of a mixture by its label,
    else the whole under the empty label."""
    return rows.parts if isinstance(rows, MixedRows) else {"": rows}


def start_row(rows: Any, saved: dict | None) -> int:
    """The global row a run resumes at from a checkpoint's data state (0 for a new run), saying
    when that state was saved by an older data format."""
    saved = saved or {}
    if saved and "next_row" not in saved:
        print("the checkpoint's data position is in an older format; the data restarts at the "
              "beginning of an epoch", file=sys.stderr)
    elif saved and saved.get("format") != DATA_FORMAT and hasattr(rows, "store"):  # rows of a token store
        print(f"note: the checkpoint's data position (row {saved['next_row']:,}) was saved before token "
              "stores, whose documents are in file order: training continues at that row, but within "
              "this epoch some rows may repeat or be skipped", file=sys.stderr)
    return saved.get("next_row", 0)


def row_ids(index: np.ndarray | int) -> np.ndarray:
    """Global row indices as [..., 2] uint32 (high, low) words: exact up to 2**64 rows."""
    index = np.asarray(index, np.uint64)
    return np.stack([index >> np.uint64(32), index & np.uint64(0xFFFFFFFF)], -1).astype(np.uint32)


class TrainBatches:
    """This process's endless training batches, at a global row position.

    `rows` is any random-access sequence of row dicts with a `seq_len` (TokenRows, or
    labeled examples).

    Rows follow a fresh permutation every epoch (seeded by `seed`); the state saved in a
    checkpoint is `{"next_row": N}`, the global count of rows consumed, the same on every
    process.
    """

    def __init__(self, rows: Any, global_batch: int, seed: int, next_row: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 transform: Callable[[Batch], Batch] | None = None, prefetch: int = 2):
        """transform: applied to each host batch (e.g. packing examples into rows).
        prefetch: host batches read ahead in background threads (bounds host memory)."""
        if len(rows) == 0:
            raise UserError(f"the training split has {rows.tokens:,} tokens, fewer than one row of "
                            f"data.seq_len={rows.seq_len}; give more text or shorten data.seq_len")
        self.global_batch = global_batch
        self.next_row = next_row
        host = global_batch // process_count
        if isinstance(rows, MixedRows):
            order = rows.order(seed)
        else:
            order = grain.MapDataset.range(len(rows)).shuffle(seed=seed).repeat(None)
        stream = order.map_with_index(lambda g, r: {**rows[r], "row_ids": row_ids(g)})
        # batch k of this process holds global rows next_row + k * global_batch + index * host ...
        mine = stream[next_row:].batch(host)[process_index::process_count]
        if transform is not None:
            mine = mine.map(transform)
        # grain's default reads hundreds of batches ahead; a few keep the device fed
        options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        self._batches = iter(mine.to_iter_dataset(options))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self._batches)
        self.next_row += self.global_batch
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_row": self.next_row, "format": DATA_FORMAT}


def eval_batches(rows: Any, global_batch: int, max_batches: int = 0, process_index: int = 0,
                 process_count: int = 1, transform: Callable[[Batch], Batch] | None = None
                 ) -> Iterator[Batch]:
    """The eval split in order, one pass, as this process's part of each global batch.

    Every process yields the same number of batches; rows past the end are padding.

    Args:
      max_batches: stop after this many batches (0: the whole split).
    """
    count = math.ceil(len(rows) / global_batch)
    if max_batches:
        count = min(count, max_batches)
    host = global_batch // process_count
    for b in range(count):
        first = b * global_batch + process_index * host
        picked = [rows[r] if r < len(rows) else rows.empty() for r in range(first, first + host)]
        batch = {k: np.stack([row[k] for row in picked]) for k in picked[0]}
        batch["row_ids"] = row_ids(np.arange(first, first + host))
        yield batch if transform is None else transform(batch)
