"""Attention kernels against the reference math on packed and padded batches.

XLA's kernel and the chunked CPU kernel run everywhere; cuDNN's only on a GPU (`bash bench/gpu.sh`
runs this file there first). Each kernel must respect segment ids (packed documents never see
each other), padding (segment 0 is never attended to) and causality, and give padding queries
finite outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import chunked_attention
from jaxlm.models.layers import attention, make_attention_mask

IMPLS = ["xla", "chunked", pytest.param("cudnn", marks=pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU"))]
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


@pytest.fixture(autouse=True)
def float32_matmuls_in_float32():
    """GPUs multiply float32 matrices in TensorFloat-32 (10-bit mantissas) by default, which is
    not the float32 math these tolerances check; CPUs already multiply in float32."""
    with jax.default_matmul_precision("highest"):
        yield


def packed_and_padded(rows: int = 2, length: int = 128, heads: int = 4, head_dim: int = 64, seed: int = 0):
    """q, k, v [rows, length, heads, head_dim] and segment ids: row 0 packs three documents and
    ends in padding; row 1 is one document and more padding."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((rows, length, heads, head_dim)).astype(np.float32) for _ in range(3))
    segments = np.zeros((rows, length), np.int32)
    segments[0, :40], segments[0, 40:90], segments[0, 90:120] = 1, 2, 3
    segments[1, :70] = 1
    return q, k, v, segments


def reference(q, k, v, segments, causal: bool) -> np.ndarray:
    """Softmax attention in float64 over the keys each query may see (zeros where none)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    index = np.arange(q.shape[1])
    visible = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
    if causal:
        visible &= index[None, None, :] <= index[None, :, None]
    scores = np.where(visible[:, None], scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0))
    weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_the_reference_on_packed_and_padded_rows(impl, dtype, causal):
    if impl == "cudnn" and dtype == "float32":
        pytest.skip("cuDNN's fused attention takes 16-bit inputs")
    q, k, v, segments = packed_and_padded()
    index = jnp.arange(q.shape[1])
    # as the models call it: causal masks go to the kernel as is_causal, segments as the mask
    mask = make_attention_mask(jnp.asarray(segments), jnp.asarray(segments), index, index, causal=False)
    cast = lambda x: jnp.asarray(x, jnp.dtype(dtype))  # noqa: E731
    out = jax.jit(lambda q, k, v, m: attention(q, k, v, m, impl, is_causal=causal))(cast(q), cast(k), cast(v), mask)
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all()  # padding queries see no key and still get finite outputs
    real = segments != 0
    want = reference(q, k, v, segments, causal)
    err = np.abs(out - want)[real].max()
    assert err < TOLERANCE[dtype], f"{impl} {dtype} causal={causal}: max error {err:.2e}"
    # the mask matters: attending across documents would be far off
    crossed = reference(q, k, v, np.where(real, 1, 0), causal)
    assert np.abs(crossed - want)[real].max() > 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias_rows", [0, 1, 4])
def test_chunked_attention_gradients_equal_xlas(monkeypatch, causal, bias_rows):
    """The chunked kernel's own backward pass (probabilities recomputed from the saved row
    statistics) gives XLA's gradients for queries, keys, values and the score bias, over
    several chunks, with grouped-query heads, packed and padded rows."""
    monkeypatch.setattr(chunked_attention, "CACHE_BYTES", 2 * 4 * 128 * 128 * 4)  # two rows a chunk: 2 chunks
    q, k, v, segments = packed_and_padded(rows=4, heads=4, head_dim=16)
    segments[2, :100], segments[3] = 1, 1  # two more rows: padded, and full
    k, v = k[:, :, :2], v[:, :, :2]  # two key heads, each serving two query heads
    rng = np.random.default_rng(1)
    bias = rng.standard_normal((bias_rows, 4, 128, 128)).astype(np.float32) if bias_rows else None
    weights = rng.standard_normal(q.shape).astype(np.float32)
    index = jnp.arange(q.shape[1])
    mask = make_attention_mask(jnp.asarray(segments), jnp.asarray(segments), index, index, causal=False)

    def outputs_and_grads(impl):
        def f(q, k, v, bias):
            out = attention(q, k, v, mask, impl, is_causal=causal, bias=bias)
            return (out * weights).sum(), out
        grad = jax.grad(f, argnums=(0, 1, 2, 3) if bias_rows else (0, 1, 2), has_aux=True)
        return jax.jit(grad)(q, k, v, bias)

    (want_grads, want), (got_grads, got) = outputs_and_grads("xla"), outputs_and_grads("chunked")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for name, g, w in zip(("q", "k", "v", "bias"), got_grads, want_grads):
        assert np.abs(np.asarray(w)).max() > 0.1, name  # a gradient that is there to compare
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=name)


def test_chunks_fit_the_cache_and_divide_the_batch():
    # a MiniLM reader's row (12 heads x 256 x 256 float32 scores) is 3 MB: one row a chunk
    assert chunked_attention.rows_per_chunk(16, 12, 256, 256) == 1
    # 196 KB a row at length 64: five fit, four divide 32
    assert chunked_attention.rows_per_chunk(32, 12, 64, 64) == 4
    assert chunked_attention.rows_per_chunk(7, 1, 8, 8) == 7  # a small batch is one chunk
