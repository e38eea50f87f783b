"""Model FLOPs, counted analytically from the config: what MFU divides by.

Only matrix multiplies count (2 FLOPs a multiply-add), as in the PaLM paper's MFU: dense layers,
attention scores and their weighted sums, and output layers. Embedding lookups, norms,
activations and softmax are left out. A training step is three forward passes (the backward pass
is two: gradients of activations and of weights); recomputation under `model.remat` is not model
work and is not counted.

Attention is counted as computed: XLA's kernel computes every query-key score of a row, masked
or not, so a causal mask costs as much as a bidirectional one; cuDNN's causal kernel skips the
blocks above the diagonal, about half.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.models.layers import attention_backend, dtype_of

TRAIN_PASSES = 3  # forward + backward (activation and weight gradients)


def dense(tokens: float, d_in: int, d_out: int) -> float:
    """FLOPs of `tokens` rows through a [d_in, d_out] matrix."""
    return 2.0 * tokens * d_in * d_out


def attention_share(cfg: ModelConfig, causal: bool) -> float:
    """Share of a row's query-key pairs the configured attention kernel computes."""
    kernel = attention_backend(cfg.attention_impl, dtype_of(cfg), cfg.head_size)
    return 0.5 if causal and kernel == "cudnn" else 1.0


def blocks(cfg: ModelConfig, batch: int, seq_len: int, causal: bool, layers: int | None = None) -> float:
    """Forward FLOPs of the Transformer blocks over `batch` rows of `seq_len` tokens.

    Per layer: query, key, value and output projections (keys and values over the KV heads only,
    under grouped-query attention), the MLP's two matrices (three with a gated `mlp`), and
    attention's scores (q k^T) and weighted values, each [length, length] x head dims over all
    query heads. `layers` defaults to `cfg.num_layers`.
    """
    tokens = batch * seq_len
    mlp = cfg.mlp_dim or 4 * cfg.embed_dim
    q_width = cfg.head_size * cfg.num_heads
    kv_width = cfg.head_size * (cfg.num_kv_heads or cfg.num_heads)
    projections = 2 * dense(tokens, cfg.embed_dim, q_width) + 2 * dense(tokens, cfg.embed_dim, kv_width)
    feed_forward = (3 if cfg.mlp in ("swiglu", "geglu") else 2) * dense(tokens, cfg.embed_dim, mlp)
    scores = 2 * 2.0 * batch * seq_len * seq_len * q_width * attention_share(cfg, causal)
    return (layers or cfg.num_layers) * (projections + feed_forward + scores)


def cross_attention(cfg: ModelConfig, batch: int, source_len: int, target_len: int) -> float:
    """Forward FLOPs of one decoder layer's cross-attention: query and output projections of the
    target, key and value projections of the source, and the [target, source] scores and
    weighted values."""
    q_width = cfg.head_size * cfg.num_heads
    kv_width = cfg.head_size * (cfg.num_kv_heads or cfg.num_heads)
    return (2 * dense(batch * target_len, cfg.embed_dim, q_width) + 2 * dense(batch * source_len, cfg.embed_dim, kv_width)
            + 2 * 2.0 * batch * target_len * source_len * q_width)


def copy_head(cfg: ModelConfig, batch: int, source_len: int, target_len: int) -> float:
    """Forward FLOPs of `copy_attention`: query and key projections, one head's [target, source]
    scores over the full width, and the weights summed into the vocabulary."""
    return (dense(batch * target_len, cfg.embed_dim, cfg.embed_dim) + dense(batch * source_len, cfg.embed_dim, cfg.embed_dim)
            + 2.0 * batch * target_len * source_len * cfg.embed_dim + batch * target_len * source_len)


def train_step(forward: float) -> float:
    """Model FLOPs of a training step whose forward pass costs `forward`."""
    return TRAIN_PASSES * forward
