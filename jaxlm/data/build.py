"""Building a token store: a corpus split tokenized by worker processes into shards.

The main process reads the split's documents in order and groups them into shards of about
`data.shard_mb` million characters; worker processes tokenize and write whole shards, so the
store depends only on the corpus, the tokenizer and the shard size, never on the number of
workers. At most two shards per worker are in flight and a worker holds one shard's tokens,
as compact arrays, so memory does not grow with the corpus. A shard whose files
exist (an interrupted run) is read past, not tokenized again; the manifest is written once
every shard is finished.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxlm.data import store

_worker: dict = {}
_ENCODE_BATCH = 64  # documents encoded at once: bounds the tokenizer's per-call memory


def _start_worker(tokenizer_json: str, parent: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: the workers are the parallelism
    _worker["tokenizer"] = Tokenizer.from_str(tokenizer_json)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """Ends this worker when the process that started it is gone (killed, e.g. by SIGTERM or
    SIGKILL), instead of waiting forever for work."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of documents, no special tokens added (as `TextTokenizer.encode_batch`), a few
    dozen documents at a time so only compact arrays accumulate. `encode_batch_fast` gives the
    same ids without computing character offsets, which a store does not keep."""
    out = []
    for first in range(0, len(texts), _ENCODE_BATCH):
        batch = tokenizer.encode_batch_fast(texts[first:first + _ENCODE_BATCH], add_special_tokens=False)
        out += [np.asarray(e.ids, dtype) for e in batch]
    return out


def _tokenize_shard(directory: Path, index: int, utf8: bytes, lengths: np.ndarray, bos_id: int,
                    dtype: str) -> dict[str, int]:
    """A worker's job: the shard's documents arrive as one UTF-8 string and their lengths in bytes."""
    ends = np.cumsum(lengths).tolist()
    texts = [utf8[a:b].decode() for a, b in zip([0, *ends[:-1]], ends)]
    documents = encode(_worker["tokenizer"], texts, np.dtype(dtype))
    return store.write_shard(directory, index, documents, bos_id, np.dtype(dtype))


class ShardCutter:
    """Places documents, in order, in shards of about `shard_chars` characters: a shard ends with
    the document that brings it to `shard_chars`. The one rule of every build (local or Beam),
    so a store depends only on the corpus, the tokenizer and the shard size."""

    def __init__(self, shard_chars: int):
        self.shard_chars, self.shard, self.size, self.open = shard_chars, 0, 0, False

    def place(self, chars: int) -> int:
        """The shard of the next document, of `chars` characters."""
        shard, self.size, self.open = self.shard, self.size + chars, True
        if self.size >= self.shard_chars:
            self.shard, self.size, self.open = self.shard + 1, 0, False
        return shard

    @property
    def shards(self) -> int:
        """Shards used so far."""
        return self.shard + self.open


def shards_of(texts: Iterator[str], shard_chars: int) -> Iterator[list[str]]:
    """Documents in consecutive groups of about `shard_chars` characters (whole documents)."""
    cutter, shard = ShardCutter(shard_chars), []
    for text in texts:
        shard.append(text)
        if cutter.place(len(text)) < cutter.shard:  # that document ended the shard
            yield shard
            shard = []
    if shard:
        yield shard


class Progress:
    """One line on stderr: documents, tokens, tokens/s and ETA (redrawn on a terminal, else
    printed every 30 s). The ETA counts documents where their number is known, else characters
    against the source's approximate size."""

    def __init__(self, label: str, documents: int | None, chars: int | None):
        self.label, self.total, self.total_chars, self.start = label, documents, chars, time.time()
        self.documents = self.tokens = self.chars = self.new_tokens = 0
        self.tty, self.shown = sys.stderr.isatty(), self.start

    def add(self, counts: dict[str, int], chars: int, new: bool) -> None:
        self.documents += counts["documents"]
        self.tokens += counts["tokens"]
        self.chars += chars
        self.new_tokens += counts["tokens"] if new else 0
        now = time.time()
        if now - self.shown >= (1 if self.tty else 30):
            self.shown = now
            self.show(end="\r" if self.tty else "\n")

    def show(self, end: str = "\n", finished: bool = False) -> None:
        took = max(time.time() - self.start, 1e-9)
        done = (self.documents / self.total if self.total else
                self.chars / self.total_chars if self.total_chars else 0.0)
        eta = (f"done in {took:,.0f} s" if finished else
               f"ETA {took * (1 - done) / done:,.0f} s" if 0 < done < 1 else "ETA ?")
        of = f"/{self.total:,}" if self.total else ""
        print(f"{self.label}: {self.documents:,}{of} documents, {self.tokens:,} tokens, "
              f"{self.new_tokens / took:,.0f} tokens/s, {eta}   ", end=end, file=sys.stderr, flush=True)


def build(texts: Iterator[str], tokenizer: Tokenizer, bos_id: int, eos_id: int, directory: Path,
          shard_chars: int, workers: int, source: str, tokenizer_hash: str, label: str,
          documents: int | None = None, chars: int | None = None) -> None:
    """Tokenizes texts into a finished store in `directory` (resuming a partial one).

    Args:
      documents, chars: how many documents, or about how many characters, `texts` holds (for
        the ETA), where known.
      workers: tokenizing processes (1: this process, with the tokenizer's own threads).
      source, tokenizer_hash: recorded in the manifest (what the store was made from).
    """
    directory.mkdir(parents=True, exist_ok=True)
    dtype = store.dtype_for(tokenizer.get_vocab_size()).name
    done = store.finished_shards(directory)
    progress = Progress(label, documents, chars)
    stream = enumerate(shards_of(texts, shard_chars))
    ahead = [s for s in (next(stream, None), next(stream, None)) if s is not None]
    pool = None
    if workers > 1 and len(ahead) > 1:  # one shard is tokenized here, with the tokenizer's threads
        pool = cf.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                                      (tokenizer.to_str(), os.getpid()))
    shards = 0
    try:
        pending: dict[cf.Future, tuple[int, int]] = {}  # future -> (shard, characters)
        for index, shard in itertools.chain(_emptying(ahead), stream):
            shards, size = index + 1, sum(map(len, shard))
            if index in done:
                progress.add(done[index], size, new=False)
            elif pool is None:
                done[index] = store.write_shard(directory, index, encode(tokenizer, shard, np.dtype(dtype)),
                                                bos_id, np.dtype(dtype))
                progress.add(done[index], size, new=True)
            else:
                while len(pending) >= 2 * workers:
                    finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    _collect({f: pending.pop(f) for f in finished}, done, progress)
                # one UTF-8 string per shard: a shard in flight is one compact allocation, not
                # one str per document
                utf8 = [text.encode() for text in shard]
                lengths = np.fromiter(map(len, utf8), np.int64, len(utf8))
                pending[pool.submit(_tokenize_shard, directory, index, b"".join(utf8), lengths, bos_id,
                                    dtype)] = (index, size)
                del utf8
            del shard
        _collect(pending, done, progress)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    progress.show(finished=True)
    store.write_manifest(directory, [done[i] for i in range(shards)], np.dtype(dtype), tokenizer_hash, source,
                         bos_id, eos_id)


def _emptying(items: list) -> Iterator:
    """The items of a list, each dropped from it as it is given."""
    while items:
        yield items.pop(0)


def _collect(futures: dict[cf.Future, tuple[int, int]], done: dict[int, dict[str, int]], progress: Progress) -> None:
    for future in cf.as_completed(futures):
        index, size = futures[future]
        done[index] = future.result()
        progress.add(done[index], size, new=True)
