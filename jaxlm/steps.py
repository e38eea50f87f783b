"""TrainState, the pure train and eval steps, and their compilation over a mesh."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm import sharding

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. Parameters and optimizer state are float32."""

    step: Array
    params: Any
    opt_state: Any


def train_step(state: TrainState, batch: dict[str, Array], rng: Array, *, task: Any,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Pure: the randomness is `rng` folded with the step number.

    Returns the new state and metric sums (plus the gradient norm before clipping).
    """
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        return task.loss(params, batch, step_rng, train=True)

    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**sums, "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params: Any, batch: dict[str, Array], *, task: Any) -> dict[str, Array]:
    """Metric sums of one eval batch (no dropout)."""
    _, sums = task.loss(params, batch, jax.random.key(0), train=False)
    return sums


class Compiled:
    """The state's shardings and the jitted init, train and eval functions for one mesh."""

    def __init__(self, task: Any, tx: optax.GradientTransformation, mesh: Mesh, axis_rules: tuple,
                 batch_size: int, seq_len: int):
        self.task, self.tx, self.mesh, self.rules = task, tx, mesh, axis_rules
        dummy = task.dummy_batch(batch_size, seq_len)

        def init(rng: Array) -> TrainState:
            params = task.init(rng, dummy)["params"]
            return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

        with self.context():
            boxed = jax.eval_shape(init, jax.random.key(0))
        self.state_sharding: TrainState = sharding.logical_shardings(boxed, mesh, axis_rules)
        self.abstract_state: TrainState = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nn.meta.unbox(boxed), self.state_sharding)
        self.batch_sharding = sharding.batch_sharding(mesh, axis_rules)
        repl = sharding.replicated(mesh)
        self._init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            partial(train_step, task=task, tx=tx),
            in_shardings=(self.state_sharding, self.batch_sharding, repl),
            out_shardings=(self.state_sharding, repl), donate_argnums=0)
        self.eval_step = jax.jit(
            partial(eval_step, task=task),
            in_shardings=(self.state_sharding.params, self.batch_sharding), out_shardings=repl)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh and logical rules in scope, for tracing and running the steps."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self, seed: int) -> TrainState:
        """Fresh state, created directly in its sharded layout."""
        with self.context():
            return self._init(jax.random.key(seed))

    def put_batch(self, local: dict) -> dict[str, Array]:
        """This host's rows -> global batch arrays."""
        return sharding.global_batch({k: local[k] for k in self.task.batch_keys}, self.batch_sharding)
