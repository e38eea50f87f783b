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
document's last token. Opening a store reads only its manifest; a row reads its tokens from
the shard files, and the document starts of the last few shards it touched stay in memory, so
resident memory does not grow with the corpus.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxlm.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
STARTS_CACHED = 64  # shards whose document starts a reader keeps in memory


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
    """A finished store, read by global token position."""

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
        self._starts = functools.lru_cache(maxsize=STARTS_CACHED)(self._read_starts)

    def _read_starts(self, s: int) -> np.ndarray:
        d = int(self.doc_offsets[s + 1] - self.doc_offsets[s])
        return np.fromfile(self.directory / f"{shard_name(s)}.starts", np.int64, d) if d else np.zeros(0, np.int64)

    def _read_tokens(self, s: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of shard `s`, read (not mapped: mapped pages would count as this
        process's memory, and random rows would map a growing share of the corpus)."""
        size = self.dtype.itemsize
        fd = os.open(self.directory / f"{shard_name(s)}.tokens", os.O_RDONLY)
        try:
            data = os.pread(fd, (hi - lo) * size, lo * size)
        finally:
            os.close(fd)
        return np.frombuffer(data, self.dtype)

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
            starts, length = self._starts(s), int(self.offsets[s + 1] - self.offsets[s])
            tokens = self._read_tokens(s, lo, min(hi + 1, length)).astype(np.int64)  # and the next token
            at = np.arange(lo, hi)
            doc = np.searchsorted(starts, at, side="right") - 1  # [hi - lo] document in the shard
            ends = np.append(starts, length)[doc + 1]  # where each token's document ends
            nxt = np.pad(tokens[1:], (0, hi - lo + 1 - len(tokens)))
            parts.append({"inputs": tokens[:hi - lo], "targets": np.where(at + 1 == ends, self.eos_id, nxt),
                          "document": doc + int(self.doc_offsets[s]),
                          "start": starts[doc] + int(self.offsets[s])})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def ids(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream as int32."""
        return np.concatenate([self._read_tokens(s, lo, hi).astype(np.int32) for s, lo, hi in self._pieces(a, b)]
                              or [np.zeros(0, np.int32)])

    def document_starts(self) -> np.ndarray:
        """Where every document starts in the stream: [documents] int64, in memory (8 bytes a
        document; for readers that index documents, e.g. next-sentence pairs)."""
        return np.concatenate([self._read_starts(s) + int(self.offsets[s])
                               for s in range(len(self.offsets) - 1)] or [np.zeros(0, np.int64)])
