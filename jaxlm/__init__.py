"""jaxlm: Transformer language models in JAX/Flax, one sharded code path from CPU to pods."""

from jaxlm.xla_cpu import use_unrolled_threefry

__version__ = "0.1.0"

use_unrolled_threefry()
