"""Shared checks that a model family computes the same thing under every memory/speed knob.

Each model family's tests call these with its own config and loss function, so a new family
gets the same guarantees by adding one parametrised test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxlm.models.layers import restack


@partial(jax.jit, static_argnums=0, static_argnames=("decode",))
def apply(model: nn.Module, variables: dict, *args, decode: bool = False):
    """model.apply, compiled once per model and shapes (eager op-by-op is slow on 8 devices).

    With decode=True returns (logits, updated variables) with the cache mutable.
    """
    if decode:
        return model.apply(variables, *args, decode=True, mutable=["cache"])
    return model.apply(variables, *args)


def assert_grads_close(got: Any, want: Any, rtol: float) -> None:
    """Gradient trees agree, each entry to `rtol` of itself or of the tree's largest entry.

    An entry that is a sum of many cancelling terms (a tied embedding's gradient, or a key
    bias's, which is zero in exact arithmetic) legitimately moves by float32 rounding when a
    knob reorders the additions; a real error moves entries on the scale of the gradient.
    """
    scale = max(float(np.abs(w).max()) for w in jax.tree_util.tree_leaves(want))
    for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


LossFn = Callable[[nn.Module, dict, dict], jax.Array]  # (model, params, batch) -> scalar loss


def unboxed_init(model: nn.Module, batch: dict, init_args: Callable[[dict], tuple]) -> dict:
    params = jax.jit(model.init)(jax.random.key(0), *init_args(batch))["params"]
    return nn.meta.unbox(params)


def check_scan_matches_unrolled(model_cls, cfg, batch, init_args, loss_fn: LossFn) -> None:
    """Scanned layers give the same loss and gradients as unrolled ones (flag flipped)."""
    unrolled = model_cls(dataclasses.replace(cfg, scan_layers=False))
    scanned = model_cls(dataclasses.replace(cfg, scan_layers=True))
    params = unboxed_init(unrolled, batch, init_args)
    scanned_shapes = jax.eval_shape(scanned.init, jax.random.key(0), *init_args(batch))["params"]
    stacked = restack(params, scanned=True)
    assert jax.tree_util.tree_structure(nn.meta.unbox(scanned_shapes)) == jax.tree_util.tree_structure(stacked)
    loss_u, grads_u = jax.jit(jax.value_and_grad(lambda p: loss_fn(unrolled, p, batch)))(params)
    loss_s, grads_s = jax.jit(jax.value_and_grad(lambda p: loss_fn(scanned, p, batch)))(stacked)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    assert_grads_close(grads_s, restack(grads_u, scanned=True), rtol=1e-5)


def check_remat_matches_none(model_cls, cfg, batch, init_args, loss_fn: LossFn, policy: str) -> None:
    """Rematerialised blocks give the same loss and gradients as stored activations."""
    plain = model_cls(dataclasses.replace(cfg, remat="none"))
    remat = model_cls(dataclasses.replace(cfg, remat=policy))
    params = unboxed_init(plain, batch, init_args)
    def jaxpr(model):
        return str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(model, p, batch)))(params))
    assert "remat" in jaxpr(remat) and "remat" not in jaxpr(plain)  # the flag really applies
    loss_p, grads_p = jax.jit(jax.value_and_grad(lambda p: loss_fn(plain, p, batch)))(params)
    loss_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss_fn(remat, p, batch)))(params)
    np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
    assert_grads_close(grads_r, grads_p, rtol=1e-5)
