"""Text sources as TFDS datasets stored as array_record, read back with `tfds.data_source`.

Three sources:
  * `builtin`: the docstrings of the running Python's standard library plus its language
    reference topics (`pydoc_data`), so every machine can train with no network and no files;
  * `text`: the user's text files (globs), one document per file, long files cut at blank
    lines into documents of at most `MAX_DOC_CHARS` characters;
  * `tfds`: any TFDS catalog dataset by name, where a network allows the download.

A prepared dataset lives under `<cache_dir>/datasets/<name>-<fingerprint>`, so a second run
over the same inputs reuses it; the fingerprint covers the files' paths, sizes and mtimes.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jaxlm.config import DataConfig
from jaxlm.errors import UserError


class _Unactionable(logging.Filter):
    """Drops TFDS's log lines a user cannot act on: before a dataset's first preparation its
    folder has no dataset_info.json, which TFDS reports as a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


logging.getLogger("absl").addFilter(_Unactionable())

MAX_DOC_CHARS = 16_000
_FORMAT_VERSION = "2"  # bump when the way documents are cut or held out changes


@dataclass
class Splits:
    """Random-access train and eval splits of text documents."""

    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    text_key: str
    fingerprint: str  # identifies the training text (keys the tokenizer cache)


def as_text(value: Any) -> str:
    """A text feature as str (TFDS data sources return UTF-8 bytes)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def cache_dir(cfg: DataConfig) -> Path:
    """Where prepared datasets and trained tokenizers are kept."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("JAXLM_CACHE", "~/.cache/jaxlm")).expanduser()


def _is_eval(key: str, fraction: float) -> bool:
    """A stable, content-independent split of documents by their key."""
    digest = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return digest % 100_000 < fraction * 100_000


class _TextBuilder(tfds.core.GeneratorBasedBuilder):
    """Writes given (key, text, is_eval) documents as a train and a validation split."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, documents: Iterator[tuple[str, str, bool]] | None = None, **kwargs):
        self._documents = documents
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        docs = list(self._documents)
        train = [(k, t) for k, t, e in docs if not e]
        held = [(k, t) for k, t, e in docs if e]
        return {"train": self._generate_examples(train), "validation": self._generate_examples(held)}

    def _generate_examples(self, docs):
        for key, text in docs:
            yield key, {"text": text}


class JaxlmBuiltinCorpus(_TextBuilder):
    """The running Python's standard-library docstrings and reference topics."""


class JaxlmTextFiles(_TextBuilder):
    """The user's text files."""


def _stdlib_documents(eval_fraction: float) -> Iterator[tuple[str, str, bool]]:
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


def _cut(text: str) -> list[str]:
    """Cuts text into documents of at most MAX_DOC_CHARS, at paragraph or line breaks."""
    text = text.strip()
    pieces = []
    while len(text) > MAX_DOC_CHARS:
        window = text[:MAX_DOC_CHARS]
        cut = window.rfind("\n\n")
        if cut < MAX_DOC_CHARS // 4:
            cut = window.rfind("\n")
        if cut < MAX_DOC_CHARS // 4:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = MAX_DOC_CHARS
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


def read_text(path: Path, errors: str) -> str:
    """Reads a UTF-8 file; with errors='strict' a bad byte is an error naming file and offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"'{path}' is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            "convert it to UTF-8 or set data.encoding_errors=replace") from None


def relative_names(files: list[Path]) -> dict[Path, str]:
    """Each file's path below the files' common folder: keys the held-out share, so the eval
    split does not depend on where the corpus lives."""
    if not files:
        return {}
    root = Path(os.path.commonpath([p.parent for p in files]))
    return {p: p.relative_to(root).as_posix() for p in files}


def _file_documents(train_files: list[Path], eval_files: list[Path], cfg: DataConfig
                    ) -> Iterator[tuple[str, str, bool]]:
    names = relative_names(train_files + eval_files)
    for files, held_out in ((train_files, False), (eval_files, True)):
        for path in files:
            for i, chunk in enumerate(_cut(read_text(path, cfg.encoding_errors))):
                key = f"{names[path]}:{i}"
                yield key, chunk, held_out or (not eval_files and _is_eval(key, cfg.eval_fraction))


def _fingerprint(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _prepare(builder_cls: type[_TextBuilder], name: str, fingerprint: str,
             documents: Iterator[tuple[str, str, bool]], cfg: DataConfig) -> Splits:
    data_dir = cache_dir(cfg) / "datasets" / f"{name}-{fingerprint}"
    builder = builder_cls(documents=None, data_dir=str(data_dir))
    if not builder.is_prepared():
        print(f"preparing dataset {name} in {data_dir} (once; later runs reuse it)", file=sys.stderr)
        docs = [d for d in documents if d[1].strip()]
        if not docs:
            raise UserError(f"data.source={cfg.source}: the corpus is empty; give files that hold text")
        if len(docs) == 1:  # one short text: hold out its tail
            key, text, _ = docs[0]
            cut = _tail_cut(text, cfg.eval_fraction)
            docs = [(key, text[:cut].strip(), False), (key + ":tail", text[cut:].strip(), True)]
        elif not any(held for _, _, held in docs):  # a tiny corpus: hold out its last document
            key, text, _ = docs[-1]
            docs[-1] = (key, text, True)
        if not all(text for _, text, _ in docs):
            raise UserError(f"data.source={cfg.source}: too little text to hold some out for eval; "
                            "give more text or held-out files in data.eval_paths")
        if all(held for _, _, held in docs):
            raise UserError(f"data.source={cfg.source}: every document is held out for eval; "
                            "add training files or lower data.eval_fraction")
        builder = builder_cls(documents=iter(docs), data_dir=str(data_dir))
        builder.download_and_prepare()
    sources = builder.as_data_source()
    return Splits(sources["train"], sources["validation"], "text", fingerprint)


def load_splits(cfg: DataConfig) -> Splits:
    """Prepares (once) and opens the train and eval splits named by the data config."""
    if cfg.source == "builtin":
        fp = _fingerprint(["builtin", _FORMAT_VERSION, sys.version, cfg.eval_fraction])
        return _prepare(JaxlmBuiltinCorpus, "builtin", fp, _stdlib_documents(cfg.eval_fraction), cfg)
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
        return _prepare(JaxlmTextFiles, "text", fp, _file_documents(train, held, cfg), cfg)
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


def _catalog(cfg: DataConfig) -> Splits:
    """The documents of a TFDS catalog dataset."""
    builder, train, held = open_catalog(cfg)
    features = builder.info.features
    if cfg.text_key not in features:
        raise UserError(f"data.text_key={cfg.text_key!r} is not a feature of {cfg.name}; "
                        f"it has {', '.join(features)}")
    return Splits(train, held, cfg.text_key, _fingerprint(["tfds", cfg.name, cfg.train_split, cfg.eval_split,
                                                          cfg.eval_fraction, cfg.text_key]))
