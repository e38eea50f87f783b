"""The encoder-decoder (T5 and 2017 layouts): cached decoding equals the teacher-forced forward,
padded and packed sources and targets compute what they would alone."""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ModelConfig
from jaxlm.models.encoder_decoder import (
    PER_SOURCE,
    EncoderDecoder,
    cache_batch_axes,
    cached_logits,
    decoding_cache,
)
from jaxlm.models.positions import relative_bias, relative_bucket

LAYOUTS = {
    # T5 v1.1: relative positions, RMSNorm, pre-norm, no biases, unscaled scores, gated GELU,
    # untied output, heads narrower than width / heads, a deeper decoder
    "t5": ModelConfig(num_layers=2, decoder_layers=3, embed_dim=32, num_heads=4, head_dim=6, vocab_size=64,
                      max_len=32, positions="relative", relative_buckets=8, relative_max_distance=12, norm="rmsnorm",
                      use_bias=False, scale_attention=False, mlp="geglu", tie_embeddings=False),
    # the 2017 Transformer: sinusoidal positions, post-norm LayerNorm, scaled embeddings, tied output
    "2017": ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=64, max_len=32, positions="sinusoidal",
                        prenorm=False, scale_embeddings=True, activation="relu"),
}
# the 2017 layout copying from its source (a pointer-generator head)
LAYOUTS["copy"] = dataclasses.replace(LAYOUTS["2017"], copy_attention=True)
B, S, T = 3, 9, 6


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    src, tgt = rng.integers(1, 64, (B, S)), rng.integers(1, 64, (B, T))
    src_seg = (np.arange(S) < np.array([[9], [5], [7]])).astype(np.int32)
    src[src_seg == 0] = 0
    positions = lambda n: np.tile(np.arange(n), (B, 1))  # noqa: E731
    return src, src_seg, positions(S), tgt, np.ones((B, T), np.int32), positions(T)


def init(cfg: ModelConfig):
    model = EncoderDecoder(cfg)
    return model, model.init(jax.random.key(0), *map(jnp.asarray, batch()))["params"]


def one_at_a_time(model: EncoderDecoder, params, src, src_seg, src_pos, tgt, tgt_seg, tgt_pos) -> np.ndarray:
    """Logits [batch, target, vocab] of the target fed one token at a time through the cache."""
    cache = decoding_cache(model, params, src, src_seg, src_pos, tgt.shape[1])
    step = jax.jit(cached_logits(model, params, model.cfg.vocab_size))
    got = []
    for i in range(tgt.shape[1]):
        logits, cache = step(tgt[:, i:i + 1], tgt_seg[:, i:i + 1], tgt_pos[:, i:i + 1], cache)
        got.append(logits[:, 0])
    return np.stack(got, 1)


def slow_except(values: list, keep: tuple) -> list:
    """`values` as test parameters, those not in `keep` marked slow: each layout is checked by
    default somewhere, every combination with -m slow."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=() if v in keep else pytest.mark.slow)
            for v in values]


@pytest.mark.parametrize("layout,scan", slow_except([(layout, scan) for layout in sorted(LAYOUTS) for scan in (False, True)],
                                                    keep=(("t5", False), ("copy", False))))
def test_cached_decoding_equals_the_full_forward(layout, scan):
    """Target tokens fed one at a time through the cache (cross-attention keys and values
    computed once, when the cache is primed) give the teacher-forced logits."""
    cfg = dataclasses.replace(LAYOUTS[layout], scan_layers=scan)
    model, params = init(cfg)
    src, src_seg, src_pos, tgt, tgt_seg, tgt_pos = map(jnp.asarray, batch(1))
    want = model.apply({"params": params}, src, src_seg, src_pos, tgt, tgt_seg, tgt_pos)
    np.testing.assert_allclose(one_at_a_time(model, params, src, src_seg, src_pos, tgt, tgt_seg, tgt_pos),
                               want, atol=2e-5, rtol=1e-5)


def test_the_chunked_kernel_gives_xlas_gradients_and_cached_decoding():
    """T5's layout (a learned score bias from relative positions) with `attention_impl=chunked`:
    the gradient of every parameter, the relative-position tables included, is XLA kernel's, and
    decoding one token at a time through the cache gives XLA's teacher-forced logits."""
    cfgs = {impl: dataclasses.replace(LAYOUTS["t5"], attention_impl=impl) for impl in ("xla", "chunked")}
    _, params = init(cfgs["xla"])
    inputs = tuple(map(jnp.asarray, batch(1)))
    weights = jax.random.normal(jax.random.key(2), (B, T, 64))

    def grads(cfg):
        def loss(p):
            return (EncoderDecoder(cfg).apply({"params": p}, *inputs) * weights).sum()
        return jax.jit(jax.grad(loss))(params)

    want, got = grads(cfgs["xla"]), grads(cfgs["chunked"])
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(want)]
    assert any("relative" in p for p in paths)
    for path, w, g in zip(paths, jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=path)
    full = EncoderDecoder(cfgs["xla"]).apply({"params": params}, *inputs)
    np.testing.assert_allclose(one_at_a_time(EncoderDecoder(cfgs["chunked"]), params, *inputs), full,
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_relative_bias_reads_the_table_without_gather_or_scatter(dtype):
    """T5's bias takes each bucket's value exactly, as indexing the table would, with the same
    gradient; and neither it nor its gradient gathers or scatters (a scatter-add into the few
    table entries is a contended atomic loop on GPUs)."""
    cfg = dataclasses.replace(LAYOUTS["t5"], dtype=dtype)  # 8 buckets, distances up to 12
    table = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    q_index, k_index = jnp.arange(3, 14), jnp.arange(20)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 11, 20)), jnp.float32)
    for bidirectional in (True, False):
        bucket = relative_bucket(k_index[None, :] - q_index[:, None], bidirectional, cfg.relative_buckets,
                                 cfg.relative_max_distance)
        indexed = lambda t: jnp.transpose(t.astype(dtype)[bucket], (2, 0, 1))[None]  # noqa: B023, E731
        ours = lambda t: relative_bias(t.astype(dtype), q_index, k_index, bidirectional, cfg)  # noqa: B023, E731
        np.testing.assert_array_equal(np.asarray(ours(table), np.float32), np.asarray(indexed(table), np.float32))
        loss = lambda t: (ours(t).astype(jnp.float32) * weights).sum()  # noqa: B023, E731
        # each entry's gradient: the sum of its positions' weights, as the compute dtype holds them
        held = np.asarray(weights.astype(dtype), np.float64)[0]
        want = np.stack([[held[h][np.asarray(bucket) == b].sum() for h in range(4)] for b in range(8)])
        # one rounding of each sum to bfloat16 at most (a scatter-add in bfloat16 rounds at every add)
        np.testing.assert_allclose(jax.grad(loss)(table), want, rtol=2 ** -8 if dtype == "bfloat16" else 1e-6)
        hlo = jax.jit(jax.value_and_grad(loss)).lower(table).as_text()
        assert "gather" not in hlo and "scatter" not in hlo


@pytest.mark.parametrize("layout", slow_except(sorted(LAYOUTS), keep=("t5", "copy")))
def test_padded_source_positions_are_ignored(layout):
    """Whatever the padding of a source holds, and however long the padding is, the logits of
    the target are the same."""
    model, params = init(LAYOUTS[layout])
    src, src_seg, src_pos, tgt, tgt_seg, tgt_pos = batch(2)
    want = model.apply({"params": params}, src, src_seg, src_pos, tgt, tgt_seg, tgt_pos)
    noisy = np.where(src_seg == 0, 7, src)
    longer = [np.pad(a, [(0, 0), (0, 4)]) for a in (noisy, src_seg)]
    got = model.apply({"params": params}, longer[0], longer[1], np.tile(np.arange(S + 4), (B, 1)), tgt, tgt_seg, tgt_pos)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", slow_except(sorted(LAYOUTS), keep=("2017", "copy")))
def test_a_packed_row_gives_each_example_what_it_gives_alone(layout):
    """Two examples packed in one row on both sides (segment ids 1 and 2, positions restarting):
    each target position's logits equal those of its example in a row of its own."""
    model, params = init(LAYOUTS[layout])
    src, src_seg, _, tgt, _, _ = batch(3)
    a_src, b_src = src[1, :5], src[2, :7]  # the real tokens of rows 1 and 2
    a_tgt, b_tgt = tgt[1, :4], tgt[2, :5]

    def alone(s, t):
        return model.apply({"params": params}, s[None], np.ones((1, len(s)), np.int32), np.arange(len(s))[None],
                           t[None], np.ones((1, len(t)), np.int32), np.arange(len(t))[None])[0]

    packed_src = np.concatenate([a_src, b_src, [0, 0]])[None]
    src_seg = np.concatenate([np.ones(5), np.full(7, 2), [0, 0]]).astype(np.int32)[None]
    src_pos = np.concatenate([np.arange(5), np.arange(7), [0, 0]])[None]
    packed_tgt = np.concatenate([a_tgt, b_tgt, [0]])[None]
    tgt_seg = np.concatenate([np.ones(4), np.full(5, 2), [0]]).astype(np.int32)[None]
    tgt_pos = np.concatenate([np.arange(4), np.arange(5), [0]])[None]
    got = model.apply({"params": params}, packed_src, src_seg, src_pos, packed_tgt, tgt_seg, tgt_pos)[0]
    np.testing.assert_allclose(got[:4], alone(a_src, a_tgt), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[4:9], alone(b_src, b_tgt), atol=1e-5, rtol=1e-5)


def test_the_copy_head_mixes_the_output_with_its_own_sources_ids():
    """Two examples packed in one row, their sources' ids disjoint. With the copy gate shut, the
    output is the model's softmax (the copy-less model's, same weights); wide open, each target
    position's probability lies on its own source's ids, none on the other's; in between, the
    log-probabilities and their gradient stay finite, at a padding position too."""
    cfg = LAYOUTS["copy"]
    model, params = init(cfg)
    params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params))
    a_src, b_src = np.array([2, 3, 4, 3, 5]), np.array([40, 41, 42, 43, 44, 45, 40])
    src = np.concatenate([a_src, b_src, [0, 0]])[None]
    src_seg = np.concatenate([np.ones(5), np.full(7, 2), [0, 0]]).astype(np.int32)[None]
    src_pos = np.concatenate([np.arange(5), np.arange(7), [0, 0]])[None]
    tgt = np.array([[1, 7, 9, 1, 11, 13, 17, 19, 0]])
    tgt_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 0]], np.int32)
    tgt_pos = np.array([[0, 1, 2, 0, 1, 2, 3, 4, 0]])
    inputs = (src, src_seg, src_pos, tgt, tgt_seg, tgt_pos)

    def with_gate(bias: float) -> dict:
        return {**params, "copy_head": {**params["copy_head"], "gate": {**params["copy_head"]["gate"],
                                                                        "bias": np.full((1,), bias, np.float32)}}}

    plain = EncoderDecoder(dataclasses.replace(cfg, copy_attention=False))
    logits = plain.apply({"params": {k: v for k, v in params.items() if k != "copy_head"}}, *inputs)
    np.testing.assert_allclose(model.apply({"params": with_gate(40.0)}, *inputs), jax.nn.log_softmax(logits),
                               atol=1e-5, rtol=1e-5)
    probs = np.exp(model.apply({"params": with_gate(-40.0)}, *inputs))[0]  # [target, vocab]
    for positions, own, other in ((slice(0, 3), a_src, b_src), (slice(3, 8), b_src, a_src)):
        assert probs[positions][:, np.unique(own)].sum(-1) == pytest.approx(1.0, abs=1e-5)
        assert probs[positions][:, np.unique(other)].max() < 1e-6

    def loss(p):
        out = model.apply({"params": p}, *inputs)
        return (out * jax.nn.one_hot(tgt, cfg.vocab_size)).sum()

    assert np.isfinite(model.apply({"params": params}, *inputs)).all()
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(jax.grad(loss)(params)))


@pytest.mark.parametrize("layout", slow_except(["t5", "copy"], keep=("copy",)))
def test_beam_search_is_the_same_with_scanned_layers(layout):
    """Under `model.scan_layers` the decoder's cache has a leading layer axis; beam search repeats
    and reorders its beams on the next axis there (and on the first in the copy head's cache)
    and finds the same hypotheses. So it does when it leaves the entries kept per source (the
    encoder's keys and values) in place, as `Translator` has it do: each step then gathers fewer
    arrays."""
    from jaxlm.decoding import beam_search
    from jaxlm.models.layers import restack
    cfg = LAYOUTS[layout]
    model, params = init(cfg)
    params = nn.meta.unbox(params)
    scanned = EncoderDecoder(dataclasses.replace(cfg, scan_layers=True))
    src, src_seg, src_pos = map(jnp.asarray, batch(4)[:3])
    start = jnp.zeros((B, 1), jnp.int32)
    found, gathers = [], []
    for m, p, kept in ((model, params, frozenset()), (model, params, PER_SOURCE),
                       (scanned, restack(params, True), PER_SOURCE)):
        cache = decoding_cache(m, p, src, src_seg, src_pos, 9)
        search = partial(beam_search, cached_logits(m, p, cfg.vocab_size), beam_size=3, max_new_tokens=8, eos_id=1,
                         pad_id=0, cache_batch_axis=cache_batch_axes(m.cfg, cache), per_prompt=kept)
        tokens, scores = search(cache, start, jnp.ones_like(start))
        found.append((np.asarray(tokens), np.asarray(scores)))
        if m is model:
            gathers.append(str(jax.make_jaxpr(search)(cache, start, jnp.ones_like(start))).count(" gather["))
            per_source = sum(getattr(path[-1], "key", None) in PER_SOURCE
                             for path, _ in jax.tree_util.tree_leaves_with_path(cache))
    for tokens, scores in found[1:]:
        np.testing.assert_array_equal(tokens, found[0][0])
        np.testing.assert_allclose(scores, found[0][1], rtol=1e-5)
    assert per_source >= 3 * cfg.decoder_layers  # each decoder layer's keys, values and source segments
    assert gathers[1] == gathers[0] - per_source


def test_the_token_table_starts_at_each_layouts_scale():
    """T5 v1.0 (tied output scaled by width ** -0.5) draws unit-variance embeddings, the 2017
    layout width ** -0.5 (scaled up by sqrt(width)), an untied T5 v1.1 0.02; so each model's
    first logits and inputs have the scale its layout assumes."""
    v10 = dataclasses.replace(LAYOUTS["t5"], tie_embeddings=True, tied_output_scale=True)
    for cfg, std in ((v10, 1.0), (LAYOUTS["2017"], 32 ** -0.5), (LAYOUTS["t5"], 0.02)):
        table = init(cfg)[1]["token_embed"]["embedding"]
        table = np.asarray(getattr(table, "value", table))
        assert np.std(table) == pytest.approx(std, rel=0.1), (cfg.positions, cfg.tied_output_scale)


def test_normal_flat_draws_every_kernel_and_the_token_table_at_0_02():
    """`model.init=normal_flat`, as transformers draws BART and Marian: residual outputs at 0.02
    too (`normal` draws them 0.02 / sqrt(2 layers)), and the token table (the 2017 layout draws
    width ** -0.5)."""
    cfg = dataclasses.replace(LAYOUTS["2017"], embed_dim=128, mlp_dim=512, num_layers=3, decoder_layers=3)
    flat, normal = (init(dataclasses.replace(cfg, init=scheme))[1] for scheme in ("normal_flat", "normal"))

    def std(params, *path: str) -> float:
        for key in path:
            params = params[key]
        return float(np.std(np.asarray(getattr(params, "value", params))))

    block = ("decoder", "block_0")
    kernels = [(*block, "attention", "out", "kernel"), (*block, "mlp", "wo", "kernel"),
               (*block, "cross_attention", "query", "kernel"), ("encoder", "block_2", "mlp", "wi", "kernel")]
    for path in [("token_embed", "embedding"), *kernels]:
        assert std(flat, *path) == pytest.approx(0.02, rel=0.1), path
    assert std(normal, *kernels[0]) == pytest.approx(0.02 / 6 ** 0.5, rel=0.1)
    assert std(normal, "token_embed", "embedding") == pytest.approx(128 ** -0.5, rel=0.1)


@pytest.mark.parametrize("layout, scheme", [("2017", "xavier"), ("t5", "fan_in")])
def test_each_layouts_init_lets_the_source_reach_the_logits(layout, scheme):
    """Drawn as its layout draws it (2017: Glorot uniform; T5: N(0, 1 / fan_in), queries of its
    unscaled attention 1 / head_dim smaller), a width-128 model's first logits move with its
    source. Drawn at 0.02 (residual outputs smaller still) beside a residual stream of unit
    scale, the source moved them by about 1%, and a post-norm run trained into a language
    model of its targets that ignored them."""
    def source_effect(cfg: ModelConfig) -> float:
        model, params = init(cfg)
        src, src_seg, src_pos, tgt, tgt_seg, tgt_pos = map(jnp.asarray, batch(1))
        other = jnp.where(src_seg > 0, (src + 7) % 63 + 1, 0)
        a, b = (model.apply({"params": params}, s, src_seg, src_pos, tgt, tgt_seg, tgt_pos) for s in (src, other))
        return float(jnp.std(a - b) / jnp.std(a))

    cfg = dataclasses.replace(LAYOUTS[layout], embed_dim=128, mlp_dim=512, num_layers=3, decoder_layers=3, head_dim=0)
    if layout == "t5":  # v1.0's tied output: unit-variance embeddings, so the residual stream starts at 1
        cfg = dataclasses.replace(cfg, tie_embeddings=True, tied_output_scale=True)
    assert source_effect(dataclasses.replace(cfg, init=scheme)) > 0.3
    assert source_effect(dataclasses.replace(cfg, init="normal")) < 0.05

    params = init(dataclasses.replace(cfg, init=scheme))[1]
    head, width, mlp = cfg.head_size, 128, 512
    if scheme == "xavier":  # uniform of variance 2 / (fan_in + fan_out)
        want = {"wi": (2 / (width + mlp)) ** 0.5, "query": (2 / (width + width)) ** 0.5}
    else:
        want = {"wi": width ** -0.5, "wo": mlp ** -0.5, "query": (width * head) ** -0.5, "key": width ** -0.5}
    block = params["decoder"]["block_0"]
    for name, std in want.items():
        kernel = block["mlp" if name.startswith("w") else "cross_attention"][name]["kernel"]
        assert np.std(np.asarray(getattr(kernel, "value", kernel))) == pytest.approx(std, rel=0.1), name
