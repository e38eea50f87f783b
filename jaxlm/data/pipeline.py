"""Language-model rows from a tokenized split, read with grain by global row index.

A split is tokenized once into flat arrays (cached on disk, memory-mapped): each document
contributes `inputs = [BOS, t1..tn]` and `targets = [t1..tn, EOS]`, concatenated in document
order, plus the offset where each document starts. Row `r` is the slice
`[r * seq_len, (r + 1) * seq_len)` of that stream, so rows are random access. A batch is a dict
of int32 arrays [batch, seq_len]:
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
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxlm.config import DataConfig
from jaxlm.data.sources import Splits, as_text, cache_dir
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]
KEYS = ("inputs", "targets", "segment_ids", "positions")
_ARRAYS = ("inputs", "targets", "starts")
_CHUNK = 1024  # documents tokenized per call


def _tokenize(source: Sequence[Any], tokenizer: TextTokenizer, text_key: str, out: Path) -> None:
    inputs, targets, starts, offset = [], [], [], 0
    report = sys.stderr.isatty() and len(source) > 20 * _CHUNK
    for first in range(0, len(source), _CHUNK):
        texts = [as_text(source[i][text_key]) for i in range(first, min(first + _CHUNK, len(source)))]
        for ids in tokenizer.encode_batch(texts):
            doc = np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)
            inputs.append(doc[:-1])
            targets.append(doc[1:])
            starts.append(offset)
            offset += len(doc) - 1
        if report:
            print(f"\rtokenized {first + len(texts):,}/{len(source):,} documents", end="", file=sys.stderr)
    if report:
        print(file=sys.stderr)
    out.mkdir(parents=True)
    for name, parts in (("inputs", inputs), ("targets", targets)):
        np.save(out / f"{name}.npy", np.concatenate(parts) if parts else np.zeros(0, np.int32))
    np.save(out / "starts.npy", np.asarray(starts, np.int64))


class TokenRows:
    """Random-access rows of `seq_len` tokens over a tokenized split (memory-mapped)."""

    def __init__(self, directory: Path, seq_len: int, whole_rows: bool):
        """whole_rows: drop the last, partial row (training) instead of padding it (eval)."""
        self.inputs, self.targets, self.starts = (
            np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS)
        self.seq_len = seq_len
        self.tokens = len(self.inputs)
        self._len = self.tokens // seq_len if whole_rows else math.ceil(self.tokens / seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, r: int) -> Batch:
        length = self.seq_len
        a = int(r) * length
        b = min(a + length, self.tokens)
        at = np.arange(a, b)
        doc = np.searchsorted(self.starts, at, side="right") - 1  # document of each token
        row = {"inputs": self.inputs[a:b], "targets": self.targets[a:b],
               "segment_ids": doc - doc[0] + 1,
               "positions": at - np.maximum(self.starts[doc], a)}
        return {k: np.pad(np.asarray(v, np.int32), (0, length - (b - a))) for k, v in row.items()}

    def empty(self) -> Batch:
        """A padding row: no tokens, weight zero."""
        return {k: np.zeros(self.seq_len, np.int32) for k in KEYS}


def tokenized(source: Sequence[Any], tokenizer: TextTokenizer, text_key: str, cache: Path) -> Path:
    """The directory of `source` tokenized (made once per split and tokenizer, then reused)."""
    digest = hashlib.sha1(tokenizer.tokenizer.to_str().encode()).hexdigest()[:12]
    directory = cache / f"tok-{digest}"
    if not all((directory / f"{name}.npy").is_file() for name in _ARRAYS):
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _tokenize(source, tokenizer, text_key, tmp)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return directory


def tokenize_splits(splits: Splits, tokenizer: TextTokenizer, cfg: DataConfig) -> dict[str, Path]:
    """Directories of the tokenized train and eval splits, under the data cache."""
    root = cache_dir(cfg) / "tokens" / splits.fingerprint
    return {name: tokenized(getattr(splits, name), tokenizer, splits.text_key, root / name)
            for name in ("train", "eval")}


def token_rows(splits: Splits, tokenizer: TextTokenizer, cfg: DataConfig) -> dict[str, TokenRows]:
    """Language-model rows of the train split (whole rows only) and the eval split (all of it)."""
    dirs = tokenize_splits(splits, tokenizer, cfg)
    return {"train": TokenRows(dirs["train"], cfg.seq_len, whole_rows=True),
            "eval": TokenRows(dirs["eval"], cfg.seq_len, whole_rows=False)}


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
        return {"next_row": self.next_row}


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
