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


class Packer:
    """Packs a batch of encoded examples into as few rows as it can (first fit, longest first).

    Every `[examples, seq_len]` array of the batch is packed (an example's tokens are its first
    `segment_ids.sum()`); `segment_ids` and `positions` are rebuilt for the packed rows, a
    `pool_at` entry gives each example's first token as a flat index (row * seq_len + offset)
    into its group's rows (with one group, into the whole batch), and any other per-example
    array (e.g. `labels`) passes through. Batches take the first of `sizes` (rows per group)
    they fit in, else one example a row, so only a few shapes are ever compiled.

    Examples are packed in the groups of `layout` (`jaxlm.microbatch`), the groups the train
    step sees whole (one per microbatch of each pmap device).
    """

    def __init__(self, sizes: tuple[int, ...], layout: Layout = Layout()):
        self.sizes, self.layout = sizes, layout

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count, seq_len = batch["segment_ids"].shape
        lengths = batch["segment_ids"].astype(bool).sum(1)
        groups = self.layout.groups(count)
        for rows in (*self.sizes, len(groups[0])):  # one example a row always fits
            places = [first_fit(lengths[g], rows, seq_len) for g in groups]
            if all(places):
                break
        tokens = [k for k, v in batch.items() if v.shape == (count, seq_len) and k not in ("segment_ids", "positions")]
        out = {k: np.zeros((rows * len(groups), seq_len), batch[k].dtype)
               for k in (*tokens, "segment_ids", "positions")}
        pool_at = np.zeros(count, np.int32)
        for group, (g, group_places) in enumerate(zip(groups, places)):
            used = np.zeros(rows, np.int32)  # examples per row so far
            for e, (row, offset) in zip(g, group_places):
                n = lengths[e]
                if n == 0:
                    continue
                at = self.layout.row(group, row, rows)
                span = slice(offset, offset + n)
                for k in tokens:
                    out[k][at, span] = batch[k][e, :n]
                used[row] += 1
                out["segment_ids"][at, span] = used[row]
                out["positions"][at, span] = np.arange(n)
                pool_at[e] = row * seq_len + offset
        if "pool_at" in batch:
            out["pool_at"] = pool_at
        return {**{k: v for k, v in batch.items() if k not in out}, **out}


def first_fit(lengths: np.ndarray, rows: int, seq_len: int) -> list[tuple[int, int]]:
    """(row, offset) of each example, longest placed first; [] if they do not fit in `rows`."""
    fill = np.zeros(rows, np.int64)
    places = [(0, 0)] * len(lengths)
    for i in np.argsort(-lengths, kind="stable"):
        if lengths[i] == 0:
            continue
        free = np.nonzero(fill + lengths[i] <= seq_len)[0]
        if not len(free):
            return []
        places[i] = (int(free[0]), int(fill[free[0]]))
        fill[free[0]] += lengths[i]
    return places


def packed_sizes(lengths: np.ndarray, seq_len: int, examples: int, multiple: int = 1,
                 groups: int = 1) -> tuple[int, ...]:
    """Rows per group to pack `groups` groups of `examples` random examples of these token
    `lengths` into: a common size, then a roomy one.

    Measured by packing 1,000 random batches: the first size fits about 60% of batches, the
    second all of them; each size is one compiled shape, and a batch that fits neither gets one
    example a row. Sizes are rounded up to `multiple` (so the batch's rows split over the
    devices) and never exceed `examples`.
    """
    rng = np.random.default_rng(0)
    need = []
    for _ in range(1000):
        most = 0
        for _ in range(groups):  # a batch needs what its fullest group needs
            drawn = lengths[rng.integers(0, len(lengths), examples)]
            least = max(most, 1, -(-int(drawn.sum()) // seq_len))  # no packing beats this
            most = next(r for r in range(least, examples + 1) if first_fit(drawn, r, seq_len))
        need.append(most)
    sizes = (int(np.percentile(need, 60)), max(need))
    return tuple(sorted({min(-(-r // multiple) * multiple, examples) for r in sizes}))


def packer_for(rows: Any, layout: Layout, host_batch: int) -> Packer:
    """A packer of host batches of `rows` (with `lengths` and `seq_len`), in the groups of
    `layout`, at sizes measured on the rows' lengths."""
    devices = jax.local_device_count()
    # under jit (one block) the batch's rows (rows per group x microbatches) split over the devices
    k = layout.microbatches
    multiple = 1 if layout.blocks > 1 else devices // math.gcd(devices, k)
    return Packer(packed_sizes(rows.lengths, rows.seq_len, host_batch // layout.count, multiple, layout.count), layout)
