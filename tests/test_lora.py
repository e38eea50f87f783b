"""LoRA: adapters start as a no-op, only they train and hold optimizer state, and merged into
the weights they give the adapted model's outputs."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import hf, optim, sharding
from jaxlm.config import MeshConfig, ModelConfig, OptimConfig
from jaxlm.errors import UserError
from jaxlm.models.decoder import DecoderLM
from jaxlm.models.layers import merge_lora
from jaxlm.steps import Compiled
from jaxlm.tasks.clm import ClmTask

BASE = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp="swiglu", norm="rmsnorm",
                   use_bias=False, tie_embeddings=False, vocab_size=64, max_len=32)
LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0)
GOLDEN = Path(__file__).resolve().parent / "golden"


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, (8, 17)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((8, 16), np.int32),
            "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}


def compiled(cfg):
    task = ClmTask(cfg, np.ones(64, np.int32))
    tx = optim.optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"), 10,
                         adapters=cfg.lora_rank > 0)
    return Compiled(task, tx, sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                    sharding.rules(MeshConfig(data=2, fsdp=2, tensor=2)), 8, 16)


def without_adapters(params):
    if not isinstance(params, dict):
        return params
    return {k: without_adapters(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}


def test_only_adapters_train_hold_optimizer_state_and_merge_into_the_adapted_model():
    c = compiled(LORA)
    state = c.init_state(0)
    params0 = jax.device_get(state.params)
    ids = batch()["inputs"]
    # at init lora_b is zero: the adapted model is the base model
    np.testing.assert_array_equal(DecoderLM(LORA).apply({"params": params0}, ids),
                                  DecoderLM(BASE).apply({"params": without_adapters(params0)}, ids))
    with c.context():
        for i in range(3):
            state, _ = c.train_step(state, c.put_batch(batch(i)), jax.random.key(0))
    params = jax.device_get(state.params)
    for path, before in jax.tree_util.tree_leaves_with_path(params0):
        after = params
        for key in path:
            after = after[key.key]
        adapter = path[-1].key in ("lora_a", "lora_b")
        assert np.array_equal(before, after) != adapter, jax.tree_util.keystr(path)  # adapters, and only they, moved

    def size(tree):
        return sum(x.size for x in jax.tree_util.tree_leaves(tree) if x.ndim)
    adapters = size(params) - size(without_adapters(params))
    assert size(jax.device_get(state.opt_state)) == 2 * adapters  # Adam's two moments, of the adapters only
    assert size(compiled(BASE).init_state(0).opt_state) == 2 * size(without_adapters(params))

    merged = merge_lora(params, LORA)
    np.testing.assert_allclose(DecoderLM(BASE).apply({"params": merged}, ids),
                               DecoderLM(LORA).apply({"params": params}, ids), rtol=1e-5, atol=1e-5)


def test_an_imported_llama_takes_adapters_and_exports_merged(tmp_path):
    from safetensors.numpy import load_file
    hf.main(["import", "--hf-dir", str(GOLDEN / "tiny_llama"), "--workdir", str(tmp_path / "w"),
             "model.lora_rank=4", "model.lora_targets=query,value"])
    with pytest.raises(UserError, match="pass --merge-lora"):
        hf.export_hf(tmp_path / "w", tmp_path / "out")
    hf.main(["export", "--workdir", str(tmp_path / "w"), "--hf-dir", str(tmp_path / "out"), "--merge-lora"])
    want, got = load_file(str(GOLDEN / "tiny_llama" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(want)  # plain weights (adapters at zero: the imported ones)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-7)
