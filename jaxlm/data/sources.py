"""Document sources for language models.

Three document sources, each a `Corpus` streamed in a fixed order (nothing holds a corpus in
memory):
  * `builtin`: the docstrings of the running Python's standard library plus its language
    reference topics (`pydoc_data`), so every machine can train with no network and no files;
  * `text`: the user's text files (globs), one document per file, long files cut at blank
    lines into documents of at most `MAX_DOC_CHARS` characters, read in blocks;
  * `tfds`: any TFDS catalog dataset by name, where a network allows the download
    (`jaxlm.data.catalog`).

Local documents go straight into the token store (`jaxlm.data.store`); a second copy of the
text as a TFDS dataset would double the disk and hold up to a gigabyte in TFDS's shuffle
buffer. A corpus is identified by a fingerprint (for files: their paths, sizes and mtimes),
which keys its tokenizer and token store in the cache.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxlm.config import DataConfig, MixtureSource, mixture_labels
from jaxlm.errors import UserError

MAX_DOC_CHARS = 16_000
_FORMAT_VERSION = "3"  # bump when the way documents are cut or held out changes
_BLOCK = 1 << 22  # bytes of a file read at a time
_SPACE = re.compile(r"\s*")  # what str.strip() removes
SPLITS = ("train", "eval")


class Corpus:
    """Documents of a language-model source, streamed in order, as a train and an eval split."""

    fingerprint: str
    name: str

    def texts(self, split: str) -> Iterator[str]:
        """The split's documents, in the order the token store keeps them."""
        raise NotImplementedError

    def count(self, split: str) -> int | None:
        """Documents in the split, where known without reading it."""
        return None

    def approx_bytes(self, split: str) -> int | None:
        """About how many bytes of text the split holds, known without reading it."""
        return None

    def sample(self, budget_chars: int, seed: int) -> Iterator[str]:
        """About `budget_chars` characters of training documents drawn evenly from the whole
        split (all of it with budget 0); see `sample`."""
        return sample(self.texts("train"), self.approx_bytes("train"), budget_chars, seed)

    # A split read in pieces (a cluster engine reads them in parallel, `jaxlm.data.beam`): the
    # pieces' documents in order, after the corpus-wide rules of `settle`, are `texts(split)`.

    def pieces(self, split: str) -> int:
        """How many pieces the split's documents are read in."""
        return 1

    def piece(self, split: str, index: int) -> Iterator[tuple[str, bool]]:
        """Piece `index`'s documents as (text, whether the split keeps it), before `settle`."""
        return ((text, True) for text in self.texts(split))

    def settle(self, split: str, counts: Sequence[tuple[int, int]]) -> Settled:
        """The corpus-wide rules, from each piece's counts of (kept, not kept) documents."""
        return Settled()


@dataclass(frozen=True)
class Settled:
    """What corpus-wide rules change in a split read in pieces. Documents are named by
    (piece, position among the piece's documents)."""

    drop: tuple[int, int] | None = None  # a kept document the split loses
    add: tuple[int, int] | None = None  # a document the split gains
    cut: tuple[bool, float, str] | None = None  # the corpus's only document: (head?, eval fraction, source)

    def select(self, at: tuple[int, int], text: str, kept: bool) -> str | None:
        """The document's text in the split, or None if the split does not have it."""
        if self.cut is not None:
            return _lone(text, *self.cut)
        if at == self.add:
            return text
        return text if kept and at != self.drop else None


def sample(texts: Iterator[str], approx_chars: int | None, budget_chars: int, seed: int) -> Iterator[str]:
    """About `budget_chars` characters of documents drawn evenly from the whole of `texts`.

    Each document is kept with probability budget / size (decided by a hash of the seed and its
    index, so the sample is the same every time) until the budget is spent; with the size
    unknown, documents are taken in order until the budget is spent; budget 0 takes them all.
    """
    keep = 1.0 if not budget_chars or not approx_chars else min(1.0, budget_chars / approx_chars)
    taken = 0
    for i, text in enumerate(texts):
        if keep < 1.0:
            digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
            if int.from_bytes(digest, "little") >= keep * 2.0 ** 64:
                continue
        yield text
        taken += len(text)
        if budget_chars and taken >= budget_chars:
            return


@dataclass
class Splits(Corpus):
    """Random-access train and eval examples (labeled sets, read in full)."""

    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    text_key: str
    fingerprint: str  # identifies the training text (keys the tokenizer cache)
    name: str = "labeled"

    def texts(self, split: str) -> Iterator[str]:
        examples = getattr(self, split)
        for i in range(len(examples)):
            yield as_text(examples[i][self.text_key])

    def count(self, split: str) -> int:
        return len(getattr(self, split))


class MixtureCorpus(Corpus):
    """Several corpora, each with a weight (`data.mixture`): each keeps its own token store, and
    training draws rows from them by weight."""

    def __init__(self, parts: list[tuple[str, Corpus, float]]):
        self.parts = parts  # (label, corpus, weight)
        self.name = "mixture"
        self.fingerprint = _fingerprint([[label, c.fingerprint, w] for label, c, w in parts])

    def texts(self, split: str) -> Iterator[str]:
        return itertools.chain.from_iterable(c.texts(split) for _, c, _ in self.parts)

    def approx_bytes(self, split: str) -> int | None:
        sizes = [c.approx_bytes(split) for _, c, _ in self.parts]
        return None if None in sizes else sum(sizes)

    def sample(self, budget_chars: int, seed: int) -> Iterator[str]:
        """Each source's share of the budget is its share of the weight."""
        total = sum(w for _, _, w in self.parts)
        return itertools.chain.from_iterable(
            c.sample(max(1, int(budget_chars * w / total)) if budget_chars else 0, seed) for _, c, w in self.parts)


def as_text(value: Any) -> str:
    """A text feature as str (TFDS data sources return UTF-8 bytes)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def cache_dir(cfg: DataConfig) -> Path:
    """Where prepared datasets, tokenizers and token stores are kept."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("JAXLM_CACHE", "~/.cache/jaxlm")).expanduser()


def _is_eval(key: str, fraction: float) -> bool:
    """A stable, content-independent split of documents by their key."""
    digest = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return digest % 100_000 < fraction * 100_000


DocStream = Iterator[tuple[str, str, bool]]  # (key, text, held out)


class LocalCorpus(Corpus):
    """Documents generated from local files (or the standard library), split by key, read in
    pieces (a file each).

    A tiny corpus still gets an eval split: a lone document has its tail held out, and when the
    hashed share holds none out, the last document is. Each split is one pass over the
    documents, one document behind, so that is decided without a pass of its own.
    """

    def __init__(self, name: str, fingerprint: str, pieces: Sequence[Callable[[], DocStream]], cfg: DataConfig,
                 nbytes: int | None = None):
        self.name, self.fingerprint, self._pieces, self.config, self._nbytes = name, fingerprint, pieces, cfg, nbytes
        self._source = f"data.source={cfg.source}"

    def texts(self, split: str) -> Iterator[str]:
        want_eval = split == "eval"
        docs = (d for d in itertools.chain.from_iterable(piece() for piece in self._pieces) if d[1].strip())
        head = list(itertools.islice(docs, 2))
        if not head:
            raise self._empty()
        if len(head) == 1:  # one short text: hold out its tail
            yield _lone(head[0][1], not want_eval, self.config.eval_fraction, self._source)
            return
        held_any, last = False, None  # `last`: the latest training document, not yet given
        for _, text, held in itertools.chain(head, docs):
            if held:
                held_any = True
                if want_eval:
                    yield text
                continue
            if last is not None and not want_eval:
                yield last
            last = text
        if last is None:
            raise self._all_held()
        if held_any != want_eval:  # training keeps its last document unless none was held out
            yield last

    def approx_bytes(self, split: str) -> int | None:
        return self._nbytes if split == "train" else None

    def pieces(self, split: str) -> int:
        return len(self._pieces)

    def piece(self, split: str, index: int) -> Iterator[tuple[str, bool]]:
        return ((text, held == (split == "eval")) for _, text, held in self._pieces[index]() if text.strip())

    def settle(self, split: str, counts: Sequence[tuple[int, int]]) -> Settled:
        """The rules `texts` applies in its pass, from the counts."""
        want_eval = split == "eval"
        total = sum(kept + other for kept, other in counts)
        held = sum(kept if want_eval else other for kept, other in counts)
        if total == 0:
            raise self._empty()
        if total == 1:
            return Settled(cut=(not want_eval, self.config.eval_fraction, self._source))
        if held == total:
            raise self._all_held()
        if held == 0:  # the last document is held out
            piece = max(i for i, c in enumerate(counts) if sum(c))
            at = (piece, sum(counts[piece]) - 1)
            return Settled(add=at) if want_eval else Settled(drop=at)
        return Settled()

    def _empty(self) -> UserError:
        return UserError(f"{self._source}: the corpus is empty; give files that hold text")

    def _all_held(self) -> UserError:
        return UserError(f"{self._source}: every document is held out for eval; "
                         "add training files or lower data.eval_fraction")


def _stdlib_documents(eval_fraction: float) -> DocStream:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        for i, chunk in enumerate(_cut(text)):
            key = f"{rel.as_posix()}:{i}"
            yield key, chunk, _is_eval(rel.as_posix(), eval_fraction)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        for i, chunk in enumerate(_cut(topics[name])):
            yield f"topics/{name}:{i}", chunk, _is_eval(f"topics/{name}", eval_fraction)


def _cut_point(window: str) -> int:
    """Where to end a document within `window`: a paragraph, else a line, else a word break."""
    cut = window.rfind("\n\n")
    if cut < MAX_DOC_CHARS // 4:
        cut = window.rfind("\n")
    if cut < MAX_DOC_CHARS // 4:
        cut = window.rfind(" ")
    return cut if cut > 0 else MAX_DOC_CHARS


def _cut(text: str) -> list[str]:
    """Cuts text into documents of at most MAX_DOC_CHARS, at paragraph or line breaks."""
    text = text.strip()
    pieces = []
    while len(text) > MAX_DOC_CHARS:
        cut = _cut_point(text[:MAX_DOC_CHARS])
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    pieces.append(text)
    return [p for p in pieces if p]


def _lone(text: str, head: bool, fraction: float, source: str) -> str:
    """The head (train) or tail (eval) of a corpus's only document."""
    cut = _tail_cut(text, fraction)
    if not text[:cut].strip() or not text[cut:].strip():
        raise UserError(f"{source}: too little text to hold some out for eval; "
                        "give more text or held-out files in data.eval_paths")
    return (text[:cut] if head else text[cut:]).strip()


def _tail_cut(text: str, fraction: float) -> int:
    """Where to cut a lone document so about `fraction` of it (at least 10%) is held out."""
    target = int(len(text) * (1 - max(fraction, 0.1)))
    for sep in ("\n", " "):
        cut = text.rfind(sep, 0, target)
        if cut > 0:
            return cut
    return target


def _decoded_blocks(path: Path, errors: str) -> Iterator[str]:
    """A UTF-8 file's text, a block at a time; with errors='strict' a bad byte is an error
    naming the file and its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                yield decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise UserError(
                    f"'{path}' is not valid UTF-8 (byte {at}: {e.object[e.start:e.start + 1]!r}); "
                    "convert it to UTF-8 or set data.encoding_errors=replace") from None
            if not block:
                return
            offset += len(block)


def file_documents(path: Path, errors: str) -> Iterator[str]:
    """A file cut into documents (as `_cut` does), read in blocks: memory does not grow with
    the file, and each character is copied a bounded number of times."""
    text, pos = "", 0
    for block in _decoded_blocks(path, errors):
        text = text[pos:] + block
        pos = _SPACE.match(text).end()
        while len(text) - pos > 4 * MAX_DOC_CHARS:  # enough ahead that trailing space cannot matter
            cut = _cut_point(text[pos:pos + MAX_DOC_CHARS])
            piece = text[pos:pos + cut].strip()
            pos = _SPACE.match(text, pos + cut).end()
            if piece:
                yield piece
    yield from _cut(text[pos:])


def expand_paths(patterns: Sequence[str], field: str) -> list[Path]:
    """Files named by paths and globs, sorted; a pattern matching nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UserError(f"{field}: '{pattern}' matches no file; check the path or glob")
        files.extend(Path(m).resolve() for m in matches)
    return sorted(set(files))


def relative_names(files: list[Path]) -> dict[Path, str]:
    """Each file's path below the files' common folder: keys the held-out share, so the eval
    split does not depend on where the corpus lives."""
    if not files:
        return {}
    root = Path(os.path.commonpath([p.parent for p in files]))
    return {p: p.relative_to(root).as_posix() for p in files}


def json_lines(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file's `text`; a line that is
    not a JSON object is one error naming the file and line."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object (a {type(record).__name__}); write one object a line")
        out.append((number, record))
    return out


def example_splits(cfg: DataConfig, read: Callable[[Path, str], list[dict[str, Any]]]
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Path], list[Path]]:
    """(train, held-out, train files, eval files) of example files read whole: `read(path, name)` gives a file's
    examples, each with a `key` from its name; the held-out ones are `data.eval_paths`'s, or a
    stable hashed share (`data.eval_fraction`) of the rest."""
    train_files = expand_paths(cfg.paths, "data.paths")
    eval_files = expand_paths(cfg.eval_paths, "data.eval_paths") if cfg.eval_paths else []
    names = relative_names(train_files + eval_files)
    train = [e for p in train_files for e in read(p, names[p])]
    held = [e for p in eval_files for e in read(p, names[p])]
    if not eval_files:
        held = [e for e in train if _is_eval(e["key"], cfg.eval_fraction)]
        train = [e for e in train if not _is_eval(e["key"], cfg.eval_fraction)]
    return train, held, train_files, eval_files


def example_file_splits(cfg: DataConfig, read: Callable[[Path, str], list[dict[str, Any]]], kind: str,
                        settings: list, no_eval: str = "") -> Splits:
    """`Splits` of example files read whole (`example_splits`), fingerprinted by `kind`, the files
    and the `settings` that shape the examples; `no_eval`, if given, is the error when nothing
    is held out."""
    train, held, train_files, eval_files = example_splits(cfg, read)
    if no_eval and not held:
        raise UserError(no_eval)
    fp = _fingerprint([kind, file_stats(train_files + eval_files), len(train_files), cfg.eval_fraction, *settings])
    return Splits(train, held, "text", fp)


def file_stats(files: list[Path]) -> list[list]:
    """Path, size and modification time of each file: what a cache of their contents keys on."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _file_pieces(train_files: list[Path], eval_files: list[Path], cfg: DataConfig) -> list[Callable[[], DocStream]]:
    """A piece per file, training files first."""
    names = relative_names(train_files + eval_files)

    def documents(path: Path, held_out: bool) -> DocStream:
        for i, chunk in enumerate(file_documents(path, cfg.encoding_errors)):
            key = f"{names[path]}:{i}"
            yield key, chunk, held_out or (not eval_files and _is_eval(key, cfg.eval_fraction))

    return [functools.partial(documents, path, held) for files, held in ((train_files, False), (eval_files, True))
            for path in files]


def _component(cfg: DataConfig, m: MixtureSource) -> DataConfig:
    """The data config of one mixture source."""
    return dataclasses.replace(cfg, mixture=[], source="text" if m.paths else "tfds", paths=list(m.paths),
                               eval_paths=list(m.eval_paths), name=m.name)


def _fingerprint(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_corpus(cfg: DataConfig) -> Corpus:
    """The documents the data config names (nothing is read yet)."""
    if cfg.mixture:
        return MixtureCorpus([(label, load_corpus(_component(cfg, m)), m.weight)
                              for label, m in zip(mixture_labels(cfg), cfg.mixture)])
    if cfg.source == "builtin":
        fp = _fingerprint(["builtin", _FORMAT_VERSION, sys.version, cfg.eval_fraction])
        return LocalCorpus("builtin", fp, [lambda: _stdlib_documents(cfg.eval_fraction)], cfg)
    if cfg.source == "text":
        train = expand_paths(cfg.paths, "data.paths")
        held = expand_paths(cfg.eval_paths, "data.eval_paths") if cfg.eval_paths else []
        both = sorted(set(train) & set(held))
        if both:
            raise UserError(f"'{both[0]}' is in both data.paths and data.eval_paths; "
                            "held-out files must not be trained on")
        stat = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in train + held]
        fp = _fingerprint(["text", _FORMAT_VERSION, stat, len(train), cfg.eval_fraction,
                           cfg.encoding_errors])
        return LocalCorpus("text", fp, _file_pieces(train, held, cfg), cfg,
                           sum(p.stat().st_size for p in train))
    from jaxlm.data import catalog  # reads TFDS; it builds on this module's Corpus
    return catalog.corpus(cfg)
