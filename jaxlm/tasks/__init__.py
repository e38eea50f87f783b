"""Objectives. A task declares its batch keys and turns (params, batch, rng) into loss and sums."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxlm.config import Config
from jaxlm.errors import UserError
from jaxlm.tasks.classify import ClassifyTask
from jaxlm.tasks.clm import ClmTask
from jaxlm.tasks.mlm import MlmTask

if TYPE_CHECKING:  # tasks take a tokenizer's tables, not the data package
    from jaxlm.data.tokenizer import TextTokenizer

Task = ClmTask | MlmTask | ClassifyTask


def build(config: Config, tok: TextTokenizer) -> Task:
    """The task the config names, with its model."""
    if config.task == "clm":
        return ClmTask(config.model, tok.byte_lengths())
    if config.task == "mlm":
        if tok.mask_id is None:
            raise UserError("task=mlm needs a mask token ([MASK] or <mask>) in the tokenizer; "
                            "train one (leave data.tokenizer empty) or load one that has it")
        return MlmTask(config.model, config.mlm, config.data.seq_len, config.seed, tok.special_ids(),
                       tok.continues_word(), tok.mask_id)
    if config.task == "classify":
        return ClassifyTask(config.model, config.classify.num_labels)
    raise ValueError(f"unknown task {config.task}")
