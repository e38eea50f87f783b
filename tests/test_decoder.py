"""The GPT-style decoder: shapes, causality, packing, KV cache."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from equivalence import apply

from jaxlm.config import ModelConfig
from jaxlm.models.decoder import DecoderLM, output_logits
from jaxlm.tasks.clm import ClmTask

CFG = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=64, max_len=32)
# the Llama layout: grouped-query attention, SwiGLU, RMSNorm, no biases, untied output, Llama 3's
# rotary rescaling (its original context short, so the rescaled band covers these head sizes)
LLAMA = dataclasses.replace(CFG, num_kv_heads=2, mlp="swiglu", norm="rmsnorm", use_bias=False,
                            tie_embeddings=False, rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=16)


def init(cfg, length=16, batch=2):
    model = DecoderLM(cfg)
    tokens = jnp.ones((batch, length), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    return model, jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                                         is_leaf=lambda x: hasattr(x, "unbox"))


def tokens(batch=2, length=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 64, (batch, length)), jnp.int32)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_finite(positions, tie):
    cfg = dataclasses.replace(CFG, positions=positions, tie_embeddings=tie)
    model, params = init(cfg)
    logits = apply(model, {"params": params}, tokens())
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    assert ("lm_head" in params) != tie


def test_bfloat16_compute_keeps_float32_params():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    model, params = init(cfg)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    logits = apply(model, {"params": params}, tokens())
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_causal_gradient_of_output_wrt_later_inputs_is_zero(positions):
    cfg = dataclasses.replace(CFG, positions=positions)
    model, params = init(cfg)
    ids = tokens(batch=1)
    t = 7

    def output_at_t(x):  # x: [1, length, embed], used in place of the token-embedding lookup
        def replace_lookup(next_fun, args, kwargs, context):
            if context.module.name == "token_embed" and context.method_name == "__call__":
                return x
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(replace_lookup):
            return model.apply({"params": params}, ids)[0, t].sum()

    x0 = params["token_embed"]["embedding"][ids]
    per_position = jnp.abs(jax.jit(jax.grad(output_at_t))(x0)[0]).sum(-1)  # [length]
    assert bool((per_position[t + 1:] == 0).all())
    assert bool((per_position[: t + 1] > 0).all())


def test_packed_row_equals_each_document_alone():
    model, params = init(CFG, length=16)
    a, b = tokens(1, 10, seed=1), tokens(1, 6, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[1] * 10 + [2] * 6])
    positions = jnp.asarray([list(range(10)) + list(range(6))])
    out = apply(model, {"params": params}, packed, segments, positions)
    alone_a = apply(model, {"params": params}, a)
    alone_b = apply(model, {"params": params}, b)
    np.testing.assert_allclose(out[:, :10], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 10:], alone_b, atol=1e-5)
    # and the mask matters: with one segment, the second document sees the first
    joined = apply(model, {"params": params}, packed, jnp.ones_like(segments), positions)
    assert float(jnp.abs(joined[:, 10:] - alone_b).max()) > 1e-3


def test_padding_does_not_change_real_positions():
    model, params = init(CFG)
    ids = tokens(1, 12)
    padded = jnp.concatenate([ids, jnp.zeros((1, 4), jnp.int32)], axis=1)
    segments = jnp.asarray([[1] * 12 + [0] * 4])
    out = apply(model, {"params": params}, padded, segments)
    np.testing.assert_allclose(out[:, :12], apply(model, {"params": params}, ids), atol=1e-5)


@pytest.mark.parametrize("positions", ["rotary", "learned", "llama"])
def test_cached_decoding_equals_full_forward(positions):
    cfg = LLAMA if positions == "llama" else dataclasses.replace(CFG, positions=positions)
    model, params = init(cfg)
    ids = tokens(2, 12)
    full = apply(model, {"params": params}, ids)
    cache = jax.tree_util.tree_map(
        jnp.zeros_like, model.init(jax.random.key(0), jnp.ones((2, 12), jnp.int32), decode=True)["cache"])
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    seg = jnp.ones((2, 12), jnp.int32)
    # a 5-token prompt in one call, then one token at a time
    logits, vars_ = apply(model, {"params": params, "cache": cache}, ids[:, :5], seg[:, :5], pos[:, :5], decode=True)
    steps = [logits]
    for t in range(5, 12):
        logits, vars_ = apply(model, {"params": params, "cache": vars_["cache"]}, ids[:, t:t + 1],
                                    seg[:, t:t + 1], pos[:, t:t + 1], decode=True)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_param_axis_names():
    model = DecoderLM(CFG)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    names = {k: v.names for k, v in jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: hasattr(x, "names"))}
    flat = {jax.tree_util.keystr(k): v for k, v in names.items()}
    assert flat["['token_embed']['embedding']"] == ("vocab", "embed")
    assert flat["['block_0']['attention']['query']['kernel']"] == ("embed", "heads", "kv")
    assert flat["['block_0']['attention']['out']['kernel']"] == ("heads", "kv", "embed")
    assert flat["['block_0']['mlp']['wi']['kernel']"] == ("embed", "mlp")


@pytest.mark.parametrize("impl,backend,devices,dtype,head_dim,want", [
    ("auto", "gpu", 1, jnp.bfloat16, 64, "cudnn"), ("auto", "gpu", 8, jnp.bfloat16, 128, "cudnn"),
    ("auto", "cpu", 1, jnp.bfloat16, 64, "chunked"), ("auto", "cpu", 1, jnp.float32, 32, "chunked"),
    ("auto", "cpu", 8, jnp.float32, 64, "xla"), ("auto", "tpu", 1, jnp.bfloat16, 64, "xla"),
    ("auto", "gpu", 1, jnp.float32, 64, "xla"), ("auto", "gpu", 1, jnp.bfloat16, 160, "xla"),
    ("auto", "gpu", 1, jnp.bfloat16, 36, "xla"), ("xla", "gpu", 1, jnp.bfloat16, 64, "xla"),
    ("cudnn", "cpu", 1, jnp.float32, 64, "cudnn"), ("chunked", "gpu", 8, jnp.float32, 64, "chunked")])
def test_auto_attention_picks_the_kernel_for_the_machine(impl, backend, devices, dtype, head_dim, want):
    """cuDNN where it applies, the chunked kernel on one CPU device, XLA elsewhere; a named kernel
    is kept."""
    from jaxlm.models.layers import attention_backend
    assert attention_backend(impl, dtype, head_dim, backend, devices) == want


def test_causal_attention_is_passed_as_is_causal(monkeypatch):
    """Causal self-attention without a cache hands causality to the kernel (cuDNN's causal mask);
    a cache step (queries at an offset) and the encoder keep it in the mask."""
    from jaxlm.models.encoder import Encoder
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["is_causal"], kwargs["implementation"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    cfg = dataclasses.replace(CFG, attention_impl="auto")  # XLA's kernel on the tests' 8 CPU devices
    model = DecoderLM(cfg)
    variables = model.init(jax.random.key(0), tokens())
    model.apply(variables, tokens())
    assert calls[-2:] == [(True, "xla")] * 2  # two layers
    cache = model.init(jax.random.key(0), tokens(length=4), decode=True)["cache"]
    calls.clear()
    model.apply({**variables, "cache": cache}, tokens(length=4), decode=True, mutable=["cache"])
    assert calls == [(False, "xla")] * 2
    enc = Encoder(cfg)
    ones = jnp.ones((2, 16), jnp.int32)
    calls.clear()
    enc.init(jax.random.key(0), ones, ones * 0, ones, jnp.broadcast_to(jnp.arange(16), (2, 16)))
    assert calls == [(False, "xla")] * 2


@pytest.mark.parametrize("tie", [True, False])
def test_output_logits_equal_the_models_own(tie):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    model, params = init(cfg)
    hidden = jax.jit(lambda v, t: model.apply(v, t, hidden_only=True))({"params": params}, tokens())
    assert hidden.shape == (2, 16, 32)
    np.testing.assert_allclose(output_logits(params, hidden, cfg), apply(model, {"params": params}, tokens()),
                               rtol=1e-6, atol=1e-6)


def _clm_loss(cfg, batch):
    task = ClmTask(cfg, np.ones(cfg.vocab_size, np.int32))
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]

    def loss(p):
        return task.loss(p, batch, jax.random.key(1), train=False)
    return loss, params


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_logits_give_the_plain_loss_and_gradients(tie):
    rows, length = 4, 16
    ids = np.asarray(tokens(rows, length + 1, seed=3))
    segments = np.ones((rows, length), np.int32)
    segments[1, 5:] = 2  # a packed row
    segments[2, 11:] = 0  # padding
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments,
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}
    results = {}
    for chunk in (0, 4):
        cfg = dataclasses.replace(CFG, tie_embeddings=tie, logits_chunk=chunk)
        loss, params = _clm_loss(cfg, batch)
        (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[chunk] = value, sums, grads
    (v0, s0, g0), (v4, s4, g4) = results[0], results[4]
    assert float(s0["tokens"]) == 4 * 16 - 5
    np.testing.assert_allclose(v4, v0, rtol=1e-6)
    for key in ("loss_sum", "correct", "bytes"):
        np.testing.assert_allclose(s4[key], s0[key], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g4, g0)


def test_chunked_logits_need_less_memory():
    rows, length = 4, 64
    batch = {k: np.ones((rows, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    temps = {}
    for chunk in (0, 8):
        cfg = dataclasses.replace(CFG, vocab_size=8192, max_len=64, logits_chunk=chunk)
        loss, params = _clm_loss(cfg, batch)
        compiled = jax.jit(jax.grad(lambda p, loss=loss: loss(p)[0])).lower(params).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = rows * length * 8192 * 4
    assert temps[0] > logits_bytes  # the whole float32 logits (and their gradient) ...
    assert temps[8] < temps[0] - logits_bytes  # ... are gone with slices of 8 positions


def test_grouped_query_attention_equals_full_attention_with_kv_heads_repeated():
    """Two KV heads serving four query heads = four KV heads that are copies (query head n reads
    KV head n // 2, as Hugging Face's repeat_kv); the KV cache holds only the two."""
    model, params = init(LLAMA)
    full = dataclasses.replace(LLAMA, num_kv_heads=0)
    repeated = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(LLAMA.num_layers):
        attn = repeated[f"block_{i}"]["attention"]
        for name in ("key", "value"):
            attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], 2, axis=1)}  # [embed, heads, head_dim]
    ids = tokens(2, 12)
    np.testing.assert_allclose(apply(DecoderLM(full), {"params": repeated}, ids),
                               apply(model, {"params": params}, ids), atol=1e-5)
    cache = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, decode=True))["cache"]
    assert cache["block_0"]["attention"]["cached_key"].shape == (2, 12, 2, 8)  # [batch, length, kv_heads, head_dim]


def test_swiglu_is_silu_gate_times_up_then_down():
    from jaxlm.models.layers import Mlp
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 32)), jnp.float32)
    mlp = Mlp(LLAMA)
    params = nn.meta.unbox(mlp.init(jax.random.key(1), x)["params"])
    assert sorted(params) == ["wi", "wi_gate", "wo"] and "bias" not in params["wi"]
    gate, up = x @ params["wi_gate"]["kernel"], x @ params["wi"]["kernel"]
    want = (gate / (1 + jnp.exp(-gate)) * up) @ params["wo"]["kernel"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


# transformers' Llama 3 inverse frequencies (ROPE_INIT_FUNCTIONS["llama3"]) for head size 64,
# rope_theta 500,000, factor 8, low/high frequency factors 1 and 4, original context 8,192
LLAMA3_FREQS = [1.0, 0.663601279258728, 0.44036662578582764, 0.2922278344631195, 0.193922758102417,
                0.12868738174438477, 0.08539710193872452, 0.05666961893439293, 0.03760603070259094,
                0.02495540864765644, 0.016560440883040428, 0.010989529080688953, 0.00729266507551074,
                0.00483942124992609, 0.0032114461064338684, 0.0013718936825171113, 0.0005248460220173001,
                0.0001785077911335975, 7.784655463183299e-05, 5.165906986803748e-05, 3.428102354519069e-05,
                2.2748929040972143e-05, 1.5096217794052791e-05, 1.0017868589784484e-05, 6.647869668086059e-06,
                4.411534519022098e-06, 2.927499735960737e-06, 1.9426925064180978e-06, 1.289173155782919e-06,
                8.554969213037111e-07, 5.677088097399974e-07, 3.76732259610435e-07]


def test_llama3_rope_scaling_matches_transformers():
    from jaxlm.models.positions import rope_frequencies
    cfg = ModelConfig(embed_dim=256, num_heads=4, rope_base=500000.0, rope_scaling="llama3", rope_factor=8.0,
                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192)
    np.testing.assert_allclose(rope_frequencies(cfg, 64), LLAMA3_FREQS, rtol=1e-6)
    plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling="none"), 64)
    assert plain[0] == 1.0 and np.allclose(plain[-5:], np.asarray(LLAMA3_FREQS[-5:]) * 8, rtol=1e-6)
