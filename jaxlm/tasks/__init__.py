"""Objectives. A task declares its batch keys and turns (params, batch, rng) into loss and sums."""

from __future__ import annotations

import numpy as np

from jaxlm.config import Config
from jaxlm.tasks.clm import ClmTask


def build(config: Config, byte_lengths: np.ndarray) -> ClmTask:
    """The task the config names, with its model."""
    if config.task == "clm":
        return ClmTask(config.model, byte_lengths)
    raise ValueError(f"unknown task {config.task}")
