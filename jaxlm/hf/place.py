"""Hugging Face tensors placed onto a model's sharded parameters, one parameter at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

from jaxlm.errors import UserError


def place_params(tensors: Mapping[str, np.ndarray], names: dict[str, tuple[str, ...]],
                 convert: Callable[[str, np.ndarray], np.ndarray], params: dict, source: str, kind: str,
                 read: Callable[[Mapping, str], np.ndarray] = lambda tensors, name: tensors[name],
                 stored: Callable[[str], str] = lambda name: name, tied: frozenset | set = frozenset(),
                 ) -> tuple[dict, list[str]]:
    """`params` (the model's jax arrays, in their sharded layout, unrolled or scanned) with every
    parameter that `names` (HF name -> unrolled parameter path) maps a tensor to replaced by
    `convert(name, tensor)`; returns them and the names of the tensors left out (bar `tied`
    ones). Missing or misshapen tensors are one error naming them. `read` and `stored` let a
    name stand for part of a stored tensor (GPT-2's fused query/key/value).

    One parameter at a time: its tensor (with scanned layers, one tensor a layer) is read,
    converted and placed on the devices that hold it before the next is read, so host memory
    holds at most one parameter, never the model. Parameters with no HF tensor (LoRA adapters)
    keep the values they came with.
    """
    missing = [n for n in names if stored(n) not in tensors]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}; "
                        f"is it a {kind} checkpoint of this config?")
    by_path = {path: name for name, path in names.items()}
    wrong = []

    def placed(path: tuple, leaf: jax.Array) -> jax.Array:
        keys = tuple(getattr(k, "key", k) for k in path)
        scanned = "blocks" in keys  # one tensor a layer, stacked
        unrolled = [tuple(f"block_{i}" if k == "blocks" else k for k in keys)
                    for i in range(leaf.shape[0] if scanned else 1)]
        if unrolled[0] not in by_path:
            return leaf
        value = np.empty(leaf.shape, np.float32)
        for i, u in enumerate(unrolled):
            raw = np.asarray(read(tensors, by_path[u]), np.float32)
            try:
                converted = convert(by_path[u], raw)
            except ValueError:  # a reshape to heads that cannot be
                converted = raw
            if converted.shape != leaf.shape[scanned:]:
                wrong.append(f"{by_path[u]} {raw.shape} vs {'/'.join(u)} {leaf.shape[scanned:]}")
                return leaf
            value[i if scanned else ...] = converted
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

    out = jax.tree_util.tree_map_with_path(placed, params)
    if wrong:
        raise UserError(f"{source}: {len(wrong)} tensor(s) do not fit the model: {'; '.join(wrong[:3])}")
    return out, sorted(set(tensors) - {stored(n) for n in names} - set(tied))
