"""BERT-style encoder (post-LN) and its heads: masked LM (tied), next-sentence, classification,
answer spans.

The layout follows BERT so Hugging Face weights map one to one: token + position + token-type
embeddings and a LayerNorm, blocks of `x = norm(x + attention(x)); x = norm(x + mlp(x))`, and a
pooler (dense + tanh over the first token) under `encoder`. Heads live beside `encoder`, so a
fine-tuning run loads the `encoder` subtree of a pretraining run.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.layers import (
    ACTIVATIONS,
    Dense,
    Mlp,
    Norm,
    SelfAttention,
    constrain,
    embed,
    stack,
)

Array = jax.Array


class EncoderBlock(nn.Module):
    """x = norm(x + attn(x)); x = norm(x + mlp(x)) (bidirectional within each segment)."""

    cfg: ModelConfig
    deterministic: bool = True
    scanned: bool = False  # under nn.scan: return (carry, None)

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array | tuple[Array, None]:
        h = SelfAttention(self.cfg, causal=False, name="attention")(
            x, segment_ids, positions, deterministic=self.deterministic)
        x = Norm(self.cfg, name="ln_attention")(x + h)
        x = Norm(self.cfg, name="ln_mlp")(x + Mlp(self.cfg, name="mlp")(x, self.deterministic))
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, length, embed]
        return (x, None) if self.scanned else x


class Encoder(nn.Module):
    """Token ids -> hidden states [batch, length, embed] and pooled first tokens [batch, embed].

    `segment_ids` (0 = padding) keep packed documents and padding apart; `token_types` are
    BERT's sentence A/B ids.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, token_types: Array, segment_ids: Array, positions: Array,
                 deterministic: bool = True, pool_at: Array | None = None) -> tuple[Array, Array]:
        """pool_at: [examples] flat indices (row * length + position) of the tokens to pool, for
        rows that pack several examples; default: the first token of every row."""
        cfg = self.cfg
        x = embed(cfg.vocab_size, cfg, ("vocab", "embed"), "token_embed")(tokens)
        x = x + embed(cfg.type_vocab_size, cfg, (None, "embed"), "type_embed")(token_types)
        if cfg.positions == "learned":
            x = x + embed(cfg.max_len, cfg, (None, "embed"), "position_embed")(positions)
        x = Norm(cfg, name="ln_embed")(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, length, embed]
        x = stack(EncoderBlock, cfg, x, segment_ids, positions, deterministic=deterministic)
        first = x[:, 0] if pool_at is None else x.reshape(-1, x.shape[-1])[pool_at]
        pooled = jnp.tanh(Dense((cfg.embed_dim,), ("embed", None), cfg, name="pooler")(first))
        return x, pooled  # [batch, length, embed], [batch or examples, embed]


def token_table(encoder: Encoder) -> Array:
    """The encoder's word-embedding table [vocab, embed] (for tied output layers)."""
    return nn.meta.unbox(encoder.variables["params"]["token_embed"]["embedding"])


class EncoderMLM(nn.Module):
    """Masked-LM (and optionally next-sentence) pretraining model.

    The vocabulary projection runs only on the `masked` positions (gathered first), not on
    every token: [batch, predictions, vocab] instead of [batch, length, vocab].
    """

    cfg: ModelConfig
    nsp: bool = False

    @nn.compact
    def __call__(self, tokens: Array, token_types: Array, segment_ids: Array, positions: Array,
                 masked: Array, deterministic: bool = True) -> tuple[Array, Array | None]:
        """Returns float32 MLM logits [batch, predictions, vocab] and NSP logits [batch, 2] (or None).

        Args:
          masked: [batch, predictions] indices of the positions to predict.
        """
        cfg = self.cfg
        encoder = Encoder(cfg, name="encoder")
        hidden, pooled = encoder(tokens, token_types, segment_ids, positions, deterministic)
        picked = jnp.take_along_axis(hidden, masked[:, :, None], axis=1)  # [batch, predictions, embed]
        h = Dense((cfg.embed_dim,), ("embed", None), cfg, name="mlm_transform")(picked)
        h = Norm(cfg, name="mlm_ln")(ACTIVATIONS[cfg.activation](h))
        bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (cfg.vocab_size,), jnp.float32)
        logits = h.astype(jnp.float32) @ token_table(encoder).T.astype(jnp.float32) + bias
        logits = constrain(logits, ("batch", None, "act_vocab"))  # [batch, predictions, vocab]
        nsp_logits = None
        if self.nsp:
            nsp_logits = Dense((2,), ("embed", None), cfg, name="nsp")(pooled).astype(jnp.float32)
        return logits, nsp_logits


class EncoderClassifier(nn.Module):
    """Sequence classification: dropout + dense over the pooled first token of each example.

    Rows may pack several examples (apart by segment ids); `pool_at` then says where each
    example's first token is.
    """

    cfg: ModelConfig
    num_labels: int

    @nn.compact
    def __call__(self, tokens: Array, token_types: Array, segment_ids: Array, positions: Array,
                 deterministic: bool = True, pool_at: Array | None = None) -> Array:
        """Returns float32 logits [batch (or examples), num_labels]."""
        _, pooled = Encoder(self.cfg, name="encoder")(tokens, token_types, segment_ids, positions,
                                                       deterministic, pool_at)
        pooled = nn.Dropout(self.cfg.dropout)(pooled, deterministic=deterministic)
        return Dense((self.num_labels,), ("embed", None), self.cfg, name="classifier")(pooled).astype(jnp.float32)


class EncoderQA(nn.Module):
    """Extractive question answering: a start and an end logit for every token (a dense layer
    of width 2 over the hidden states, as Hugging Face's `BertForQuestionAnswering`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, token_types: Array, segment_ids: Array, positions: Array,
                 deterministic: bool = True) -> tuple[Array, Array]:
        """Returns float32 start and end logits, each [batch, length]."""
        hidden, _ = Encoder(self.cfg, name="encoder")(tokens, token_types, segment_ids, positions,
                                                      deterministic)
        logits = Dense((2,), ("embed", None), self.cfg, name="qa_outputs")(hidden).astype(jnp.float32)
        return logits[..., 0], logits[..., 1]
