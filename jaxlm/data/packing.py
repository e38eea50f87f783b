"""Several examples to a row: a first-fit packer and the row counts it packs into.

Examples of a few tokens each (classification texts, prompt/response pairs) waste most of a
padded row. A packer places several in one row, apart by segment ids (attention never crosses
them) with positions restarting at 0, so every example computes exactly what it would alone
in a padded row, on far fewer padding tokens.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxlm.microbatch import Layout

Side = tuple[str, str, tuple[str, ...] | None]  # segment ids key, positions key, token keys (None: every other)


class Packer:
    """Packs a batch of encoded examples into as few rows as it can (first fit, longest first).

    A row has one or more sides (`sides`: a sequence-to-sequence row has its source and its
    target), each with segment ids, positions and token arrays `[examples, length]`; an
    example's tokens on a side are its first `segment_ids.sum()`, and it goes where every side
    has room. Token arrays are packed; segment ids and positions are rebuilt; with one side, a
    `pool_at` entry gives each example's first token as a flat index (row * length + offset)
    into its group's rows (with one group, into the whole batch); any other per-example array
    (e.g. `labels`) passes through. Batches take the first of `sizes` (rows per group) they fit
    in, else one example a row, so only a few shapes are ever compiled.

    Examples are packed in the groups of `layout` (`jaxlm.microbatch`), the groups the train
    step sees whole (one per microbatch of each pmap device).
    """

    def __init__(self, sizes: tuple[int, ...], layout: Layout = Layout(),
                 sides: tuple[Side, ...] = (("segment_ids", "positions", None),)):
        self.sizes, self.layout, self.sides = sizes, layout, sides

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = batch[self.sides[0][0]].shape[0]
        caps = [batch[seg].shape[1] for seg, _, _ in self.sides]
        lengths = np.stack([batch[seg].astype(bool).sum(1) for seg, _, _ in self.sides], 1)  # [examples, sides]
        groups = self.layout.groups(count)
        for rows in (*self.sizes, len(groups[0])):  # one example a row always fits
            places = [first_fit(lengths[g], rows, caps) for g in groups]
            if all(places):
                break
        out, tokens = {}, []
        for (seg, pos, keys), cap in zip(self.sides, caps):
            keys = keys or tuple(k for k, v in batch.items() if v.shape == (count, cap) and k not in (seg, pos))
            tokens.append(keys)
            for k in (*keys, seg, pos):
                out[k] = np.zeros((rows * len(groups), cap), batch[k].dtype)
        pool_at = np.zeros(count, np.int32)
        for group, (g, group_places) in enumerate(zip(groups, places)):
            used = np.zeros(rows, np.int32)  # examples per row so far
            for e, (row, offsets) in zip(g, group_places):
                if not lengths[e].any():
                    continue
                at = self.layout.row(group, row, rows)
                used[row] += 1
                for (seg, pos, _), keys, n, offset in zip(self.sides, tokens, lengths[e], offsets):
                    span = slice(offset, offset + n)
                    for k in keys:
                        out[k][at, span] = batch[k][e, :n]
                    out[seg][at, span] = used[row]
                    out[pos][at, span] = np.arange(n)
                pool_at[e] = row * caps[0] + offsets[0]
        if "pool_at" in batch:
            out["pool_at"] = pool_at
        return {**{k: v for k, v in batch.items() if k not in out}, **out}


def first_fit(lengths: np.ndarray, rows: int, caps: list[int] | int) -> list[tuple[int, list[int]]]:
    """(row, offset on each side) of each example, longest first (by its first side); [] if
    they do not fit in `rows` rows of `caps` tokens a side. `lengths`: [examples] or
    [examples, sides]."""
    lengths = lengths.reshape(len(lengths), -1)
    caps = np.broadcast_to(np.asarray(caps), lengths.shape[1:])
    fill = np.zeros((rows, lengths.shape[1]), np.int64)
    places = [(0, [0] * lengths.shape[1])] * len(lengths)
    for i in np.argsort(-lengths[:, 0], kind="stable"):
        if not lengths[i].any():
            continue
        free = np.nonzero(np.all(fill + lengths[i] <= caps, axis=1))[0]
        if not len(free):
            return []
        places[i] = (int(free[0]), fill[free[0]].tolist())
        fill[free[0]] += lengths[i]
    return places


def packed_sizes(lengths: np.ndarray, caps: list[int] | int, examples: int, multiple: int = 1,
                 groups: int = 1) -> tuple[int, ...]:
    """Rows per group to pack `groups` groups of `examples` random examples of these token
    `lengths` ([examples] or [examples, sides], at most `caps` tokens a side) into: a common
    size, then a roomy one.

    Measured by packing 1,000 random batches: the first size fits about 60% of batches, the
    second all of them; each size is one compiled shape, and a batch that fits neither gets one
    example a row. Sizes are rounded up to `multiple` (so the batch's rows split over the
    devices) and never exceed `examples`.
    """
    lengths = lengths.reshape(len(lengths), -1)
    rng = np.random.default_rng(0)
    need = []
    for _ in range(1000):
        most = 0
        for _ in range(groups):  # a batch needs what its fullest group needs
            drawn = lengths[rng.integers(0, len(lengths), examples)]
            least = max(most, 1, *(-(-drawn.sum(0) // np.asarray(caps))).tolist())  # no packing beats this
            most = next(r for r in range(least, examples + 1) if first_fit(drawn, r, caps))
        need.append(most)
    sizes = (int(np.percentile(need, 60)), max(need))
    return tuple(sorted({min(-(-r // multiple) * multiple, examples) for r in sizes}))


def packer_for(rows: Any, layout: Layout, host_batch: int, sides: tuple[Side, ...] | None = None) -> Packer:
    """A packer of host batches of `rows` (with `lengths` and `seq_len`, or with several sides
    `lengths` [examples, sides] and `capacities`), in the groups of `layout`, at sizes measured
    on the rows' lengths."""
    devices = jax.local_device_count()
    # under jit (one block) the batch's rows (rows per group x microbatches) split over the devices
    k = layout.microbatches
    multiple = 1 if layout.blocks > 1 else devices // math.gcd(devices, k)
    caps = list(getattr(rows, "capacities", [rows.seq_len]))
    sizes = packed_sizes(rows.lengths, caps, host_batch // layout.count, multiple, layout.count)
    return Packer(sizes, layout) if sides is None else Packer(sizes, layout, sides)
