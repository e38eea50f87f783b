"""jaxlm: Transformer language models in JAX/Flax, one sharded code path from CPU to pods."""

__version__ = "0.1.0"
