"""The Task protocol: everything the loop and the commands know about an objective.

A task owns its objective and its data. Before a tokenizer exists it resolves its config
(`resolve`) and loads its splits (`load_splits`, the text a tokenizer is trained on); with the
tokenizer it builds random-access train and eval rows (`rows`). An instance (`create`) then
declares its batch keys, packs host batches where that pays (`packer`), initialises its model,
computes the loss and metric sums of `(params, batch, rng)`, and turns summed metrics into
reported ones, saying which of them are better lower. The step, the loop and the commands call
only this protocol and never name a task or a model family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np

from jaxlm.config import Config
from jaxlm.data import sources
from jaxlm.data.sources import Corpus
from jaxlm.microbatch import Layout

if TYPE_CHECKING:
    from jaxlm.data.tokenizer import TextTokenizer

Array = jax.Array
Batch = dict[str, np.ndarray]


class Task(Protocol):
    """An objective with its model and its data (see the module docstring)."""

    batch_keys: tuple[str, ...]  # the arrays of a batch the step takes, the model's input first
    terms: tuple[tuple[str, str], ...]  # the loss: sum over (sum key, denominator key)
    lower_is_better: frozenset[str]  # reported metrics that improve downward (losses, perplexity)

    @staticmethod
    def resolve(config: Config) -> Config:
        """The config with anything the task reads from its dataset filled in (e.g. label names)."""

    @staticmethod
    def load_splits(config: Config) -> Corpus:
        """The train and eval examples the config names (a corpus of documents, or labeled
        examples); nothing is tokenized yet."""

    @staticmethod
    def rows(config: Config, splits: Corpus, tok: TextTokenizer) -> Mapping[str, Any]:
        """Random-access "train" and "eval" rows (tokenized once, cached), each with `seq_len`,
        `__len__`, `__getitem__` and `empty()` (a padding row that counts nowhere). Rows
        encoded in memory come as `SplitRows`, each split encoded when first read."""

    @classmethod
    def create(cls, config: Config, tok: TextTokenizer) -> Task:
        """The task with its model, for a config whose vocabulary size is resolved."""

    def packer(self, rows: Any, layout: Layout, host_batch: int) -> Callable[[Batch], Batch] | None:
        """A transform of host batches of `rows` (e.g. several examples to a row) that keeps every
        group of `layout` whole; None when rows are used as they are."""

    def dummy_batch(self, batch_size: int, seq_len: int) -> Batch:
        """A batch of the right shapes and dtypes, for initialisation and compilation."""

    def synthetic_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> Batch:
        """A batch of random content with the shapes, dtypes and structure of real ones (no
        padding), for benchmarks that need no dataset."""

    def forward_flops(self, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of one forward pass over such a batch, counted analytically as computed
        (`jaxlm.models.flops`); a training step costs three times as much."""

    def init(self, rng: Array, batch: dict[str, Array]) -> dict:
        """Boxed (logically annotated) variables of the model."""

    def denominators(self, batch: dict[str, Array]) -> dict[str, Array]:
        """The loss's denominators over `batch` (counted up front under accumulation and pmap)."""

    def loss(self, params: dict, batch: dict[str, Array], rng: Array, train: bool,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
        """(loss to differentiate, metric sums); `rng` keys dropout; `totals` are the whole
        batch's denominators when the batch is a microbatch or one device's share."""

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Reported metrics from metric sums aggregated over devices and steps."""


class SplitRows(Mapping):
    """A task's "train" and "eval" rows, each split built by `build(name)` when first read: a
    command that reads one split (`evaluate`) does not encode the other. Training reads both
    up front (`jaxlm.train.task_data`), so bad data in either stops it before the first step."""

    names = ("train", "eval")

    def __init__(self, build: Callable[[str], Any]):
        self._build, self._built = build, {}

    def __getitem__(self, name: str) -> Any:
        if name not in self.names:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def batch_rows(task: Task, batch: Batch) -> int:
    """Rows of model input in `batch`: the length of its first key (the model's input, by the
    protocol's convention), fewer than the batch's examples where the task packs them."""
    return len(batch[task.batch_keys[0]])


def one_document_a_row(batch_size: int, seq_len: int) -> np.ndarray:
    """Positions [batch, length] of rows that each hold one document: 0 .. seq_len - 1."""
    return np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))


class Documents:
    """Defaults for tasks trained on documents (language modelling): the config as it is, the
    splits of `data.source`, rows used as they are."""

    @staticmethod
    def resolve(config: Config) -> Config:
        return config

    @staticmethod
    def load_splits(config: Config) -> Corpus:
        return sources.load_corpus(config.data)

    def packer(self, rows: Any, layout: Layout, host_batch: int) -> None:
        return None
