"""Memory and speed knobs change nothing numerically: scan, remat (per model family)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from equivalence import apply, check_remat_matches_none, check_scan_matches_unrolled

from jaxlm.config import ModelConfig
from jaxlm.models.decoder import DecoderLM
from jaxlm.models.encoder import EncoderMLM

DECODER = ModelConfig(num_layers=3, embed_dim=32, num_heads=4, vocab_size=64, max_len=32)


def decoder_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 64, (2, 17)).astype(np.int32)
    seg = np.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4], np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg}


def decoder_args(batch):
    return (batch["inputs"], batch["segment_ids"])


def decoder_loss(model, params, batch):
    logits = apply(model, {"params": params}, batch["inputs"], batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return (losses * (batch["segment_ids"] != 0)).sum()


ENCODER = dataclasses.replace(DECODER, positions="learned", activation="gelu")


def encoder_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 64, (2, 16)).astype(np.int32)
    seg = np.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4], np.int32)
    pos = np.array([list(range(10)) + list(range(6)), list(range(16))], np.int32)
    masked = np.array([[1, 4, 12], [0, 7, 11]], np.int32)
    return {"inputs": ids, "types": np.zeros_like(ids), "segment_ids": seg, "positions": pos, "masked": masked,
            "targets": rng.integers(3, 64, (2, 3)).astype(np.int32)}


def encoder_args(batch):
    return (batch["inputs"], batch["types"], batch["segment_ids"], batch["positions"], batch["masked"])


def encoder_loss(model, params, batch):
    logits, _ = apply(model, {"params": params}, *encoder_args(batch))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).sum()


LLAMA = dataclasses.replace(DECODER, num_kv_heads=2, mlp="swiglu", norm="rmsnorm", use_bias=False, qkv_bias=True,
                            tie_embeddings=False, rope_scaling="llama3", rope_original_max_len=16)

FAMILIES = {"decoder": (DecoderLM, DECODER, decoder_batch, decoder_args, decoder_loss),
            "llama": (DecoderLM, LLAMA, decoder_batch, decoder_args, decoder_loss),
            "encoder": (EncoderMLM, ENCODER, encoder_batch, encoder_args, encoder_loss)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scan_layers_match_unrolled(family):
    cls, cfg, batch, args, loss = FAMILIES[family]
    check_scan_matches_unrolled(cls, cfg, batch(), args, loss)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_no_batch"])
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"llama"}))  # remat wraps whole blocks, whatever their layout
def test_remat_matches_none(family, policy):
    cls, cfg, batch, args, loss = FAMILIES[family]
    check_remat_matches_none(cls, cfg, batch(), args, loss, policy)


def test_scanned_decoder_decodes_with_cache():
    import jax
    cfg = dataclasses.replace(DECODER, scan_layers=True)
    model = DecoderLM(cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 64, (1, 8)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    full = apply(model, {"params": params}, ids)
    cache = jax.tree_util.tree_map(jnp.zeros_like, model.init(jax.random.key(0), ids, decode=True)["cache"])
    seg, pos = jnp.ones_like(ids), jnp.arange(8)[None]
    out, v = apply(model, {"params": params, "cache": cache}, ids[:, :5], seg[:, :5], pos[:, :5], decode=True)
    steps = [out]
    for t in range(5, 8):
        out, v = apply(model, {"params": params, "cache": v["cache"]}, ids[:, t:t + 1], seg[:, t:t + 1],
                             pos[:, t:t + 1], decode=True)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
