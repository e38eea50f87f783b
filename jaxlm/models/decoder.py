"""GPT-style decoder-only causal language model (pre-LN)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.layers import Dense, Mlp, Norm, SelfAttention, constrain, dtype_of, embed, stack

Array = jax.Array


class DecoderBlock(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x))."""

    cfg: ModelConfig
    decode: bool = False
    deterministic: bool = True
    scanned: bool = False  # under nn.scan: return (carry, None)

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array | tuple[Array, None]:
        h = SelfAttention(self.cfg, causal=True, name="attention")(
            Norm(self.cfg, name="ln_attention")(x), segment_ids, positions, self.decode,
            self.deterministic)
        x = x + h
        x = x + Mlp(self.cfg, name="mlp")(Norm(self.cfg, name="ln_mlp")(x), self.deterministic)
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, length, embed]
        return (x, None) if self.scanned else x


class DecoderLM(nn.Module):
    """Causal LM: token ids -> next-token logits.

    Packed rows are described by `segment_ids` (0 = padding, 1.. = documents) and
    `positions` (index within each document); tokens never attend across documents.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None,
                 positions: Array | None = None, decode: bool = False,
                 deterministic: bool = True, hidden_only: bool = False) -> Array:
        """Returns float32 logits [batch, length, vocab].

        Args:
          tokens: [batch, length] int token ids.
          segment_ids: [batch, length]; default: one document per row.
          positions: [batch, length]; default: 0..length-1.
          decode: read and extend the KV cache (the `cache` collection must be mutable).
          deterministic: False enables dropout (needs a `dropout` rng).
          hidden_only: return the final hidden states [batch, length, embed] instead, for a
            loss that applies the output layer a slice at a time (`output_logits`).
        """
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        token_embed = embed(cfg.vocab_size, cfg, ("vocab", "embed"), "token_embed")
        x = token_embed(tokens)  # [batch, length, embed]
        if cfg.positions == "learned":
            x = x + embed(cfg.max_len, cfg, (None, "embed"), "position_embed")(positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "act_embed"))
        x = stack(DecoderBlock, cfg, x, segment_ids, positions, decode=decode,
                  deterministic=deterministic)
        x = Norm(cfg, name="ln_final")(x)
        if hidden_only:
            return x
        if cfg.tie_embeddings:
            logits = token_embed.attend(x)
        else:
            head_cfg = dataclasses.replace(cfg, use_bias=False)
            logits = Dense((cfg.vocab_size,), ("embed", "vocab"), head_cfg, name="lm_head")(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))


def output_logits(params: dict, hidden: Array, cfg: ModelConfig) -> Array:
    """The output layer of `DecoderLM` applied to hidden states [..., embed] -> float32 logits
    [..., vocab], from the model's parameters: the token embedding table (tied) or `lm_head`."""
    dtype = dtype_of(cfg)
    table = params["token_embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
    logits = jnp.dot(hidden.astype(dtype), table.astype(dtype))  # [..., vocab]
    return logits.astype(jnp.float32)
