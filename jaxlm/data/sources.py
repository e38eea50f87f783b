"""Document sources for language models, and the TFDS catalog access labeled sets share.

Three document sources, each a `Corpus` streamed in a fixed order (nothing holds a corpus in
memory):
  * `builtin`: the docstrings of the running Python's standard library plus its language
    reference topics (`pydoc_data`), so every machine can train with no network and no files;
  * `text`: the user's text files (globs), one document per file, long files cut at blank
    lines into documents of at most `MAX_DOC_CHARS` characters, read in blocks;
  * `tfds`: any TFDS catalog dataset by name (array_record, read in order), where a network
    allows the download.

Local documents go straight into the token store (`jaxlm.data.store`); a second copy of the
text as a TFDS dataset would double the disk and hold up to a gigabyte in TFDS's shuffle
buffer. A corpus is identified by a fingerprint (for files: their paths, sizes and mtimes),
which keys its tokenizer and token store in the cache.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import glob
import hashlib
import importlib
import itertools
import json
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jaxlm.config import DataConfig, MixtureSource, mixture_labels
from jaxlm.errors import UserError


class _Unactionable(logging.Filter):
    """Drops TFDS's log lines a user cannot act on: before a dataset's first preparation its
    folder has no dataset_info.json, which TFDS reports as a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


logging.getLogger("absl").addFilter(_Unactionable())

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
    """Documents generated from local files (or the standard library), split by key.

    A tiny corpus still gets an eval split: a lone document has its tail held out, and when the
    hashed share holds none out, the last document is. Each split is one pass over the
    documents, one document behind, so that is decided without a pass of its own.
    """

    def __init__(self, name: str, fingerprint: str, documents: Callable[[], DocStream], cfg: DataConfig,
                 nbytes: int | None = None):
        self.name, self.fingerprint, self._documents, self._cfg, self._nbytes = (
            name, fingerprint, documents, cfg, nbytes)

    def texts(self, split: str) -> Iterator[str]:
        want_eval, source = split == "eval", f"data.source={self._cfg.source}"
        docs = (d for d in self._documents() if d[1].strip())
        head = list(itertools.islice(docs, 2))
        if not head:
            raise UserError(f"{source}: the corpus is empty; give files that hold text")
        if len(head) == 1:  # one short text: hold out its tail
            text = head[0][1]
            cut = _tail_cut(text, self._cfg.eval_fraction)
            if not text[:cut].strip() or not text[cut:].strip():
                raise UserError(f"{source}: too little text to hold some out for eval; "
                                "give more text or held-out files in data.eval_paths")
            yield (text[cut:] if want_eval else text[:cut]).strip()
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
            raise UserError(f"{source}: every document is held out for eval; "
                            "add training files or lower data.eval_fraction")
        if held_any != want_eval:  # training keeps its last document unless none was held out
            yield last

    def approx_bytes(self, split: str) -> int | None:
        return self._nbytes if split == "train" else None


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


def _file_documents(train_files: list[Path], eval_files: list[Path], cfg: DataConfig) -> DocStream:
    names = relative_names(train_files + eval_files)
    for files, held_out in ((train_files, False), (eval_files, True)):
        for path in files:
            for i, chunk in enumerate(file_documents(path, cfg.encoding_errors)):
                key = f"{names[path]}:{i}"
                yield key, chunk, held_out or (not eval_files and _is_eval(key, cfg.eval_fraction))


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
        return LocalCorpus("builtin", fp, lambda: _stdlib_documents(cfg.eval_fraction), cfg)
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
        return LocalCorpus("text", fp, lambda: _file_documents(train, held, cfg), cfg,
                           sum(p.stat().st_size for p in train))
    return _catalog(cfg)


def catalog_dir(cfg: DataConfig) -> Path:
    """Where TFDS catalog datasets are kept: data.tfds_dir, $TFDS_DATA_DIR, or the jaxlm cache."""
    if cfg.tfds_dir:
        return Path(cfg.tfds_dir).expanduser()
    if os.environ.get("TFDS_DATA_DIR"):
        return Path(os.environ["TFDS_DATA_DIR"]).expanduser()
    return cache_dir(cfg) / "tfds"


def _import_legacy_module(dataset: str) -> None:
    """Imports the module of a catalog dataset kept in TFDS's older layout
    (`tensorflow_datasets/<category>/<dataset>.py`, e.g. glue). TFDS registers those when the
    category is imported, which fails as a whole without TensorFlow; the one module does not."""
    root = Path(tfds.__file__).parent
    for path in sorted(root.glob(f"*/{dataset}.py")):
        try:
            importlib.import_module(f"tensorflow_datasets.{path.parent.name}.{dataset}")
        except ImportError:  # this one needs TensorFlow after all
            pass


def catalog_builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `data.name` (its features are known before any download)."""
    def builder() -> tfds.core.DatasetBuilder:
        return tfds.builder(cfg.name, data_dir=str(catalog_dir(cfg)), file_format="array_record")

    def unknown(e: Exception) -> UserError:
        return UserError(f"data.name={cfg.name!r} is not a TFDS catalog dataset: {str(e).splitlines()[0]}")

    try:
        return builder()
    except tfds.core.registered.DatasetNotFoundError:  # perhaps one in TFDS's older layout
        _import_legacy_module(cfg.name.split("/")[0].split(":")[0])
    except Exception as e:  # an unknown config or version
        raise unknown(e) from None
    try:
        return builder()
    except Exception as e:
        raise unknown(e) from None


def open_catalog(cfg: DataConfig) -> tuple[tfds.core.DatasetBuilder, Sequence[Any], Sequence[Any]]:
    """(builder, train split, eval split) of a TFDS catalog dataset, downloaded and prepared as
    array_record on first use. Without an eval split, the held-out share comes off the end of
    the train split."""
    builder = catalog_builder(cfg)
    where = catalog_dir(cfg)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise UserError(
                f"could not download TFDS dataset '{cfg.name}' ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                f"catalog datasets need a network the first time: prepare it where one exists with "
                f"tfds.builder('{cfg.name}', data_dir=D, file_format='array_record').download_and_prepare(), "
                "copy D here and set data.tfds_dir=D (or use data.source=text / labeled)") from None

    def open_split(split: str) -> Sequence[Any] | None:
        try:
            return builder.as_data_source(split=split)
        except Exception:  # TFDS raises several types for an unknown split
            return None

    train = open_split(cfg.train_split)
    if train is None:
        raise UserError(f"data.train_split={cfg.train_split!r} is not a split of {cfg.name} in {where} "
                        f"(it has {', '.join(builder.info.splits) or 'none prepared'}; a dataset prepared "
                        "as tfrecord must be prepared again with file_format='array_record')")
    held = open_split(cfg.eval_split)
    if held is None and cfg.eval_split != "test":
        held = open_split("test")
    if held is None:  # carve the held-out share off the end of the train split
        pct = max(1, round(100 * cfg.eval_fraction))
        train = open_split(f"{cfg.train_split}[:{100 - pct}%]")
        held = open_split(f"{cfg.train_split}[{100 - pct}%:]")
    return builder, train, held


class CatalogCorpus(Corpus):
    """The documents of a TFDS catalog dataset's train and eval splits, read in order."""

    def __init__(self, name: str, fingerprint: str, splits: dict[str, Sequence[Any]], text_key: str,
                 nbytes: int | None):
        self.name, self.fingerprint, self._splits, self._key, self._nbytes = (
            name, fingerprint, splits, text_key, nbytes)

    def texts(self, split: str) -> Iterator[str]:
        source = self._splits[split]
        for first in range(0, len(source), 256):  # a few hundred records per read
            for record in source.__getitems__(range(first, min(first + 256, len(source)))):
                yield as_text(record[self._key])

    def count(self, split: str) -> int:
        return len(self._splits[split])

    def approx_bytes(self, split: str) -> int | None:
        return self._nbytes


def _catalog(cfg: DataConfig) -> Corpus:
    """The documents of a TFDS catalog dataset."""
    builder, train, held = open_catalog(cfg)
    features = builder.info.features
    if cfg.text_key not in features:
        raise UserError(f"data.text_key={cfg.text_key!r} is not a feature of {cfg.name}; "
                        f"it has {', '.join(features)}")
    fp = _fingerprint(["tfds", cfg.name, cfg.train_split, cfg.eval_split, cfg.eval_fraction, cfg.text_key])
    return CatalogCorpus(cfg.name, fp, {"train": train, "eval": held}, cfg.text_key,
                         builder.info.dataset_size or None)
