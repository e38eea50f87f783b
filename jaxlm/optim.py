"""The optimizer: AdamW (decay off biases and norm scales), clipping and schedules, in Optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlm.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then the configured decay.

    linear, cosine: decay to `end_lr_fraction` of the peak at the last step; rsqrt: inverse
    square root of the step after warmup; constant: flat after warmup; wsd (warmup-stable-decay):
    flat, then a linear decay over the last `decay_fraction` of the steps.
    """
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_lr_fraction
    rest = max(total_steps - warmup, 1)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, rest)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.end_lr_fraction)
    elif cfg.schedule == "rsqrt":
        def after(step):
            return peak * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "wsd":
        decay = max(int(round(total_steps * cfg.decay_fraction)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [stable])
    else:
        raise ValueError(f"unknown schedule {cfg.schedule}")
    if not warmup:
        return after
    return optax.join_schedules([warm, after], [warmup])


# Parameters that get weight decay, by name: projection kernels and embedding tables. Biases
# (`bias`, `mlm_bias`) and norm scales are not decayed, whatever their rank: attention biases are
# [heads, head_dim], and under `model.scan_layers` every parameter gains a leading layer axis.
DECAYED = frozenset({"kernel", "embedding", "lora_a", "lora_b"})
ADAPTERS = frozenset({"lora_a", "lora_b"})  # with these in the model, they alone train (LoRA)


def decay_mask(params) -> object:
    """True for the parameters that get weight decay (named in `DECAYED`), False for the rest."""
    def decayed(path, _) -> bool:  # the last dict key: boxed (annotated) leaves add `.value`
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] in DECAYED
    return jax.tree_util.tree_map_with_path(decayed, params)


def _boxed(x) -> bool:  # a logically annotated (boxed) parameter: one leaf here
    return hasattr(x, "unbox")


def trainable(params) -> object | None:
    """True for the parameters an update may change: the adapters when the model has any
    (LoRA), else None (all of them). Boxed (annotated) parameters count as one leaf each."""
    def adapter(path, _) -> bool:
        return bool(ADAPTERS & {k.key for k in path if isinstance(k, jax.tree_util.DictKey)})
    flags = jax.tree_util.tree_map_with_path(adapter, params, is_leaf=_boxed)
    return flags if any(jax.tree_util.tree_leaves(flags)) else None


def optimizer(cfg: OptimConfig, total_steps: int, adapters: bool = False) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule. With `adapters` (LoRA), only the
    adapters are updated and only they have optimizer state; every other parameter stays."""
    adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw
    return only_adapters(tx) if adapters else tx


def only_adapters(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` over the adapters alone: its state holds nothing for the other parameters (they are
    empty subtrees, not masked arrays), and their updates are zero (scalars: nothing is
    allocated for them)."""

    def select(tree, flags):
        return jax.tree_util.tree_map(lambda x, f: x if f else None, tree, flags, is_leaf=_boxed)

    def init(params):
        return tx.init(select(params, trainable(params)))

    def update(updates, state, params=None):
        flags = trainable(params)
        picked, state = tx.update(select(updates, flags), state, select(params, flags))
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        it = iter(jax.tree_util.tree_leaves(picked))
        full = [next(it) if f else jnp.zeros((), x.dtype) for x, f in zip(leaves, jax.tree_util.tree_leaves(flags))]
        return treedef.unflatten(full), state

    return optax.GradientTransformation(init, update)
