"""TFDS catalog datasets: opened by name (prepared as array_record on first use, where a
network allows), read in order as a language-model corpus, or by labeled sets."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jaxlm.config import DataConfig
from jaxlm.data.sources import Corpus, _fingerprint, as_text, cache_dir
from jaxlm.errors import UserError


class _Unactionable(logging.Filter):
    """Drops TFDS's log lines a user cannot act on: before a dataset's first preparation its
    folder has no dataset_info.json, which TFDS reports as a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


logging.getLogger("absl").addFilter(_Unactionable())


def catalog_dir(cfg: DataConfig) -> Path:
    """Where TFDS catalog datasets are kept: data.tfds_dir, $TFDS_DATA_DIR, or the jaxlm cache."""
    if cfg.tfds_dir:
        return Path(cfg.tfds_dir).expanduser()
    if os.environ.get("TFDS_DATA_DIR"):
        return Path(os.environ["TFDS_DATA_DIR"]).expanduser()
    return cache_dir(cfg) / "tfds"


def _import_legacy_module(dataset: str) -> None:
    """Imports the module of a catalog dataset kept in TFDS's older layout
    (`tensorflow_datasets/<category>/<module>.py`, e.g. glue, or wmt14 for wmt14_translate). TFDS
    registers those when the category is imported, which fails as a whole without TensorFlow;
    the one module does not. The module is the file named like the dataset, or the one that
    defines its builder class (the dataset's name in CamelCase)."""
    root = Path(tfds.__file__).parent
    paths = sorted(root.glob(f"*/{dataset}.py"))
    if not paths:
        defines = f"class {''.join(part.capitalize() for part in dataset.split('_'))}("
        paths = [p for p in sorted(root.glob("*/*.py")) if defines in p.read_text(errors="replace")]
    for path in paths:
        try:
            importlib.import_module(f"tensorflow_datasets.{path.parent.name}.{path.stem}")
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


def split_records(source: Sequence[Any], first: int = 0, end: int | None = None) -> Iterator[Any]:
    """The records `first` to `end` (default: the last) of a split, a few hundred a read."""
    end = len(source) if end is None else end
    for start in range(first, end, 256):
        yield from source.__getitems__(range(start, min(start + 256, end)))


class CatalogCorpus(Corpus):
    """The documents of a TFDS catalog dataset's train and eval splits, read in order (or in
    pieces of `PIECE_RECORDS` records)."""

    PIECE_RECORDS = 10_000

    def __init__(self, cfg: DataConfig, fingerprint: str, splits: dict[str, Sequence[Any]], nbytes: int | None):
        self.name, self.config, self.fingerprint, self._splits, self._nbytes = (
            cfg.name, cfg, fingerprint, splits, nbytes)

    def texts(self, split: str) -> Iterator[str]:
        return self._records(split, 0, len(self._splits[split]))

    def _records(self, split: str, first: int, end: int) -> Iterator[str]:
        for record in split_records(self._splits[split], first, end):
            yield as_text(record[self.config.text_key])

    def count(self, split: str) -> int:
        return len(self._splits[split])

    def approx_bytes(self, split: str) -> int | None:
        return self._nbytes

    def pieces(self, split: str) -> int:
        return -(-len(self._splits[split]) // self.PIECE_RECORDS)

    def piece(self, split: str, index: int) -> Iterator[tuple[str, bool]]:
        first = index * self.PIECE_RECORDS
        end = min(first + self.PIECE_RECORDS, len(self._splits[split]))
        return ((text, True) for text in self._records(split, first, end))


def corpus(cfg: DataConfig) -> CatalogCorpus:
    """The documents of a TFDS catalog dataset."""
    builder, train, held = open_catalog(cfg)
    features = builder.info.features
    if cfg.text_key not in features:
        raise UserError(f"data.text_key={cfg.text_key!r} is not a feature of {cfg.name}; "
                        f"it has {', '.join(features)}")
    fp = _fingerprint(["tfds", cfg.name, cfg.train_split, cfg.eval_split, cfg.eval_fraction, cfg.text_key])
    return CatalogCorpus(cfg, fp, {"train": train, "eval": held}, builder.info.dataset_size or None)
