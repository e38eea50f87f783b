"""Eight fake CPU devices for every test, and small shared fixtures."""

import os

# Tests check numbers, not speed: LLVM's cheapest code generation halves compile time, which is
# most of the suite's time. Subprocess runs (`jaxlm.train` as a command) get the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for every test process of a run (xdist workers and the commands tests
# start): the same tiny programs are compiled by many tests.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    __import__("tempfile").gettempdir(), f"jaxlm-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import ast  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _docstrings(module) -> str:
    tree = ast.parse(inspect.getsource(module))
    docs = [ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    return "\n\n".join(d for d in docs if d)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A few real English text files (standard-library docstrings), ~200 KB."""
    import argparse  # noqa: E401
    import collections
    import json
    import logging
    import pathlib
    import string
    import textwrap
    root = tmp_path_factory.mktemp("corpus")
    for module in (argparse, collections, json, logging, pathlib, string, textwrap):
        (root / f"{module.__name__}.txt").write_text(_docstrings(module))
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset/tokenizer cache for the whole session."""
    return tmp_path_factory.mktemp("cache")


def records(workdir: Path, kind: str) -> dict[int, dict]:
    """The logged records of one kind by step; a line still being written by a live run is left out."""
    text = (workdir / "metrics.jsonl").read_text()
    lines = text[:text.rfind("\n") + 1].splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def tiny_overrides(corpus_dir: Path, cache_dir: Path) -> list[str]:
    """A model and run small enough to compile and train in seconds on 8 fake devices."""
    return [
        "data.source=text", f"data.paths=[{corpus_dir}/*.txt]", f"data.cache_dir={cache_dir}",
        "data.vocab_size=400", "data.seq_len=32", "model.num_layers=2", "model.embed_dim=32",
        "model.num_heads=4", "model.max_len=64", "train.batch_size=16", "train.steps=8",
        "train.log_every=2", "train.eval_every=4", "train.eval_batches=2", "checkpoint.every=4",
        "optim.warmup_steps=2",
    ]


@pytest.fixture
def tiny(corpus_dir, cache_dir) -> list[str]:
    return tiny_overrides(corpus_dir, cache_dir)


@pytest.fixture(scope="session")
def prepared(corpus_dir, cache_dir, tmp_path_factory):
    """(data config, corpus, trained 400-token tokenizer) over the corpus: real data for unit tests
    (token stores of ~10,000-character shards)."""
    from jaxlm.config import load
    from jaxlm.data import sources, tokenizer
    cfg = load(None, ["data.source=text", f"data.paths=[{corpus_dir}/*.txt]", f"data.cache_dir={cache_dir}",
                      "data.vocab_size=400", "data.shard_mb=0.01"]).data
    splits = sources.load_corpus(cfg)
    return cfg, splits, tokenizer.obtain(cfg, splits, tmp_path_factory.mktemp("wd"))


def prepare_catalog(catalog_name: str, data_dir, splits: dict) -> None:
    """Writes `splits` (lists of feature dicts) as the TFDS catalog dataset `catalog_name`, with the
    catalog's own builder (features, version, file layout), so it loads by name with no network."""
    import tensorflow_datasets as tfds

    from jaxlm.config import DataConfig
    from jaxlm.data import catalog
    dataset, _, config = catalog_name.partition("/")
    real = type(catalog.catalog_builder(DataConfig(name=catalog_name, tfds_dir=str(data_dir))))
    with tfds.core.registered.skip_registration():
        class Local(real):
            name = real.name

            def _split_generators(self, dl_manager):
                return {split: enumerate(examples) for split, examples in splits.items()}
    Local(config=config or None, data_dir=str(data_dir), file_format="array_record").download_and_prepare()
