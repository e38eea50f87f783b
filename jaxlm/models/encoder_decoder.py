"""Encoder-decoder Transformers: T5 and the 2017 Transformer, one module with two layouts.

An encoder reads the source bidirectionally; a decoder reads the target causally and attends to
the encoder's outputs (cross-attention). `encode()` and `decode()` are callable apart, so a
source is encoded once and decoded token by token through a KV cache (the encoder's keys and
values for cross-attention are computed once per source, see `CrossAttention`).

The layouts are config choices:
- T5: `positions=relative` (a learned bias per bucket of query-key distance, one table per
  stack shared by its layers), `norm=rmsnorm`, `prenorm=true`, `use_bias=false`,
  `scale_attention=false`, `mlp=plain activation=relu` (v1.0, tied output with
  `tied_output_scale`) or `mlp=geglu` (v1.1, untied).
- 2017: `positions=sinusoidal` (or learned), `norm=layernorm`, `prenorm=false` (each sublayer's
  residual sum normalised), `scale_embeddings=true`, tied output.

Either may copy from its source (`copy_attention`, see `CopyHead`).

One token table serves the source, the target and (tied) the output layer. Packed rows on
either side carry segment ids (0 = padding); a target segment attends only to the source
segment of the same id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.models.layers import (
    CROSS_CACHE,
    CrossAttention,
    Dense,
    Mlp,
    Norm,
    SelfAttention,
    constrain,
    embed,
    make_attention_mask,
    param_init,
    per_source,
    stack,
)
from jaxlm.models.positions import sinusoidal

Array = jax.Array


def _residual(cfg: ModelConfig, x: Array, sublayer: Callable[[Array], Array], norm: str) -> Array:
    """x + sublayer(norm(x)) (pre-norm), or norm(x + sublayer(x)) (post-norm)."""
    if cfg.prenorm:
        return x + sublayer(Norm(cfg, name=norm)(x))
    return Norm(cfg, name=norm)(x + sublayer(x))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention within each segment, then the MLP."""

    cfg: ModelConfig
    deterministic: bool = True
    scanned: bool = False  # under nn.scan: return (carry, None)

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array, table: Array | None) -> Array | tuple:
        cfg, det = self.cfg, self.deterministic
        x = _residual(cfg, x, lambda h: SelfAttention(cfg, causal=False, name="attention")(
            h, segment_ids, positions, deterministic=det, relative_table=table), "ln_attention")
        x = _residual(cfg, x, lambda h: Mlp(cfg, name="mlp")(h, det), "ln_mlp")
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, source, embed]
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Causal self-attention (KV-cached when decoding), cross-attention, then the MLP."""

    cfg: ModelConfig
    decode: bool = False
    deterministic: bool = True
    scanned: bool = False

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array, table: Array | None,
                 encoded: Array | None, encoded_segments: Array | None) -> Array | tuple:
        cfg, det = self.cfg, self.deterministic
        x = _residual(cfg, x, lambda h: SelfAttention(cfg, causal=True, name="attention")(
            h, segment_ids, positions, self.decode, det, relative_table=table), "ln_attention")
        x = _residual(cfg, x, lambda h: CrossAttention(cfg, name="cross_attention")(
            h, segment_ids, encoded, encoded_segments, self.decode, det), "ln_cross_attention")
        x = _residual(cfg, x, lambda h: Mlp(cfg, name="mlp")(h, det), "ln_mlp")
        x = constrain(x, ("batch", "length", "act_embed"))  # [batch, target, embed]
        return (x, None) if self.scanned else x


class Stack(nn.Module):
    """`cfg.num_layers` layers, T5's relative-position table (if any) and, pre-norm, a final norm."""

    cfg: ModelConfig
    layer: type[nn.Module]

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array, *context: Array | None,
                 **fields) -> Array:
        cfg = self.cfg
        table = None
        if cfg.positions == "relative":
            table = self.param("relative_bias", param_init(nn.initializers.normal(cfg.embed_dim ** -0.5),
                                                           (None, "heads")), (cfg.relative_buckets, cfg.num_heads),
                               jnp.float32)  # [buckets, heads]
        x = stack(self.layer, cfg, x, segment_ids, positions, table, *context, **fields)
        return Norm(cfg, name="ln_final")(x) if cfg.prenorm else x


def token_std(cfg: ModelConfig) -> float:
    """The token table's initial scale, as each layout draws it: T5 keeps unit-variance
    embeddings (its tied output scales hidden states down by embed_dim ** -0.5 instead), the
    2017 Transformer draws them at embed_dim ** -0.5 and scales them up by sqrt(embed_dim);
    otherwise 0.02. At 0.02, T5's scaled tied output starts with logits of about 0.02 and
    learns for hundreds of steps before it leaves the unigram distribution."""
    if cfg.init == "normal_flat":
        return 0.02
    if cfg.tie_embeddings and cfg.tied_output_scale:
        return 1.0
    return cfg.embed_dim ** -0.5 if cfg.scale_embeddings else 0.02


COPY_CACHE = ("copy_key", "source", "source_segments")  # what `CopyHead` keeps per source
# cache entries that are the same for every beam of a source: beam search never reorders them
PER_SOURCE = frozenset(CROSS_CACHE + COPY_CACHE)


class CopyHead(nn.Module):
    """Copying from the source, as a pointer-generator (See et al., 2017): each target position
    attends once more to the encoder's outputs, and its next-token distribution becomes
    `gate * softmax(logits) + (1 - gate) * copy`, where `copy` sums that attention's weights per
    source token id and `gate` is learned from the decoder's state. A summary can then name what
    the model has never seen (a package, a program), which a vocabulary alone learns only by
    heart. Decoding keeps the source's keys, ids and segment ids in the cache, as
    `CrossAttention` keeps its keys and values.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array, segment_ids: Array, logits: Array, encoded: Array | None,
                 encoded_segments: Array | None, source: Array | None, decode: bool = False) -> Array:
        """Log-probabilities [batch, target, vocab] (float32) from the decoder's final states
        `hidden` [batch, target, embed], their `logits` [batch, target, vocab] and the source's
        ids `source` [batch, source] (None with `encoded`: read from the cache)."""
        cfg = self.cfg
        project = partial(Dense, (cfg.embed_dim,), ("embed", "mlp"), cfg, bias=False)
        keys, source, encoded_segments = per_source(  # keys [batch, source, embed]
            self, COPY_CACHE,
            None if encoded is None else (project(name="key")(encoded), source, encoded_segments), decode)
        queries = project(name="query")(hidden)  # [batch, target, embed]
        scores = jnp.einsum("bte,bse->bts", queries, keys).astype(jnp.float32) * np.float32(cfg.embed_dim ** -0.5)
        mask = make_attention_mask(segment_ids, encoded_segments, jnp.arange(hidden.shape[1]),
                                   jnp.arange(keys.shape[1]), causal=False)[:, 0]
        weights = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min))  # [batch, target, source]
        # each row's weights summed per source token id: [batch, target, vocab]
        copy = jax.vmap(lambda w, ids: jnp.zeros((w.shape[0], logits.shape[-1]), w.dtype).at[:, ids].add(w))(
            weights, source)
        gate = Dense((1,), ("embed", None), cfg, bias=True, name="gate")(hidden).astype(jnp.float32)  # [batch, target, 1]
        copied = copy > 0
        log_copy = jnp.where(copied, jnp.log(jnp.where(copied, copy, 1.0)), -jnp.inf)
        return jnp.logaddexp(jax.nn.log_sigmoid(gate) + jax.nn.log_softmax(logits),
                             jax.nn.log_sigmoid(-gate) + log_copy)


class EncoderDecoder(nn.Module):
    """Source ids -> encoder states; target ids and encoder states -> next-token logits."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.token_embed = embed(cfg.vocab_size, cfg, ("vocab", "embed"), std=token_std(cfg))
        if cfg.positions == "learned":
            self.source_position_embed = embed(cfg.max_len, cfg, (None, "embed"))
            self.target_position_embed = embed(cfg.max_len, cfg, (None, "embed"))
        self.encoder = Stack(cfg, EncoderLayer)
        self.decoder = Stack(dataclasses.replace(cfg, num_layers=cfg.decoder_layers or cfg.num_layers), DecoderLayer)
        if not cfg.tie_embeddings:
            self.lm_head = Dense((cfg.vocab_size,), ("embed", "vocab"), dataclasses.replace(cfg, use_bias=False))
        if cfg.copy_attention:
            self.copy_head = CopyHead(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, tokens: Array, positions: Array, table: str, deterministic: bool) -> Array:
        cfg = self.cfg
        x = self.token_embed(tokens)  # [batch, length, embed]
        if cfg.scale_embeddings:
            x = x * np.float32(np.sqrt(cfg.embed_dim)).astype(x.dtype)
        if cfg.positions == "learned":
            x = x + getattr(self, f"{table}_position_embed")(positions)
        elif cfg.positions == "sinusoidal":
            x = x + sinusoidal(positions, cfg.embed_dim).astype(x.dtype)
        return constrain(self.dropout(x, deterministic=deterministic), ("batch", "length", "act_embed"))

    def encode(self, tokens: Array, segment_ids: Array, positions: Array, deterministic: bool = True) -> Array:
        """Encoder states [batch, source, embed] of source ids [batch, source]."""
        x = self._embed(tokens, positions, "source", deterministic)
        return self.encoder(x, segment_ids, positions, deterministic=deterministic)

    def decode(self, tokens: Array, segment_ids: Array, positions: Array, encoded: Array | None,
               encoded_segments: Array | None, decode: bool = False, deterministic: bool = True,
               source: Array | None = None) -> Array:
        """Float32 logits [batch, target, vocab] of target ids [batch, target] (the decoder's
        inputs: the start token, then the target shifted right); with `copy_attention`,
        log-probabilities (logits to any softmax).

        Args:
          encoded, encoded_segments: `encode`'s states and the source's segment ids; with
            `decode=True`, None reads the encoder's keys and values from the cache, which a
            call with them (and no target tokens) fills.
          decode: read and extend the KV cache (the `cache` collection must be mutable).
          source: the source's ids [batch, source], which `copy_attention` copies from; given
            with `encoded`.
        """
        x = self._embed(tokens, positions, "target", deterministic)
        x = self.decoder(x, segment_ids, positions, encoded, encoded_segments, decode=decode,
                         deterministic=deterministic)
        logits = self.output(x)
        if self.cfg.copy_attention:
            logits = self.copy_head(x, segment_ids, logits, encoded, encoded_segments, source, decode)
        return logits

    def output(self, hidden: Array) -> Array:
        """The output layer: hidden states [..., embed] -> float32 logits [..., vocab]."""
        cfg = self.cfg
        if not cfg.tie_embeddings:
            logits = self.lm_head(hidden)
        else:
            if cfg.tied_output_scale:
                hidden = hidden * np.float32(cfg.embed_dim ** -0.5).astype(hidden.dtype)
            logits = self.token_embed.attend(hidden)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, inputs: Array, input_segments: Array, input_positions: Array, targets_in: Array,
                 target_segments: Array, target_positions: Array, deterministic: bool = True) -> Array:
        """Teacher-forced logits [batch, target, vocab]: `decode` over `encode`."""
        encoded = self.encode(inputs, input_segments, input_positions, deterministic)
        return self.decode(targets_in, target_segments, target_positions, encoded, input_segments,
                           deterministic=deterministic, source=inputs)


def decoding_cache(model: EncoderDecoder, params: dict, inputs: Array, input_segments: Array,
                   input_positions: Array, target_len: int) -> dict:
    """A decoding cache for `target_len` target positions, primed for these sources: each
    decoder layer holds the encoder's keys and values, its self-attention slots are empty."""
    batch = inputs.shape[0]
    encoded = model.apply({"params": params}, inputs, input_segments, input_positions, method="encode")
    target = jnp.ones((batch, target_len), jnp.int32)
    shape = jax.eval_shape(partial(model.init, method="decode", decode=True, source=inputs), jax.random.key(0),
                           target, target, target, encoded, input_segments)["cache"]
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    none = jnp.zeros((batch, 0), jnp.int32)  # no target tokens: only the cross-attention entries are written
    _, primed = model.apply({"params": params, "cache": cache}, none, none, none, encoded, input_segments,
                            decode=True, source=inputs, method="decode", mutable=["cache"])
    return primed["cache"]


def cache_batch_axes(cfg: ModelConfig, cache: dict) -> dict:
    """The batch axis of each part of a decoding cache: 1 in the decoder's when its layers are
    scanned (a leading layer axis), 0 elsewhere (the copy head's)."""
    return {part: int(cfg.scan_layers and part == "decoder") for part in cache}


def cached_logits(model: EncoderDecoder, params: dict, vocab: int) -> Callable:
    """`decoding`'s `tokens_to_logits` through a cache from `decoding_cache`. Ids from `vocab` up
    (the table's padding beyond the tokenizer's vocabulary) are never chosen."""

    def tokens_to_logits(tokens, segment_ids, positions, cache):
        logits, updated = model.apply({"params": params, "cache": cache}, tokens, segment_ids, positions, None, None,
                                      decode=True, method="decode", mutable=["cache"])
        real = jnp.arange(logits.shape[-1]) < vocab  # [vocab]
        return jnp.where(real, logits, jnp.finfo(logits.dtype).min), updated["cache"]

    return tokens_to_logits
