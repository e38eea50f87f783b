"""Parallel text for sequence-to-sequence tasks: source/target pairs from TSV, CSV or JSONL files,
and their encoding into rows.

A file holds one pair a line (TSV and CSV with a header row naming the columns; JSONL one object
a line): `seq2seq.source_key` names the source column, `seq2seq.target_key` the target. A
missing column or an empty file is one error naming the file and line. Held-out pairs come from
`data.eval_paths`, or a stable hashed share of the rest; `evaluate --split test` reads
`data.test_paths`. With `data.source=tfds`, the pairs come from a TFDS catalog dataset whose
features the two keys name (`wmt14_translate/de-en`: `de`, `en`; `cnn_dailymail`: `article`,
`highlights`; `xsum`: `document`, `summary`).

A row holds the source `prefix + source [EOS]` (cut to `data.seq_len`) and the target
`target [EOS]` (cut to `seq2seq.target_len`), which the decoder reads shifted right behind a
start token (BOS): `targets_in = [BOS] target`, `targets = target [EOS]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.config import DataConfig, Seq2seqConfig
from jaxlm.data.catalog import open_catalog, split_records
from jaxlm.data.labeled import encode_first, records
from jaxlm.data.sources import Splits, _fingerprint, as_text, example_file_splits
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError

KEYS = ("inputs", "input_segments", "input_positions", "targets_in", "targets", "target_segments",
        "target_positions")
# the two sides of a row, as `jaxlm.data.packing` packs them: segment ids, positions, tokens
SIDES = (("input_segments", "input_positions", ("inputs",)),
         ("target_segments", "target_positions", ("targets_in", "targets")))


def _examples(path: Path, data: DataConfig, cfg: Seq2seqConfig, name: str) -> list[dict[str, Any]]:
    rows = records(path, data.encoding_errors)
    if not rows:
        raise UserError(f"'{path}' holds no examples")
    out = []
    for number, record in rows:
        for key in (cfg.source_key, cfg.target_key):
            if record.get(key) is None:
                raise UserError(f"{path}:{number}: no '{key}' column/field (it has {', '.join(map(str, record))}); "
                                "set seq2seq.source_key and seq2seq.target_key")
        out.append(_pair(str(record[cfg.source_key]), str(record[cfg.target_key]), f"{name}:{number}"))
    return out


def _pair(source: str, target: str, key: str) -> dict[str, Any]:
    return {"source": source, "target": target, "text": f"{source}\n{target}",  # text: a tokenizer's
            "key": key}


def load_splits(data: DataConfig, cfg: Seq2seqConfig) -> Splits:
    """Train and held-out pairs from parallel files (read in full)."""
    return example_file_splits(data, lambda path, name: _examples(path, data, cfg, name), "parallel",
                               [cfg.source_key, cfg.target_key], "no held-out pairs; give data.eval_paths or more pairs")


def load_catalog(data: DataConfig, cfg: Seq2seqConfig) -> Splits:
    """Train and held-out pairs of a TFDS catalog dataset (read in full); `evaluate --split test`
    reads its test split."""
    builder, train, held = open_catalog(data)
    features = builder.info.features
    missing = [k for k in (cfg.source_key, cfg.target_key) if k not in features]
    if missing:
        raise UserError(f"{data.name} has no feature {', '.join(repr(k) for k in missing)} (it has "
                        f"{', '.join(features)}); set seq2seq.source_key and seq2seq.target_key")

    def read(source: Sequence[Any], split: str) -> list[dict[str, Any]]:
        return [_pair(as_text(r[cfg.source_key]), as_text(r[cfg.target_key]), f"{split}:{i}")
                for i, r in enumerate(split_records(source))]

    fp = _fingerprint(["tfds-parallel", data.name, data.train_split, data.eval_split, data.eval_fraction,
                       cfg.source_key, cfg.target_key])
    return Splits(read(train, data.train_split), read(held, data.eval_split), "text", fp)


class ParallelRows:
    """Random-access encoded pairs, one a row (see the module docstring)."""

    def __init__(self, examples: list[dict[str, Any]], tok: TextTokenizer, source_len: int, target_len: int,
                 prefix: str = ""):
        self.seq_len, self.target_len = source_len, target_len
        self.sources = [e["source"] for e in examples]  # as written: what decoding reads and is scored against
        self.references = [e["target"] for e in examples]
        n = len(examples)
        sources = encode_first(tok, [prefix + e["source"] for e in examples], source_len)
        targets = encode_first(tok, [e["target"] for e in examples], target_len)
        self.inputs = np.zeros((n, source_len), np.int32)
        self.targets = np.zeros((n, target_len + 1), np.int32)  # [BOS] target [EOS], cut
        self.source_lengths = np.zeros(n, np.int32)
        self.target_lengths = np.zeros(n, np.int32)
        for i, (s, t) in enumerate(zip(sources, targets)):
            s = [*s[:source_len - 1], tok.eos_id]
            t = [tok.bos_id, *t[:target_len - 1], tok.eos_id]
            self.inputs[i, :len(s)], self.targets[i, :len(t)] = s, t
            self.source_lengths[i], self.target_lengths[i] = len(s), len(t) - 1
        self.tokens = int(self.target_lengths.sum())

    @property
    def lengths(self) -> np.ndarray:
        """[pairs, 2]: the source's and the target's tokens (what packing fits into a row)."""
        return np.stack([self.source_lengths, self.target_lengths], 1)

    @property
    def capacities(self) -> tuple[int, int]:
        """A row's room on each side: (source, target) tokens."""
        return self.seq_len, self.target_len

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        source = (np.arange(self.seq_len) < self.source_lengths[i]).astype(np.int32)
        target = (np.arange(self.target_len) < self.target_lengths[i]).astype(np.int32)
        return {"inputs": self.inputs[i], "input_segments": source,
                "input_positions": np.arange(self.seq_len, dtype=np.int32),
                "targets_in": self.targets[i, :-1] * target, "targets": self.targets[i, 1:] * target,
                "target_segments": target, "target_positions": np.arange(self.target_len, dtype=np.int32)}

    def empty(self) -> dict[str, np.ndarray]:
        """A padding row (no tokens; weight zero)."""
        source, target = np.zeros(self.seq_len, np.int32), np.zeros(self.target_len, np.int32)
        return {"inputs": source, "input_segments": source, "input_positions": source, "targets_in": target,
                "targets": target, "target_segments": target, "target_positions": target}
