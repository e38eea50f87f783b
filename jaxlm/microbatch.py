"""How a batch splits into the groups a train step sees whole, defined once.

A step sees its batch as `blocks` contiguous blocks (one per device under `jax.pmap`, one under
`jax.jit`), each split into `microbatches` interleaved microbatches (gradient accumulation):
microbatch i of a block holds its rows i, i + k, i + 2k, ... The step splits arrays this way
(`split`), and packers that place several examples in a row group them the same way (`groups`,
`row`), so an example never straddles two microbatches or devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """`blocks` blocks of `microbatches` interleaved microbatches (see the module docstring)."""

    blocks: int = 1
    microbatches: int = 1

    @property
    def count(self) -> int:
        """Groups in a batch: one per microbatch of each block."""
        return self.blocks * self.microbatches

    def groups(self, count: int) -> list[np.ndarray]:
        """Indices of each group's items among `count`, in the order the step sees the groups."""
        per_block, k = count // self.blocks, self.microbatches
        return [d * per_block + np.arange(i, per_block, k) for d in range(self.blocks) for i in range(k)]

    def row(self, group: int, r: int, rows_per_group: int) -> int:
        """The batch row that holds row `r` of group `group` (groups of `rows_per_group` rows)."""
        block, i = divmod(group, self.microbatches)
        return block * rows_per_group * self.microbatches + r * self.microbatches + i

    def split(self, x):
        """[rows, ...] -> [microbatches, rows / microbatches, ...] of one block (jnp or np).

        Microbatch i takes rows i, i + k, ...: on a sharded batch each device's rows stay on it.
        """
        k = self.microbatches
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
