"""Random streams, one per purpose, all from the run's seed.

Each purpose folds its own constant into the run's key, then the number that indexes it (the
step for dropout, the global row for masks), so no two purposes ever start from the same key:
dropout at step s and the masks of row s are unrelated draws.
"""

from __future__ import annotations

import jax

INIT, DROPOUT, MASKS, SAMPLING = 1, 2, 3, 4  # one constant per purpose; never reuse one

EVAL_SEED = 0  # eval draws (e.g. masked-LM masks) use this seed, whatever the run's seed


def stream(key: jax.Array, purpose: int, *index: jax.Array | int) -> jax.Array:
    """The key of `purpose` (one of the constants above) at `index` (e.g. the step)."""
    key = jax.random.fold_in(key, purpose)
    for i in index:
        key = jax.random.fold_in(key, i)
    return key
