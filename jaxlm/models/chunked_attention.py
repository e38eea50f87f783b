"""Attention a few batch rows at a time, with its own gradient: the CPU kernel.

XLA computes `jax.nn.dot_product_attention` as whole-batch passes over the scores
[batch, heads, q, k]: scores, mask, max, exponentials, sum, normalisation, then as many passes
again in the backward pass, each one a trip through memory (50 MB an array for a MiniLM reader's
16 x 12 x 256 x 256). Here a loop takes a few batch rows at a time, so their scores (about 1 MB)
stay in the CPU's cache from the first pass to the last, and the backward pass recomputes the
probabilities from the saved row maxima and sums (flash attention's recomputation) instead of
reading stored ones. On the MiniLM reader's shapes one layer's forward and backward took
0.10 s against XLA's 0.20 s (`bench/attention.py`, `docs/benchmarks.md`); on short rows
(64-128 tokens), whose scores fit in cache anyway, the two are even.

The loop runs over batch rows, so it is meant for one device (or data sharded over devices whose
rows split evenly into the chunks); on accelerators XLA's kernel or cuDNN's fused one is the
right choice (`layers.attention_backend`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CACHE_BYTES = 1 << 20  # float32 scores a chunk of rows may hold: about a core's L2 cache


def rows_per_chunk(batch: int, heads: int, q_len: int, k_len: int) -> int:
    """The largest divisor of `batch` whose rows' scores fit in `CACHE_BYTES` (at least 1)."""
    fit = max(1, CACHE_BYTES // max(heads * q_len * k_len * 4, 1))  # no queries (a primed cache): one chunk
    return max(c for c in range(1, min(fit, batch) + 1) if batch % c == 0)


def attention(q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float,
              is_causal: bool) -> Array:
    """Softmax attention, equal to `jax.nn.dot_product_attention`'s XLA kernel.

    Args:
      q: [batch, q, heads, head_dim]; k, v: [batch, k, kv_heads, head_dim] (kv_heads divides heads).
      mask: booleans broadcastable to [batch, 1, q, k]. A query with no visible key attends to
        every key evenly (as XLA's kernel does), so its output is finite.
      bias: added to the scores, [1 or batch, heads, q, k], or None.
      scale: the scores' multiplier.
      is_causal: also mask keys after each query (queries and keys aligned at slot 0).
    """
    batch, q_len, heads, _ = q.shape
    k_len = k.shape[1]
    if k.shape[2] != heads:  # grouped-query attention: each key head serves heads / kv_heads queries
        k, v = (jnp.repeat(x, heads // x.shape[2], axis=2) for x in (k, v))
    mask = jnp.broadcast_to(mask, (batch, 1, q_len, k_len))
    if is_causal:
        mask = mask & (jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None])
    head_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [batch, heads, length, head_dim]
    out = _attention(head_major(q), head_major(k), head_major(v), mask, bias, scale)
    return head_major(out)


def _chunks(x: Array, c: int) -> Array:
    """[batch, ...] -> [batch / c, c, ...]: the loop's steps, `c` rows each. Step i takes rows
    i, i + batch / c, ...: rows sharded in contiguous blocks over devices stay on their device
    wherever batch / c divides a device's rows."""
    return jnp.swapaxes(x.reshape(c, x.shape[0] // c, *x.shape[1:]), 0, 1)


def _unchunk(x: Array) -> Array:
    """The inverse of `_chunks`: [batch / c, c, ...] -> [batch, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _scores(q: Array, k: Array, mask: Array, bias: Array | None, scale: float) -> Array:
    """Masked float32 scores [rows, heads, q, k]; masked keys get XLA's large negative."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    return jnp.where(mask, s, 0.7 * float(np.finfo(np.float32).min))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float) -> Array:
    """q, k, v: [batch, heads, length, head_dim]; mask [batch, 1, q, k]."""
    return _forward(q, k, v, mask, bias, scale)[0]


def _plan(q: Array, k: Array, bias: Array | None) -> tuple[int, bool, Array | None]:
    """Rows a chunk, whether the bias is one for all rows (or none), and a per-row bias in chunks."""
    c = rows_per_chunk(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    shared_bias = bias is None or bias.shape[0] == 1
    return c, shared_bias, None if shared_bias else _chunks(bias, c)


def _forward(q, k, v, mask, bias, scale):
    c, shared_bias, per_row_bias = _plan(q, k, bias)

    def chunk(args):
        q, k, v, mask, b = args
        s = _scores(q, k, mask, bias if shared_bias else b, scale)
        top = s.max(-1, keepdims=True)
        e = jnp.exp(s - top)
        inv = 1 / e.sum(-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", (e * inv).astype(v.dtype), v)
        return out, jnp.concatenate([top, inv], -1)  # the row statistics the backward pass needs

    out, stats = jax.lax.map(chunk, (*(_chunks(x, c) for x in (q, k, v, mask)), per_row_bias))
    out, stats = _unchunk(out), _unchunk(stats)  # [batch, heads, q, head_dim], [batch, heads, q, (max, 1 / sum)]
    return out, (q, k, v, mask, bias, out, stats)


def _backward(scale, residuals, d_out):
    q, k, v, mask, bias, out, stats = residuals
    c, shared_bias, per_row_bias = _plan(q, k, bias)
    # d(softmax) needs each query's sum over keys of p * dp, which equals d_out . out
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)  # [batch, heads, q, 1]

    def chunk(d_bias, args):
        q, k, v, mask, b, d_out, stats, delta = args
        p = jnp.exp(_scores(q, k, mask, bias if shared_bias else b, scale) - stats[..., :1]) * stats[..., 1:]
        d_v = jnp.einsum("bhqk,bhqd->bhkd", p.astype(d_out.dtype), d_out)
        d_p = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
        d_s = jnp.where(mask, p * (d_p - delta), 0.0)  # [rows, heads, q, k]; masked scores are constants
        if shared_bias and bias is not None:
            d_bias = d_bias + d_s.sum(0, keepdims=True)
        d_qk = (d_s * scale).astype(q.dtype)
        d_q = jnp.einsum("bhqk,bhkd->bhqd", d_qk, k)
        d_k = jnp.einsum("bhqk,bhqd->bhkd", d_qk, q)
        return d_bias, (d_q, d_k, d_v, None if shared_bias else d_s)

    chunks = (*(_chunks(x, c) for x in (q, k, v, mask)), per_row_bias,
              *(_chunks(x, c) for x in (d_out, stats, delta)))
    start = None if bias is None or not shared_bias else jnp.zeros(bias.shape, jnp.float32)
    d_bias, (d_q, d_k, d_v, d_row_bias) = jax.lax.scan(chunk, start, chunks)
    if bias is not None:
        d_bias = (d_bias if shared_bias else _unchunk(d_row_bias)).astype(bias.dtype)
    return _unchunk(d_q), _unchunk(d_k), _unchunk(d_v), None, d_bias


_attention.defvjp(_forward, _backward)
