"""Labeled examples for classification: TSV / CSV / JSONL files or a TFDS catalog dataset, and
their encoding into rows.

A file holds one example a line (TSV and CSV with a header row naming the columns; JSONL one
object a line). `data.text_key` names the text column, `classify.pair_key` an optional second
text, `classify.label_key` the label: a name from `classify.labels`, or an integer id when no
names are given. A bad label, a missing column or an empty file is one error naming the file
and line. Held-out examples come from `data.eval_paths`, or a stable hashed share of the rest.

A TFDS catalog dataset (`data.source=tfds`, e.g. `glue/sst2`, `imdb_reviews`) gives its label
names through its ClassLabel feature; its eval split is `data.eval_split` (else `test`, else a
share of train).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.config import ClassifyConfig, DataConfig
from jaxlm.data.catalog import catalog_builder, open_catalog, split_records
from jaxlm.data.sources import (
    Splits,
    _decoded_blocks,
    _fingerprint,
    as_text,
    example_file_splits,
    json_lines,
)
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError

KEYS = ("inputs", "token_types", "segment_ids", "positions", "pool_at", "labels")


def records(path: Path, encoding_errors: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every example of a file."""
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl", ".json"):
        raise UserError(f"'{path}': labeled files must end in .tsv, .csv or .jsonl")
    text = "".join(_decoded_blocks(path, encoding_errors))  # not UTF-8: one error naming the byte
    if suffix in (".jsonl", ".json"):
        return json_lines(path, text)
    csv.field_size_limit(2**31 - 1)  # a long text is cut to data.seq_len later, not refused here
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",",
                            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
    return [(number, row) for number, row in enumerate(reader, 2) if any(row.values())]


def _label(value: Any, cfg: ClassifyConfig, where: str) -> int:
    if cfg.labels:
        if str(value) not in cfg.labels:
            raise UserError(f"{where}: label {value!r} is not one of classify.labels {cfg.labels}")
        return cfg.labels.index(str(value))
    try:
        label = int(str(value).strip())
    except ValueError:
        raise UserError(f"{where}: label {value!r} is not an integer id; name the labels with "
                        "classify.labels=[...]") from None
    if not 0 <= label < cfg.num_labels:
        raise UserError(f"{where}: label {label} is outside 0..{cfg.num_labels - 1} (classify.num_labels)")
    return label


def _examples(path: Path, data: DataConfig, cfg: ClassifyConfig, name: str) -> list[dict[str, Any]]:
    """The file's examples; `name` (its path below the files' common folder) keys the held-out share."""
    rows = records(path, data.encoding_errors)
    if not rows:
        raise UserError(f"'{path}' holds no examples")
    keys = [data.text_key, cfg.label_key] + ([cfg.pair_key] if cfg.pair_key else [])
    out = []
    for number, record in rows:
        where = f"{path}:{number}"
        for key in keys:
            if record.get(key) is None:
                raise UserError(f"{where}: no '{key}' column/field (it has {', '.join(map(str, record))}); "
                                "set data.text_key, classify.label_key or classify.pair_key")
        out.append({"text": str(record[data.text_key]), "pair": str(record.get(cfg.pair_key, "")),
                    "label": _label(record[cfg.label_key], cfg, where), "key": f"{name}:{number}"})
    return out


def load_splits(data: DataConfig, cfg: ClassifyConfig) -> Splits:
    """Train and eval examples from labeled files (read in full: labeled sets are small)."""
    return example_file_splits(data, lambda path, name: _examples(path, data, cfg, name), "labeled",
                               [data.text_key, cfg.label_key, cfg.pair_key, cfg.labels])


def catalog_labels(data: DataConfig, cfg: ClassifyConfig) -> list[str]:
    """The label names of a TFDS catalog dataset (from its ClassLabel feature, before any download).

    They must agree with `classify.num_labels` and, where given, `classify.labels`.
    """
    features = catalog_builder(data).info.features
    feature = features[cfg.label_key] if cfg.label_key in features else None
    if not isinstance(feature, tfds.features.ClassLabel):
        raise UserError(f"{data.name} has no class-label feature '{cfg.label_key}' (its features: "
                        f"{', '.join(features)}); set classify.label_key")
    names = list(feature.names)
    if len(names) != cfg.num_labels:
        raise UserError(f"{data.name} has {len(names)} labels ({', '.join(names)}) but classify.num_labels="
                        f"{cfg.num_labels}; set classify.num_labels={len(names)}")
    if cfg.labels and list(cfg.labels) != names:
        raise UserError(f"classify.labels={cfg.labels} differ from {data.name}'s labels {names}; "
                        "leave classify.labels empty to use the dataset's")
    return names


def load_catalog(data: DataConfig, cfg: ClassifyConfig) -> Splits:
    """Train and eval examples of a TFDS catalog classification dataset (read in full)."""
    builder, train, held = open_catalog(data)
    features = builder.info.features
    catalog_labels(data, cfg)
    texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text) and k != cfg.pair_key]
    text_key = data.text_key if data.text_key in features else (texts[0] if len(texts) == 1 else None)
    if text_key is None or (cfg.pair_key and cfg.pair_key not in features):
        raise UserError(f"{data.name} has features {', '.join(features)}: name the text with data.text_key "
                        "(and a second text with classify.pair_key)")

    def read(source: Sequence[Any], split: str) -> list[dict[str, Any]]:
        out = []
        for i, record in enumerate(split_records(source)):
            label = int(record[cfg.label_key])
            if label < 0:
                raise UserError(f"{data.name} split '{split}' is unlabeled (example {i} has label {label}); "
                                "evaluate on a labeled split, e.g. data.eval_split=validation")
            out.append({"text": as_text(record[text_key]), "label": label,
                        "pair": as_text(record[cfg.pair_key]) if cfg.pair_key else ""})
        return out

    fp = _fingerprint(["tfds-labeled", data.name, data.train_split, data.eval_split, data.eval_fraction,
                       text_key, cfg.pair_key, cfg.label_key])
    return Splits(read(train, data.train_split), read(held, data.eval_split), "text", fp)


class ExampleRows:
    """Random-access encoded examples: `[CLS] text [SEP] (pair [SEP])`, cut and padded to seq_len.

    Each row is a dict of inputs, token_types (0 for the text, 1 for the pair), segment_ids
    (1 on real tokens, 0 on padding), positions [seq_len] and the label (a scalar).
    """

    def __init__(self, examples: Sequence[dict[str, Any]], tokenizer: TextTokenizer, seq_len: int):
        self.seq_len = seq_len
        n = len(examples)
        texts = encode_first(tokenizer, [as_text(examples[i]["text"]) for i in range(n)], seq_len)
        pairs = encode_first(tokenizer, [as_text(examples[i].get("pair", "")) for i in range(n)], seq_len)
        self.inputs = np.zeros((n, seq_len), np.int32)
        self.types = np.zeros((n, seq_len), np.int32)
        self.lengths = np.zeros(n, np.int32)
        self.labels = np.asarray([int(examples[i]["label"]) for i in range(n)], np.int32)
        cls, sep = tokenizer.bos_id, tokenizer.eos_id
        for i, (a, b) in enumerate(zip(texts, pairs)):
            a, b = _truncate(a, b, seq_len - (3 if b else 2))
            ids = [cls, *a, sep] + ([*b, sep] if b else [])
            self.inputs[i, :len(ids)] = ids
            self.types[i, len(a) + 2:len(ids)] = 1
            self.lengths[i] = len(ids)
        self.tokens = int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        real = np.arange(self.seq_len) < self.lengths[i]
        return {"inputs": self.inputs[i], "token_types": self.types[i],
                "segment_ids": real.astype(np.int32), "positions": np.arange(self.seq_len, dtype=np.int32),
                "pool_at": np.int32(0), "labels": self.labels[i]}

    def empty(self) -> dict[str, np.ndarray]:
        """A padding example (no tokens; weight zero)."""
        zeros = np.zeros(self.seq_len, np.int32)
        return {"inputs": zeros, "token_types": zeros, "segment_ids": zeros, "positions": zeros,
                "pool_at": np.int32(0), "labels": np.int32(-1)}


def encode_first(tokenizer: TextTokenizer, texts: list[str], tokens: int) -> list[list[int]]:
    """Each text's tokens, at least its first `tokens` (all, if it has fewer): a long text is cut
    at a space well past them first, so a 100 MB line is not tokenized whole. Tokenizers split
    words at spaces, so the tokens of a prefix cut there are a prefix of the text's tokens."""
    budget = 32 * tokens  # characters: many more than `tokens` tokens take
    cut = []
    for text in texts:
        at = text.rfind(" ", 0, budget) if len(text) > budget else -1
        cut.append(text[:at] if at > 0 else text)
    ids = tokenizer.encode_batch(cut)
    for i, (text, short) in enumerate(zip(texts, cut)):
        if len(short) < len(text) and len(ids[i]) < tokens:  # long words: the cut was too short
            ids[i] = tokenizer.encode(text)
    return ids


def _truncate(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cuts the longer of the two texts first until both fit (as BERT does)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return a, b
