"""Metric sums and the loss made of them (device side), and the host-side metrics made of sums.

Writers (console, metrics.jsonl, TensorBoard) live in `jaxlm.writers`."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def objective(sums: dict[str, Any], terms: tuple[tuple[str, str], ...],
              totals: dict[str, Any] | None = None) -> Any:
    """The loss to differentiate: the sum over `terms` (sum key, denominator key) of each sum
    divided by its denominator, taken from `totals` (the whole batch's) when given, else `sums`."""
    counts = sums if totals is None else totals
    return sum(sums[s] / jnp.maximum(counts[d], 1.0) for s, d in terms)


def token_metrics(sums: dict[str, float], count_key: str) -> dict[str, float]:
    """Mean loss, perplexity and accuracy over the `count_key` predictions of summed metrics."""
    count = max(float(sums[count_key]), 1.0)
    loss = float(sums["loss_sum"]) / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": float(sums["correct"]) / count}


def add_sums(total: dict[str, Any] | None, sums: dict[str, Any]) -> dict[str, float]:
    """Accumulates metric sums on the host (float64)."""
    sums = {k: float(np.asarray(v, np.float64)) for k, v in jax.device_get(sums).items()}
    if total is None:
        return sums
    return {k: total[k] + sums[k] for k in total}
