"""Position encodings: T5's relative-position buckets and their score bias, the 2017
Transformer's sinusoids, and rotary positions (with Llama 3.1's rescaling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig

Array = jax.Array


def relative_bucket(distance: Array, bidirectional: bool, buckets: int, max_distance: int) -> Array:
    """T5's bucket of each key-minus-query distance: exact for short distances, logarithmic up
    to `max_distance`, then the last bucket; an encoder spends half the buckets on each side, a
    decoder looks back only."""
    out = jnp.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        out = out + (distance > 0) * buckets
        distance = jnp.abs(distance)
    else:
        distance = -jnp.minimum(distance, 0)
    exact = buckets // 2
    far = exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / np.log(max_distance / exact)
                   * (buckets - exact)).astype(distance.dtype)
    return out + jnp.where(distance < exact, distance, jnp.minimum(far, buckets - 1))


def relative_bias(table: Array, q_index: Array, k_index: Array, bidirectional: bool, cfg: ModelConfig) -> Array:
    """Attention-score bias [1, heads, q, k] of T5's relative positions from the bucket table
    [buckets, heads], for query slots `q_index` [q] and key slots `k_index` [k], in the table's
    dtype (the caller's compute dtype).

    The lookup is a contraction with the buckets' one-hot codes, not a gather: a gather's
    gradient is a scatter-add of every (query, key, head) into the table's few entries, which GPUs
    run as contended atomic updates (compare-and-swap loops in bfloat16), many times slower than
    this small matmul. One nonzero term a sum, so the values are the table's exactly."""
    bucket = relative_bucket(k_index[None, :] - q_index[:, None], bidirectional, cfg.relative_buckets,
                             cfg.relative_max_distance)  # [q, k]
    one_hot = jax.nn.one_hot(bucket, cfg.relative_buckets, dtype=table.dtype)  # [q, k, buckets]
    return jnp.einsum("qkb,bh->hqk", one_hot, table, precision=jax.lax.Precision.HIGHEST)[None]


def sinusoidal(positions: Array, dim: int) -> Array:
    """The 2017 Transformer's fixed position encodings [..., dim] of integer positions: sines of
    geometrically spaced frequencies in the first half, cosines in the second (as tensor2tensor)."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / max(half - 1, 1)).astype(np.float32)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [..., half]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rope_frequencies(cfg: ModelConfig, head_dim: int) -> np.ndarray:
    """The rotary angle per position of each of the head's `head_dim / 2` pairs [half]: the
    base's geometric series, rescaled as Llama 3.1 does under `rope_scaling=llama3` (long
    wavelengths slowed by `rope_factor`, short ones kept, the band between interpolated)."""
    half = head_dim // 2
    freqs = cfg.rope_base ** (-np.arange(half, dtype=np.float64) / half)
    if cfg.rope_scaling == "llama3":
        wavelen = 2 * np.pi / freqs
        low, high = cfg.rope_original_max_len / cfg.rope_low_freq_factor, cfg.rope_original_max_len / cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * freqs / cfg.rope_factor + smooth * freqs
        freqs = np.where(wavelen > low, freqs / cfg.rope_factor, np.where(wavelen < high, freqs, blended))
    return freqs.astype(np.float32)


def rotary(x: Array, positions: Array, freqs: np.ndarray) -> Array:
    """Rotary position embedding (half-split form) of x [batch, length, heads, head_dim], with
    the angle per position of each pair `freqs` [head_dim / 2] (`rope_frequencies`)."""
    half = x.shape[-1] // 2
    angles = positions[:, :, None].astype(jnp.float32) * jnp.asarray(freqs)  # [batch, length, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
