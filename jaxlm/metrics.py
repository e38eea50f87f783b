"""Metric sums and the loss made of them (device side), and the host-side metrics made of sums.

Writers (console, metrics.jsonl, TensorBoard) live in `jaxlm.writers`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def objective(sums: dict[str, Any], terms: tuple[tuple[str, str], ...],
              totals: dict[str, Any] | None = None) -> Any:
    """The loss to differentiate: the sum over `terms` (sum key, denominator key) of each sum
    divided by its denominator, taken from `totals` (the whole batch's) when given, else `sums`."""
    counts = sums if totals is None else totals
    return sum(sums[s] / jnp.maximum(counts[d], 1.0) for s, d in terms)


def token_sums(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """(summed cross-entropy, correct predictions) of weighted tokens; logits [..., vocab] float32.

    One max over the vocabulary serves the log-sum-exp and the accuracy (a prediction is correct
    when the target's logit is the largest), so the logits are read once less than with a
    separate argmax; over a large vocabulary that read is a noticeable share of a step on CPUs.
    """
    top = jax.lax.stop_gradient(logits.max(-1))  # [...]
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [...]
    losses = jnp.log(jnp.exp(logits - top[..., None]).sum(-1)) + top - target
    return (losses * weights).sum(), ((target >= top) * weights).sum()


def chunked_token_sums(project: Callable[[Any, Array], Array], head: Any, hidden: Array, targets: Array,
                       weights: Array, chunk: int) -> tuple[Array, Array]:
    """`token_sums` of `project(head, hidden)`, `chunk` positions of every row at a time.

    Only one slice's logits [batch, chunk, vocab] exist at once, in the forward and (recomputed)
    in the backward pass, instead of the whole [batch, length, vocab]: the float32 logits of a
    large vocabulary are most of a decoder's activation memory. Rows stay whole across slices, so
    the batch keeps its sharding.

    Args:
      project: (head, hidden [batch, chunk, embed]) -> logits [batch, chunk, vocab].
      head: the output layer's parameters (passed through, so gradients reach them).
      hidden: [batch, length, embed]; targets, weights: [batch, length]. `chunk` divides length.
    """
    rows, length = targets.shape
    def slices(x: Array) -> Array:  # [batch, length, ...] -> [length / chunk, batch, chunk, ...]
        return jnp.moveaxis(x.reshape(rows, length // chunk, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(head: Any, h: Array, t: Array, w: Array) -> tuple[Array, Array]:
        return token_sums(project(head, h), t, w)

    def body(carry: tuple[Array, Array], xs: tuple[Array, Array, Array]) -> tuple[tuple[Array, Array], None]:
        loss_sum, correct = one(head, *xs)
        return (carry[0] + loss_sum, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (slices(hidden), slices(targets), slices(weights)))
    return loss_sum, correct


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
