"""Faster random numbers for training on CPUs.

JAX lowers its Threefry hash (every `jax.random` draw: dropout masks, masked-LM masks) to a rolled
loop on CPUs, to compile faster, and to straight-line code on GPUs and TPUs. On a CPU the loop
keeps XLA from fusing the hash's rounds: each of its five iterations reads and writes the whole
array of counters, so a dropout mask costs several passes over memory. With BERT's dropout 0.1
that was 13-16% of a MiniLM fine-tuning step (see docs/benchmarks.md). `use_unrolled_threefry`
registers the straight-line lowering for CPUs too: the same bits, a few seconds more compile.
"""

from __future__ import annotations

import warnings


def use_unrolled_threefry() -> bool:
    """Lowers Threefry on CPUs as on accelerators; returns False (and changes nothing) where this
    JAX version does not have the internals it needs."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32
        rule = threefry2x32._threefry2x32_lowering_rule  # the straight-line lowering
        mlir.register_lowering(threefry2x32.threefry2x32_p, rule, platform="cpu")
    except (ImportError, AttributeError) as e:  # a JAX that moved them: keep its own lowering
        warnings.warn(f"jaxlm: JAX's CPU lowering of random numbers is left as it is ({e})", stacklevel=2)
        return False
    return True
