"""Objectives, each behind the Task protocol (`tasks.base`): its model, its data, its loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxlm.config import TASKS, Config
from jaxlm.data.sources import Corpus
from jaxlm.errors import UserError
from jaxlm.tasks.base import Task
from jaxlm.tasks.classify import ClassifyTask
from jaxlm.tasks.clm import ClmTask
from jaxlm.tasks.mlm import MlmTask
from jaxlm.tasks.qa import QATask
from jaxlm.tasks.seq2seq import Seq2seqTask, SpanCorruptionTask
from jaxlm.tasks.sft import SftTask

if TYPE_CHECKING:
    from jaxlm.data.tokenizer import TextTokenizer

REGISTRY: dict[str, type[Task]] = {"clm": ClmTask, "mlm": MlmTask, "classify": ClassifyTask, "qa": QATask,
                                   "sft": SftTask, "seq2seq": Seq2seqTask,
                                   "span_corruption": SpanCorruptionTask}
assert set(REGISTRY) == set(TASKS), "config.TASKS and the registry must name the same tasks"


def task_class(config: Config) -> type[Task]:
    """The class of the task the config names (its data methods need no instance)."""
    return REGISTRY[config.task]


def load_splits(config: Config) -> Corpus:
    """The train and eval data of the config's task (`Task.load_splits`)."""
    if config.data.source == "none":
        raise UserError("this run names no data (data.source=none, as an imported model does); give its "
                        "data, e.g. data.source=squad data.paths=[train.json]")
    return task_class(config).load_splits(config)


def build(config: Config, tok: TextTokenizer) -> Task:
    """The task the config names, with its model."""
    return task_class(config).create(config, tok)
