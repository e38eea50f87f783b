"""grain pipelines: tokenize, pack rows with segment ids, shuffle, batch, shard per host.

A language-model batch is a dict of int32 arrays [batch, seq_len]:
  inputs       token ids fed to the model (each document starts with BOS)
  targets      the next token at each position (each document ends with EOS)
  segment_ids  1, 2, ... per document packed in the row; 0 is padding
  positions    index of each token within its document piece
Documents are concatenated and cut into rows (no padding in training rows); a document cut at
a row's end continues in the next row as a new segment.

The training iterator is a grain `DatasetIterator`: `get_state()` is a small JSON-able dict
saved in every checkpoint and `set_state()` puts a resumed run at the same example.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]
KEYS = ("inputs", "targets", "segment_ids", "positions")


class _Tokenize(grain.transforms.Map):
    """text -> {"inputs": [BOS, t1..tn], "targets": [t1..tn, EOS]}."""

    def __init__(self, tokenizer: TextTokenizer, text_key: str):
        self._tok = tokenizer
        self._key = text_key

    def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        text = example[self._key]
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = np.asarray([self._tok.bos_id, *self._tok.encode(str(text)), self._tok.eos_id], np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Index of each token within its run of equal segment ids (works on [..., length])."""
    length = segment_ids.shape[-1]
    index = np.broadcast_to(np.arange(length), segment_ids.shape)
    starts = np.ones(segment_ids.shape, bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return (index - start_index).astype(np.int32)


def _finish_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segments = row["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": row["inputs"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "segment_ids": segments,
        "positions": positions_from_segments(segments),
    }


def _packed(ds: grain.MapDataset, tokenizer: TextTokenizer, text_key: str,
            seq_len: int) -> grain.IterDataset:
    docs = ds.map(_Tokenize(tokenizer, text_key)).to_iter_dataset()
    rows = ConcatThenSplitIterDataset(docs, length_struct={"inputs": seq_len, "targets": seq_len})
    return rows.map(_finish_row)


def train_iterator(source: Sequence[Any], tokenizer: TextTokenizer, text_key: str, seq_len: int,
                   host_batch: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """An endless, reshuffled-every-epoch, checkpointable iterator of this host's batches.

    Args:
      source: random-access documents (a `tfds.data_source` split).
      host_batch: rows per batch on this host (global batch / process count).
      seed: shuffle seed; epochs reshuffle with seeds derived from it.
      process_index, process_count: this host's shard of the documents.
    """
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise UserError(f"the training split has {len(source)} documents, too few to give each of "
                        f"{process_count} processes one; give more text or use fewer processes")
    ds = ds.shuffle(seed=seed).repeat(None)
    return iter(_packed(ds, tokenizer, text_key, seq_len).batch(host_batch, drop_remainder=True))


def eval_batches(source: Sequence[Any], tokenizer: TextTokenizer, text_key: str, seq_len: int,
                 host_batch: int, max_batches: int = 0, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
    """The eval split in a fixed order, one pass; the last batch is padded with empty rows.

    Args:
      max_batches: stop after this many batches (0: the whole split).
    """
    ds = grain.MapDataset.source(source)[process_index::process_count]
    rows = iter(_packed(ds, tokenizer, text_key, seq_len).batch(host_batch, drop_remainder=False))
    for count, batch in enumerate(rows):
        if max_batches and count >= max_batches:
            return
        short = host_batch - batch["inputs"].shape[0]
        if short:
            batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
        yield batch
