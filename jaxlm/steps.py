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
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh

from jaxlm import optim, rngs, sharding
from jaxlm.microbatch import Layout

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. Parameters and optimizer state are float32."""

    step: Array
    params: Any
    opt_state: Any


def gradients(params: Any, batch: dict[str, Array], rng: Array, task: Any, accum_steps: int = 1,
              axis_name: str | None = None) -> tuple[Any, dict[str, Array]]:
    """Gradient of the batch's loss and its metric sums, in `accum_steps` microbatches.

    The loss is a sum of terms, each a sum over examples divided by its denominator
    (`task.terms`, e.g. token loss over tokens, NSP loss over pairs). With microbatches or
    under `jax.pmap` (`axis_name`), the denominators are counted over the whole batch up front
    (`task.denominators`, summed over devices), so the microbatches' and devices' gradients
    simply add up to the gradient of one batch, for any number of terms.
    """
    totals = None
    if accum_steps > 1 or axis_name is not None:
        totals = task.denominators(batch)
        if axis_name is not None:
            totals = jax.lax.psum(totals, axis_name)

    # with adapters (LoRA) only they are differentiated: frozen weights get no gradient
    # computation or memory, just a scalar zero in the gradient tree (the optimizer skips them)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flags = optim.trainable(params)
    train = [True] * len(leaves) if flags is None else jax.tree_util.tree_leaves(flags)

    def one(mb: dict[str, Array], mb_rng: Array):
        def loss(trained: list[Array]):
            it = iter(trained)
            full = treedef.unflatten([next(it) if t else x for x, t in zip(leaves, train)])
            return task.loss(full, mb, mb_rng, train=True, totals=totals)

        (_, sums), trained = jax.value_and_grad(loss, has_aux=True)([x for x, t in zip(leaves, train) if t])
        it = iter(trained)
        grads = treedef.unflatten([next(it) if t else jnp.zeros((), x.dtype) for x, t in zip(leaves, train)])
        return grads, sums

    if accum_steps == 1:
        grads, sums = one(batch, rng)
    else:
        def split(x: Array) -> Array:  # [batch, ...] -> [k, batch / k, ...], as packers group rows
            x = Layout(microbatches=accum_steps).split(x)
            return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

        def body(carry, xs):
            mb, i = xs
            return jax.tree_util.tree_map(jnp.add, carry, one(mb, jax.random.fold_in(rng, i))), None

        micro = jax.tree_util.tree_map(split, batch)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(lambda: one(first, rng)))
        (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    if axis_name is not None:
        grads, sums = jax.lax.psum((grads, sums), axis_name)
    return grads, sums


def train_step(state: TrainState, batch: dict[str, Array], rng: Array, *, task: Any,
               tx: optax.GradientTransformation, accum_steps: int = 1, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Pure: `rng` is the run's key; dropout draws from its dropout
    stream at the step number (`jaxlm.rngs`), so a resumed run draws the same.

    Under `jax.pmap`, `axis_name` names the device axis: gradients and metric sums are summed
    over devices, each device's loss already divided by the whole batch's denominators.

    A step whose loss or gradient is not finite (NaN or Inf) leaves the parameters and the
    optimizer state as they were (the step count still advances past its batch) and says so in
    its `nonfinite` metric: parameters are never written with NaN or Inf.

    Returns the new state and metric sums (plus the gradient norm before clipping).
    """
    step_rng = rngs.stream(rng, rngs.DROPOUT, state.step)
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    grads, sums = gradients(state.params, batch, step_rng, task, accum_steps, axis_name)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    for key, _ in task.terms:
        finite &= jnp.isfinite(sums[key])

    def update(_: None) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
    metrics = {**sums, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params: Any, batch: dict[str, Array], *, task: Any, axis_name: str | None = None
              ) -> dict[str, Array]:
    """Metric sums of one eval batch (no dropout)."""
    _, sums = task.loss(params, batch, jax.random.key(0), train=False)
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def predict_step(params: Any, batch: dict[str, Array], *, task: Any, axis_name: str | None = None
                 ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Metric sums and the task's per-row prediction outputs (`Task.predict`) of one eval batch,
    in one pass (the two share the forward pass once compiled)."""
    return eval_step(params, batch, task=task, axis_name=axis_name), task.predict(params, batch)


class Compiled:
    """The state's shardings and the jitted init, train and eval functions for one mesh."""

    def __init__(self, task: Any, tx: optax.GradientTransformation, mesh: Mesh, axis_rules: tuple,
                 batch_size: int, seq_len: int, accum_steps: int = 1):
        self.task, self.tx, self.mesh, self.rules = task, tx, mesh, axis_rules
        self.blocks = 1  # the step sees the batch as one block (see jaxlm.microbatch)
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
        sharding.check_divisible(self.abstract_state.params)
        self.batch_sharding = sharding.batch_sharding(mesh, axis_rules)
        repl = sharding.replicated(mesh)
        self._init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            partial(train_step, task=task, tx=tx, accum_steps=accum_steps),
            in_shardings=(self.state_sharding, self.batch_sharding, repl),
            out_shardings=(self.state_sharding, repl), donate_argnums=0)
        self.eval_step = jax.jit(
            partial(eval_step, task=task),
            in_shardings=(self.state_sharding.params, self.batch_sharding), out_shardings=repl)
        if hasattr(task, "predict"):  # replicated outputs: every process reads the whole batch's
            self._predict = jax.jit(partial(predict_step, task=task), out_shardings=repl,
                                    in_shardings=(self.state_sharding.params, self.batch_sharding))

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh and logical rules in scope, for tracing and running the steps."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self, seed: int) -> TrainState:
        """Fresh state from the seed's init stream, created directly in its sharded layout."""
        with self.context():
            return self._init(rngs.stream(jax.random.key(seed), rngs.INIT))

    def put_batch(self, local: dict) -> dict[str, Array]:
        """This host's rows -> global batch arrays."""
        return sharding.global_batch({k: local[k] for k in self.task.batch_keys}, self.batch_sharding)

    def predict(self, params: Any, local: dict) -> tuple[dict[str, Array], dict[str, np.ndarray]]:
        """Metric sums of a global batch, of which `local` is this host's rows, and the task's
        per-row prediction outputs (`Task.predict`) for every row of it, in order."""
        sums, outputs = self._predict(params, self.put_batch(local))
        return sums, jax.tree_util.tree_map(np.asarray, outputs)

    def adopt(self, state: TrainState) -> TrainState:
        """A restored state in the layout the steps take."""
        return state

    def saveable(self, state: TrainState) -> TrainState:
        """The state as checkpoints hold it (the layout of `abstract_state`)."""
        return state


class PmapCompiled(Compiled):
    """Pure data parallelism with `jax.pmap`: the state replicated on every local device and the
    same `train_step`, with gradients averaged over the device axis.

    Checkpoints hold one copy of the state (the layout of a one-device mesh), so they restore
    in either mode.
    """

    AXIS = "devices"

    def __init__(self, task: Any, tx: optax.GradientTransformation, batch_size: int, seq_len: int,
                 accum_steps: int = 1):
        self.devices = jax.local_devices()
        one = Mesh(np.asarray(self.devices[:1]).reshape(1, 1, 1), sharding.AXES,
                   axis_types=(AxisType.Auto,) * 3)
        super().__init__(task, tx, one, (), batch_size, seq_len)  # one copy: init and restore target
        n = self.blocks = len(self.devices)  # one block of the batch per device
        self._train = jax.pmap(
            partial(train_step, task=task, tx=tx, accum_steps=accum_steps, axis_name=self.AXIS),
            axis_name=self.AXIS, in_axes=(0, 0, None), donate_argnums=0, devices=self.devices)
        self._eval = jax.pmap(partial(eval_step, task=task, axis_name=self.AXIS), axis_name=self.AXIS,
                              devices=self.devices)
        broadcast = jax.pmap(lambda _, tree: tree, in_axes=(0, None), devices=self.devices)
        self._replicate = lambda tree: broadcast(np.arange(n), tree)  # one copy per device
        self.train_step, self.eval_step = self._train_step, self._eval_step
        if hasattr(task, "predict"):
            self._predict = jax.pmap(partial(predict_step, task=task, axis_name=self.AXIS), axis_name=self.AXIS,
                                     devices=self.devices)

    def _train_step(self, state: TrainState, batch: dict[str, Array], rng: Array):
        state, metrics = self._train(state, batch, rng)
        return state, _first(metrics)

    def _eval_step(self, params: Any, batch: dict[str, Array]) -> dict[str, Array]:
        return _first(self._eval(params, batch))

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        yield

    def init_state(self, seed: int) -> TrainState:
        return self._replicate(super().init_state(seed))

    def put_batch(self, local: dict) -> dict[str, Array]:
        """This host's rows -> [local devices, rows per device, ...]."""
        n = len(self.devices)
        return {k: local[k].reshape(n, local[k].shape[0] // n, *local[k].shape[1:])
                for k in self.task.batch_keys}

    def predict(self, params: Any, local: dict) -> tuple[dict[str, Array], dict[str, np.ndarray]]:
        sums, outputs = self._predict(params, self.put_batch(local))
        outputs = jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), outputs)  # this host's rows
        if jax.process_count() > 1:
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
        return _first(sums), outputs

    def adopt(self, state: TrainState) -> TrainState:
        return self._replicate(state)

    def saveable(self, state: TrainState) -> TrainState:
        return _first(state)


def _first(tree: Any) -> Any:
    """Device 0's copy of pmap outputs that agree on every device (psum-ed metrics)."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)
