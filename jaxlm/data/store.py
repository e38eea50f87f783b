"""The token store: a tokenized split as shards on disk, read by global token position.

A store is a directory:

    manifest.json   format, dtype, tokenizer hash, source fingerprint, each shard's token and
                    document counts (written last: a store without it is unfinished)
    00000.tokens    shard 0's token stream, raw, in the smallest unsigned type that holds the
                    vocabulary (uint16 below 65,536 tokens): each document as [BOS, t1..tn]
    00000.starts    int64 offset in the shard where each document starts
    00000.json      the shard's counts, written after its two files: a shard is finished when
                    this exists, so an interrupted preparation resumes without redoing it

Shards hold whole documents, in order, so the store's stream is the shards' streams one after
the other. Targets are not stored: the target at a position is the next token, or EOS at a
document's last token. Opening a store reads only its manifest; shards are memory-mapped when a
row first touches them, so resident memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxlm.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def shard_name(index: int) -> str:
    return f"{index:05d}"


def write_shard(directory: Path, index: int, documents: Sequence[Sequence[int]], bos_id: int,
                dtype: np.dtype) -> dict[str, int]:
    """Writes one shard of tokenized documents (each without its BOS) and returns its counts."""
    lengths = np.fromiter((len(d) + 1 for d in documents), np.int64, len(documents))
    starts = np.zeros(len(documents), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    stream = np.empty(int(lengths.sum()), dtype)  # [tokens]
    stream[starts] = bos_id
    for start, ids in zip(starts.tolist(), documents):
        stream[start + 1:start + 1 + len(ids)] = ids
    name = shard_name(index)
    _atomic_write(directory / f"{name}.tokens", stream.tobytes())
    _atomic_write(directory / f"{name}.starts", starts.tobytes())
    counts = {"tokens": len(stream), "documents": len(documents)}
    _atomic_write(directory / f"{name}.json", json.dumps(counts).encode())
    return counts


def finished_shards(directory: Path) -> dict[int, dict[str, int]]:
    """Counts of the shards an earlier (perhaps interrupted) preparation finished."""
    done = {}
    for path in directory.glob("[0-9]*.json"):
        done[int(path.stem)] = json.loads(path.read_text())
    return done


def write_manifest(directory: Path, shards: list[dict[str, int]], dtype: np.dtype, tokenizer: str,
                   source: str, bos_id: int, eos_id: int) -> None:
    """Marks the store finished: its shards, in order, and what made them."""
    manifest = {"format": FORMAT, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer, "source": source,
                "bos_id": bos_id, "eos_id": eos_id, "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(s["documents"] for s in shards), "shards": shards}
    _atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


def is_finished(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


class TokenStore:
    """A finished store, read by global token position (memory-mapped shard by shard)."""

    def __init__(self, directory: Path, tokenizer: str | None = None):
        """tokenizer: the hash of the tokenizer the reader uses; a store made by another is refused."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            raise UserError(f"'{directory}' is not a finished token store (no readable {MANIFEST}); "
                            "run `python -m jaxlm.prepare` with the run's arguments") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"token store '{directory}' has format {manifest.get('format')}, this jaxlm reads "
                            f"{FORMAT}; delete it and run `python -m jaxlm.prepare` again")
        if tokenizer is not None and manifest["tokenizer"] != tokenizer:
            raise UserError(f"token store '{directory}' was made with another tokenizer ({manifest['tokenizer']}, "
                            f"this run's is {tokenizer}); prepare the store again with this run's tokenizer")
        self.directory = directory
        self.dtype = np.dtype(manifest["dtype"])
        self.bos_id, self.eos_id = manifest["bos_id"], manifest["eos_id"]
        counts = manifest["shards"]
        self.offsets = np.cumsum([0] + [s["tokens"] for s in counts])  # [shards + 1] first token of each shard
        self.doc_offsets = np.cumsum([0] + [s["documents"] for s in counts])  # [shards + 1] first document
        self.tokens = int(self.offsets[-1])
        self.documents = int(self.doc_offsets[-1])
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, document starts) of shard `s`, memory-mapped."""
        if s not in self._open:
            name = shard_name(s)
            n, d = int(self.offsets[s + 1] - self.offsets[s]), int(self.doc_offsets[s + 1] - self.doc_offsets[s])
            tokens = (np.memmap(self.directory / f"{name}.tokens", self.dtype, "r", shape=(n,)) if n
                      else np.zeros(0, self.dtype))
            starts = (np.memmap(self.directory / f"{name}.starts", np.int64, "r", shape=(d,)) if d
                      else np.zeros(0, np.int64))
            self._open[s] = (tokens, starts)
        return self._open[s]

    def _pieces(self, a: int, b: int):
        """(shard, first, end) of every shard's part of tokens [a, b), in shard coordinates."""
        first = int(np.searchsorted(self.offsets, a, side="right")) - 1
        last = int(np.searchsorted(self.offsets, b, side="left")) - 1
        for s in range(max(first, 0), last + 1):
            base = int(self.offsets[s])
            lo, hi = max(a, base) - base, min(b, int(self.offsets[s + 1])) - base
            if hi > lo:
                yield s, lo, hi

    def window(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Tokens [a, b) of the stream (0 <= a < b <= tokens), as int arrays [b - a]:
        inputs, targets (the next token; EOS at a document's end), document (global index of
        each token's document) and start (where that document starts in the stream)."""
        parts = []
        for s, lo, hi in self._pieces(a, b):
            tokens, starts = self.shard(s)
            at = np.arange(lo, hi)
            doc = np.searchsorted(starts, at, side="right") - 1  # [hi - lo] document in the shard
            following = np.minimum(doc + 1, len(starts) - 1)  # where each token's document ends
            ends = np.where(doc + 1 < len(starts), np.asarray(starts[following]), len(tokens))
            nxt = np.asarray(tokens[lo + 1:min(hi + 1, len(tokens))], np.int64)
            nxt = np.pad(nxt, (0, hi - lo - len(nxt)))
            parts.append({"inputs": np.asarray(tokens[lo:hi], np.int64),
                          "targets": np.where(at + 1 == ends, self.eos_id, nxt),
                          "document": doc + int(self.doc_offsets[s]),
                          "start": np.asarray(starts[doc], np.int64) + int(self.offsets[s])})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def ids(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream as int32."""
        return np.concatenate([np.asarray(self.shard(s)[0][lo:hi], np.int32) for s, lo, hi in self._pieces(a, b)]
                              or [np.zeros(0, np.int32)])

    def document_starts(self) -> np.ndarray:
        """Where every document starts in the stream: [documents] int64, in memory (8 bytes a
        document; for readers that index documents, e.g. next-sentence pairs)."""
        return np.concatenate([np.asarray(self.shard(s)[1]) + int(self.offsets[s])
                               for s in range(len(self.offsets) - 1)] or [np.zeros(0, np.int64)])
