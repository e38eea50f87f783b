"""Building blocks shared by every model family: embeddings, attention, MLP, norms (position
encodings are in `positions`).

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`) and activations are
constrained with activation names (`batch`, `length`, `act_embed`, `act_mlp`, `act_heads`); the
rules that map them onto a device mesh live in the config, so nothing here knows a mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.models import chunked_attention
from jaxlm.models.positions import relative_bias, rope_frequencies, rotary

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def gelu_exact(x: Array) -> Array:
    """GELU with the Gaussian CDF through erf, as BERT and Hugging Face compute it. (jax.nn.gelu
    goes through erfc, which costs an exponential more per element on CPUs.)"""
    return x * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2)).astype(x.dtype))) * 0.5


ACTIVATIONS = {
    "gelu_tanh": partial(nn.gelu, approximate=True),
    "gelu": gelu_exact,
    "relu": nn.relu,
    "silu": nn.silu,
}


def dtype_of(cfg: ModelConfig) -> jnp.dtype:
    """The compute dtype named by the config."""
    return DTYPES[cfg.dtype]


def param_init(init: Callable, axes: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Constrains an activation's sharding by logical axis names (a no-op without a mesh)."""
    return nn.with_logical_constraint(x, axes)


def make_attention_mask(
    q_segments: Array, k_segments: Array, q_index: Array, k_index: Array, causal: bool
) -> Array:
    """Boolean attention mask [batch, 1, q, k].

    A query attends to a key only within the same nonzero segment (so packed documents and
    padding never mix) and, when causal, only to keys at or before its own slot.

    Args:
      q_segments: [batch, q] segment ids of the queries; 0 is padding.
      k_segments: [batch, k] segment ids of the keys; 0 is padding or an empty cache slot.
      q_index: [q] slot of each query in the key sequence.
      k_index: [k] slot of each key.
      causal: whether to forbid attending to later slots.
    """
    mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    if causal:
        mask &= k_index[None, None, :] <= q_index[None, :, None]
    return mask[:, None, :, :]


CUDNN_MAX_HEAD_DIM = 128  # cuDNN's fused attention: head dims up to 128 (256 on Hopper), multiples of 8


def attention_backend(impl: str, dtype: jnp.dtype, head_dim: int, backend: str | None = None,
                      devices: int | None = None) -> str:
    """The attention kernel `model.attention_impl` names: "auto" is cuDNN's fused attention where
    it applies (a GPU, bfloat16, a head dim it takes), the chunked kernel on a single CPU device
    (`chunked_attention`: its loop over batch rows is for one device), else XLA.

    Args:
      backend: the JAX backend (default: `jax.default_backend()`).
      devices: the device count (default: `jax.device_count()`).
    """
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    fits = head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
    if backend == "gpu" and dtype == jnp.bfloat16 and fits:
        return "cudnn"
    devices = jax.device_count() if devices is None else devices
    return "chunked" if backend == "cpu" and devices == 1 else "xla"


def attention(q: Array, k: Array, v: Array, mask: Array, impl: str, is_causal: bool = False,
              bias: Array | None = None, scaled: bool = True) -> Array:
    """Scaled dot-product attention: `jax.nn.dot_product_attention` (XLA or cuDNN) or the
    chunked CPU kernel (`chunked_attention`).

    Args:
      q: [batch, q, heads, head_dim]; k, v: [batch, k, heads, head_dim].
      mask: [batch, 1, q, k] booleans. A query with no visible key gets a finite output.
      impl: "xla", "cudnn", "chunked" or "auto" (see `attention_backend`).
      is_causal: also mask keys after each query (queries and keys aligned at slot 0); cuDNN
        then runs its causal kernel instead of reading the whole mask for it.
      bias: added to the scores, [1, heads, q, k] (T5's relative positions).
      scaled: divide the scores by sqrt(head_dim) (T5 does not).
    """
    impl = attention_backend(impl, q.dtype, q.shape[-1])
    if impl == "chunked":
        scale = q.shape[-1] ** -0.5 if scaled else 1.0
        return chunked_attention.attention(q, k, v, mask, bias, scale, is_causal)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal,
                                        scale=None if scaled else 1.0, implementation=impl)


class _NormParams(nn.Module):
    """The scale (and bias) of a norm, where Flax's `LayerNorm` / `RMSNorm` kept them (so
    checkpoints and Hugging Face mappings name them as before)."""

    features: int
    bias: bool

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        scale = self.param("scale", param_init(nn.initializers.ones, ("embed",)), (self.features,), jnp.float32)
        if not self.bias:
            return scale, None
        return scale, self.param("bias", param_init(nn.initializers.zeros, ("embed",)), (self.features,), jnp.float32)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis in float32, scale (and bias) named `embed`.

    Written out rather than Flax's modules: there the per-row factor times the scale became a
    separate broadcast of the whole activation on CPUs (about 4% of a MiniLM step); here it
    fuses into one pass. The variance is the mean of squared deviations (two passes over a row).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        layer = self.cfg.norm == "layernorm"
        scale, bias = _NormParams(x.shape[-1], layer, name="LayerNorm_0" if layer else "RMSNorm_0")()
        h = x.astype(jnp.float32)  # [..., embed]
        if layer:
            h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.cfg.norm_eps) * scale
        if bias is not None:
            h = h + bias
        return h.astype(dtype_of(self.cfg))


def kernel_init(cfg: ModelConfig, std: float, contract: int, ndim: int, gain: float = 1.0) -> Callable:
    """A kernel's initializer [*contracted, *features] under `model.init`:

    - normal: N(0, std), std 0.02 and residual outputs 0.02 / sqrt(2 layers) (GPT-2, BERT);
    - normal_flat: N(0, 0.02), residual outputs too (BART and Marian as transformers draws them;
      encoder-decoders draw their token table at 0.02 as well);
    - fan_in: N(0, gain / fan_in) (T5; a query of unscaled attention has gain 1 / head_dim);
    - xavier: uniform of variance 2 / (fan_in + fan_out) (the 2017 Transformer, fairseq).

    At width 128, 0.02 is a quarter of fan_in ** -0.5: an encoder-decoder drawn that way
    (residual stream at unit scale) moved its first logits by about 1% with its source, and a
    post-norm one trained into a language model of its targets that ignored its sources. With
    the token table at 0.02 too (`normal_flat`: embeddings times sqrt(width) start small), the
    same post-norm model learned to use its sources, and faster than under Glorot's scheme
    (`docs/benchmarks.md`).
    """
    if cfg.init in ("normal", "normal_flat"):
        return nn.initializers.normal(std if cfg.init == "normal" else 0.02)
    axes = dict(in_axis=tuple(range(contract)), out_axis=tuple(range(contract, ndim)))
    if cfg.init == "xavier":
        return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", **axes)
    return nn.initializers.variance_scaling(gain, "fan_in", "normal", **axes)


class Dense(nn.Module):
    """x @ kernel (+ bias), contracting the last `contract` axes of x.

    The kernel is created in its full shape [*contracted, *features] so its logical axis
    names apply as they are (no reshaping of an annotated array).
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel's axes
    cfg: ModelConfig
    contract: int = 1
    std: float = 0.02  # model.init=normal
    bias: bool | None = None  # None: model.use_bias
    gain: float = 1.0  # model.init=fan_in: variance times this

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[-self.contract:]
        init = kernel_init(self.cfg, self.std, self.contract, self.contract + len(self.features), self.gain)
        kernel = self.param("kernel", param_init(init, self.axes), (*in_shape, *self.features), jnp.float32)
        dtype = dtype_of(self.cfg)
        dims = tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (dims, ((), ())))
        if self.cfg.lora_rank and self.name in self.cfg.lora_targets.split(","):
            y = y + self._adapter(x, in_shape, dims, dtype)
        if self.cfg.use_bias if self.bias is None else self.bias:
            bias = self.param("bias", param_init(nn.initializers.zeros, self.axes[self.contract:]),
                              self.features, jnp.float32)
            y = y + bias.astype(dtype)
        return y


    def _adapter(self, x: Array, in_shape: tuple[int, ...], dims: tuple, dtype) -> Array:
        """LoRA: x @ lora_a @ lora_b x (alpha / rank), lora_b starting at zero (the model starts
        as it was). Rank `r` adapters [*contracted, r] and [r, *features]."""
        cfg, r = self.cfg, self.cfg.lora_rank
        fan_in = int(np.prod(in_shape))
        a = self.param("lora_a", param_init(nn.initializers.normal(fan_in ** -0.5), (*self.axes[:self.contract], None)),
                       (*in_shape, r), jnp.float32)
        b = self.param("lora_b", param_init(nn.initializers.zeros, (None, *self.axes[self.contract:])),
                       (r, *self.features), jnp.float32)
        h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), (dims, ((), ())))  # [..., r]
        return jnp.tensordot(h, b.astype(dtype), axes=1) * (cfg.lora_alpha / r)


def merge_lora(params: dict, cfg: ModelConfig) -> dict:
    """Unrolled parameters (`restack(..., scanned=False)`) with every adapter folded into its
    kernel (kernel + a @ b x alpha / rank) and removed: the plain weights of the adapted model,
    for its config without adapters."""
    if not isinstance(params, dict):
        return params
    if "lora_a" in params:
        delta = np.tensordot(np.asarray(params["lora_a"]), np.asarray(params["lora_b"]), axes=1)
        rest = {k: v for k, v in params.items() if k not in ("lora_a", "lora_b")}
        return {**rest, "kernel": np.asarray(params["kernel"]) + delta * (cfg.lora_alpha / cfg.lora_rank)}
    return {k: merge_lora(v, cfg) for k, v in params.items()}


def query_gain(cfg: ModelConfig) -> float:
    """Unscaled attention (T5) draws its queries 1 / head_dim smaller in variance instead."""
    return 1.0 if cfg.scale_attention else 1.0 / cfg.head_size


class SelfAttention(nn.Module):
    """Multi-head self-attention with segment masks, rotary positions and a KV cache.

    With `decode=True` keys and values are appended to a cache in the `cache` collection,
    sized by the length of the input it was initialised with; every call may write one or
    more positions (a prompt, then one token at a time).
    """

    cfg: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array, decode: bool = False,
                 deterministic: bool = True, relative_table: Array | None = None) -> Array:
        """relative_table: T5's bucket table [buckets, heads], shared by a stack's layers."""
        cfg = self.cfg
        heads, head_dim = cfg.num_heads, cfg.head_size
        kv_heads = cfg.num_kv_heads or heads  # fewer: grouped-query attention (the cache holds only these)
        batch, length = x.shape[:2]
        proj_std = 0.02 / (2 * cfg.num_layers) ** 0.5  # GPT-2's scaled init of residual projections
        qkv_axes = ("embed", "heads", "kv")
        biased = cfg.use_bias or cfg.qkv_bias
        q = Dense((heads, head_dim), qkv_axes, cfg, bias=biased, gain=query_gain(cfg),
                  name="query")(x)  # [batch, length, heads, head_dim]
        k = Dense((kv_heads, head_dim), qkv_axes, cfg, bias=biased, name="key")(x)  # [batch, length, kv_heads, head_dim]
        v = Dense((kv_heads, head_dim), qkv_axes, cfg, bias=biased, name="value")(x)
        if cfg.positions == "rotary":
            freqs = rope_frequencies(cfg, head_dim)
            q, k = rotary(q, positions, freqs), rotary(k, positions, freqs)
        q = constrain(q, ("batch", "length", "act_heads", None))  # [batch, length, heads, head_dim]

        q_index = k_index = jnp.arange(length)
        k_segments = segment_ids
        if decode:
            initialized = self.has_variable("cache", "cached_key")
            cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            cached_seg = self.variable("cache", "cached_segments", jnp.zeros, segment_ids.shape, jnp.int32)
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if initialized:
                i = index.value
                k = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
                v = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
                k_segments = jax.lax.dynamic_update_slice(
                    cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
                cached_k.value, cached_v.value, cached_seg.value = k, v, k_segments
                index.value = i + length
                q_index = i + jnp.arange(length)
                k_index = jnp.arange(k.shape[1])

        # without a cache, queries and keys share slots: causality goes to the kernel (is_causal)
        aligned = self.causal and not decode
        mask = make_attention_mask(segment_ids, k_segments, q_index, k_index, self.causal and not aligned)
        bias = None if relative_table is None else relative_bias(relative_table.astype(dtype_of(cfg)), q_index, k_index,
                                                                 not self.causal, cfg)
        out = attention(q, k, v, mask, cfg.attention_impl, is_causal=aligned, bias=bias,
                        scaled=cfg.scale_attention)  # [batch, length, heads, head_dim]
        out = Dense((cfg.embed_dim,), ("heads", "kv", "embed"), cfg, contract=2, std=proj_std,
                    name="out")(out)
        return nn.Dropout(cfg.dropout)(out, deterministic=deterministic)


def per_source(module: nn.Module, names: tuple[str, ...], arrays: tuple[Array, ...] | None,
               decode: bool) -> tuple[Array, ...]:
    """Arrays a decoder computes once per source (keys, values, segment ids): `arrays`, also
    kept under `names` in `module`'s `cache` collection when `decode` primes it; None: the ones
    kept there."""
    if arrays is None:
        return tuple(module.get_variable("cache", name) for name in names)
    if decode:
        for name, array in zip(names, arrays):
            module.put_variable("cache", name, array)
    return arrays


CROSS_CACHE = ("cross_key", "cross_value", "cross_segments")  # what `CrossAttention` keeps per source


class CrossAttention(nn.Module):
    """Attention of a decoder's positions to an encoder's outputs, within matching segments.

    Decoding computes the encoder's keys and values once per source: a call with `encoded`
    and `decode=True` (`EncoderDecoder.decode` primes the cache with no target tokens) keeps
    them, with the source's segment ids, in the `cache` collection; calls with `encoded=None`
    read them from there.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, encoded: Array | None, encoded_segments: Array | None,
                 decode: bool = False, deterministic: bool = True) -> Array:
        """x: [batch, q, embed] decoder states; encoded: [batch, source, embed] encoder outputs."""
        cfg = self.cfg
        heads, head_dim = cfg.num_heads, cfg.head_size
        kv_heads = cfg.num_kv_heads or heads
        axes = ("embed", "heads", "kv")
        biased = cfg.use_bias or cfg.qkv_bias
        q = Dense((heads, head_dim), axes, cfg, bias=biased, gain=query_gain(cfg),
                  name="query")(x)  # [batch, q, heads, head_dim]
        key = Dense((kv_heads, head_dim), axes, cfg, bias=biased, name="key")
        value = Dense((kv_heads, head_dim), axes, cfg, bias=biased, name="value")
        k, v, encoded_segments = per_source(  # [batch, source, kv_heads, head_dim] (and [batch, source])
            self, CROSS_CACHE,
            None if encoded is None else (key(encoded), value(encoded), encoded_segments), decode)
        mask = make_attention_mask(segment_ids, encoded_segments, jnp.arange(x.shape[1]),
                                   jnp.arange(k.shape[1]), causal=False)
        out = attention(q, k, v, mask, cfg.attention_impl, scaled=cfg.scale_attention)
        out = Dense((cfg.embed_dim,), ("heads", "kv", "embed"), cfg, contract=2,
                    std=0.02 / (2 * cfg.num_layers) ** 0.5, name="out")(out)
        return nn.Dropout(cfg.dropout)(out, deterministic=deterministic)


class Mlp(nn.Module):
    """Feed-forward block, dropout on its output only (as BERT and GPT-2: none on the wide hidden
    activation): `wo(act(wi x))`, or with `mlp=swiglu` `wo(silu(wi_gate x) * wi x)` (Llama), with
    `mlp=geglu` `wo(gelu_tanh(wi_gate x) * wi x)` (T5 v1.1)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        hidden = cfg.mlp_dim or 4 * cfg.embed_dim
        h = Dense((hidden,), ("embed", "mlp"), cfg, name="wi")(x)
        if cfg.mlp in ("swiglu", "geglu"):
            gate = ACTIVATIONS["silu" if cfg.mlp == "swiglu" else "gelu_tanh"]
            h = gate(Dense((hidden,), ("embed", "mlp"), cfg, name="wi_gate")(x)) * h
        else:
            h = ACTIVATIONS[cfg.activation](h)
        h = constrain(h, ("batch", "length", "act_mlp"))  # [batch, length, mlp]
        out = Dense((cfg.embed_dim,), ("mlp", "embed"), cfg, std=0.02 / (2 * cfg.num_layers) ** 0.5,
                    name="wo")(h)
        return nn.Dropout(cfg.dropout)(out, deterministic=deterministic)


def embed(num: int, cfg: ModelConfig, axes: tuple[str | None, str], name: str | None = None,
          std: float = 0.02) -> nn.Embed:
    """An embedding table [num, embed_dim] with logical axis names, drawn at `std`."""
    return nn.Embed(num, cfg.embed_dim, dtype=dtype_of(cfg), param_dtype=jnp.float32,
                    embedding_init=param_init(nn.initializers.normal(std), axes), name=name)


def padded_vocab(size: int, multiple: int) -> int:
    """The vocabulary size rounded up so the table shards evenly."""
    return -(-size // multiple) * multiple


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "save_dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def restack(params: dict, scanned: bool) -> dict:
    """Parameters in the scanned layout (`blocks`, one leading `layers` axis) or the unrolled one
    (`block_0`, `block_1`, ...), wherever in the tree the blocks are (e.g. under `encoder`).

    A tree already in that layout comes back as it is, so checkpoints and Hugging Face weights
    of either layout load into a model of the other (`model.scan_layers` is a compile-time
    choice, not part of the weights).
    """
    if not isinstance(params, dict):
        return params
    if scanned and "block_0" in params:
        count = sum(1 for k in params if k.startswith("block_"))
        blocks = [params[f"block_{i}"] for i in range(count)]
        rest = {k: v for k, v in params.items() if not k.startswith("block_")}
        stacked = jax.tree_util.tree_map(
            lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs), *blocks)
        return {**rest, "blocks": stacked}
    if not scanned and "blocks" in params:
        count = len(jax.tree_util.tree_leaves(params["blocks"])[0])
        rest = {k: v for k, v in params.items() if k != "blocks"}
        return {**rest, **{f"block_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], params["blocks"])
                           for i in range(count)}}
    return {k: restack(v, scanned) for k, v in params.items()}


def stack(block: type[nn.Module], cfg: ModelConfig, x: Array, *args: Array, **kwargs) -> Array:
    """Applies `cfg.num_layers` blocks to x, unrolled or under `nn.scan`, with the configured remat.

    Call inside a compact method. Scanned parameters gain a leading axis named `layers`; the
    block must accept a `scanned` field and then return `(x, None)`. Arrays in `args` are the
    same for every layer; `kwargs` are the blocks' static fields.
    """
    cls = block
    if cfg.remat != "none":
        cls = nn.remat(cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if not cfg.scan_layers:
        for i in range(cfg.num_layers):
            x = cls(cfg, name=f"block_{i}", **kwargs)(x, *args)
        return x
    scanned = nn.scan(cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * len(args),
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(cfg, name="blocks", scanned=True, **kwargs)(x, *args)
    return x
