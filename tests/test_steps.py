"""The pure train step: golden loss, overfitting, and the same numbers on any mesh."""

import dataclasses
import functools
import sys

import jax
import numpy as np
import pytest

from jaxlm import optim, sharding
from jaxlm.config import MeshConfig, MlmConfig, ModelConfig, OptimConfig, Seq2seqConfig
from jaxlm.data import pipeline
from jaxlm.errors import UserError
from jaxlm.steps import Compiled, PmapCompiled
from jaxlm.tasks.clm import ClmTask
from jaxlm.tasks.mlm import MlmTask
from jaxlm.tasks.seq2seq import Seq2seqTask

MODEL = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=128, max_len=32)
ENCODER = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=128, max_len=32,
                      positions="learned", activation="gelu")
# the Llama layout: grouped-query attention, SwiGLU, RMSNorm, no biases but Qwen2's on query/key/value,
# untied output, rescaled rotary
LLAMA = dataclasses.replace(MODEL, num_kv_heads=2, mlp="swiglu", norm="rmsnorm", use_bias=False, qkv_bias=True,
                            tie_embeddings=False, rope_scaling="llama3", rope_original_max_len=16)
S2S = dataclasses.replace(MODEL, decoder_layers=3, positions="relative", relative_buckets=8, relative_max_distance=16,
                          norm="rmsnorm", use_bias=False, scale_attention=False, mlp="geglu", tie_embeddings=False,
                          copy_attention=True)
# every model family, as (task factory); the mesh and accumulation checks run for each
FAMILIES = {
    "decoder": lambda: ClmTask(MODEL, np.ones(128, np.int32)),
    "llama": lambda: ClmTask(LLAMA, np.ones(128, np.int32)),
    # masked-LM + next-sentence: two loss terms with different denominators (tokens, pairs)
    "encoder": lambda: MlmTask(ENCODER, MlmConfig(mask_rate=0.3, nsp=True), 16, 0, np.arange(4),
                               np.zeros(128, bool), 3),
    # the encoder-decoder, T5's layout with a copy head, packed on both sides; targets shorter than sources
    "seq2seq": lambda: Seq2seqTask(S2S, Seq2seqConfig(target_len=12, label_smoothing=0.1), 120),
}
# Golden values: loss of the first step and of the step after one update, for MODEL, seed 0 and
# the batch below. Regenerate with `python tests/test_steps.py` and paste the printed numbers.
GOLDEN = (4.863617427765377, 4.8526422409784224)


def batch(seed=0, rows=8, length=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, (rows, length + 1)).astype(np.int32)
    seg = np.ones((rows, length), np.int32)
    seg[:, 10:] = 2
    seg[0, 14:] = 0  # a padded tail
    pos = np.concatenate([np.arange(10), np.arange(length - 10)])[None].repeat(rows, 0).astype(np.int32)
    nsp = rng.integers(0, 2, rows).astype(np.int32)
    nsp[1] = -1  # a padding pair
    target_seg = seg[:, :12].copy()
    target_seg[:, 8:] = 2
    target_seg[3, 10:] = 0  # a padded target tail
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg, "positions": pos,
            "row_ids": pipeline.row_ids(np.arange(rows) + seed * rows), "token_types": (seg == 2).astype(np.int32),
            "nsp_labels": nsp,
            # seq2seq: sources are the inputs above; targets of 12, two segments a row like the sources'
            "input_segments": seg, "input_positions": pos, "targets_in": ids[:, :12] * (target_seg > 0),
            "target_tokens": ids[:, 1:13] * (target_seg > 0),
            "target_segments": target_seg, "target_positions": np.concatenate([np.arange(8), np.arange(4)])[None].repeat(rows, 0)}


def make(mesh_cfg=MeshConfig(data=1), lr=1e-2, rows=8, accum=1, family="decoder"):
    task = FAMILIES[family]()
    tx = optim.optimizer(OptimConfig(learning_rate=lr, warmup_steps=0, schedule="constant"), 10)
    if mesh_cfg.mode == "pmap":
        return PmapCompiled(task, tx, rows, 16, accum)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[: mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor])
    return Compiled(task, tx, mesh, sharding.rules(mesh_cfg), rows, 16, accum)


def family_batch(task, seed=0, rows=8):
    """`batch`, with a sequence-to-sequence task's targets its own."""
    b = batch(seed, rows)
    return {**b, "targets": b["target_tokens"]} if isinstance(task, Seq2seqTask) else b


def losses(c, steps=3, rows=8):
    state, rng, out = c.init_state(0), jax.random.key(0), []
    with c.context():
        for i in range(steps):
            state, m = c.train_step(state, c.put_batch(family_batch(c.task, i % 2, rows)), rng)
            out.append(c.task.summarize(m)["loss"])
    return out


@functools.cache
def one_device(family: str, rows: int) -> tuple[float, ...]:
    """Losses on one device without accumulation: the reference every layout must reproduce."""
    return tuple(losses(make(rows=rows, family=family), rows=rows))


def test_golden_one_step_loss():
    got = losses(make(), steps=2)
    np.testing.assert_allclose(got, GOLDEN, rtol=1e-5)


def test_metric_sums_count_real_tokens():
    c = make()
    state = c.init_state(0)
    with c.context():
        _, m = c.train_step(state, c.put_batch(batch()), jax.random.key(0))
    assert float(m["tokens"]) == 8 * 16 - 2
    assert float(m["grad_norm"]) > 0


def test_loss_falls_when_overfitting_one_batch():
    c = make(lr=3e-3)
    state, rng = c.init_state(0), jax.random.key(0)
    with c.context():
        b = c.put_batch(batch())
        first = None
        for _ in range(60):
            state, m = c.train_step(state, b, rng)
            first = first or float(m["loss_sum"] / m["tokens"])
    last = float(m["loss_sum"] / m["tokens"])
    assert last < 0.3 * first


MESHES = {"data8": MeshConfig(data=8), "2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
          "fsdp8": MeshConfig(data=1, fsdp=8), "pmap8": MeshConfig(mode="pmap"), "1device": MeshConfig(data=1)}
# the Llama layout shares the decoder's step, batch and data paths: it is checked where its own
# parameters shard differently (KV heads and the gated MLP over tensor and fsdp)
LAYOUT_MESHES = ("2x2x2", "fsdp8")


# the encoder-decoder's step compiles two stacks: by default it is checked on fsdp 8 (every
# parameter split), on every other layout with -m slow
SLOW_FAMILY_MESHES = {"seq2seq": ("fsdp8",)}


def cases(meshes: tuple[str, ...]) -> list:
    out = []
    for f in sorted(FAMILIES):
        for m in meshes:
            if f == "llama" and m not in LAYOUT_MESHES:
                continue
            slow = f in SLOW_FAMILY_MESHES and m not in SLOW_FAMILY_MESHES[f]
            out.append(pytest.param(MESHES[m], f, id=f"{m}-{f}", marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("mesh_cfg,family", cases(("data8", "2x2x2", "fsdp8", "pmap8")))
def test_mesh_gives_the_same_losses_as_one_device(mesh_cfg, family):
    np.testing.assert_allclose(losses(make(mesh_cfg, family=family)), one_device(family, 8), rtol=1e-5)


@pytest.mark.parametrize("mesh_cfg,family", cases(("1device", "2x2x2", "pmap8")))
def test_microbatches_equal_one_big_batch(mesh_cfg, family):
    # 4 microbatches on the mesh == one batch 4 times as large on one device (rows hold
    # different token counts); every device gets whole rows in every microbatch (32 rows over
    # 8 pmap devices x 4), as train.batch_size must allow
    np.testing.assert_allclose(losses(make(mesh_cfg, rows=32, accum=4, family=family), rows=32),
                               one_device(family, 32), rtol=1e-5)


def test_eval_step_matches_train_metrics_without_update():
    c = make()
    state = c.init_state(0)
    with c.context():
        b = c.put_batch(batch())
        sums = c.eval_step(state.params, b)
        _, m = c.train_step(state, b, jax.random.key(0))
    np.testing.assert_allclose(float(sums["loss_sum"]), float(m["loss_sum"]), rtol=1e-6)


if __name__ == "__main__":  # prints the golden values
    print(tuple(losses(make(), steps=2)), file=sys.stdout)


@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f in SLOW_FAMILY_MESHES else [])
                                    for f in sorted(FAMILIES)])
def test_fsdp_each_device_holds_an_eighth_of_the_state(family):
    # widths where weights dominate, as in real models (biases over `heads`/`mlp` stay replicated)
    model = ModelConfig(num_layers=2, embed_dim=128, num_heads=4, vocab_size=512, max_len=32)
    task = {"decoder": lambda: ClmTask(model, np.ones(512, np.int32)),
            "llama": lambda: ClmTask(dataclasses.replace(model, num_kv_heads=2, mlp="swiglu", norm="rmsnorm",
                                                         use_bias=False, tie_embeddings=False), np.ones(512, np.int32)),
            "encoder": lambda: MlmTask(dataclasses.replace(model, positions="learned"), MlmConfig(), 16, 0,
                                       np.arange(4), np.zeros(512, bool), 3),
            "seq2seq": lambda: Seq2seqTask(dataclasses.replace(model, positions="relative", norm="rmsnorm", use_bias=False,
                                                               mlp="geglu", tie_embeddings=False), Seq2seqConfig(), 512),
            }[family]()
    tx = optim.optimizer(OptimConfig(), 10)
    device = jax.devices()[0]

    def bytes_on_device(mesh_cfg):
        c = Compiled(task, tx, sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg), 8, 16)
        leaves = jax.tree_util.tree_leaves(c.init_state(0))
        mine = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)
        return mine, sum(x.nbytes for x in leaves)

    replicated, total = bytes_on_device(MeshConfig(data=8))
    assert replicated == total
    fsdp, _ = bytes_on_device(MeshConfig(data=1, fsdp=8))
    assert fsdp <= total / 8 * 1.05


def test_mesh_errors_name_the_sizes_and_the_fix():
    def mesh(**sizes):
        return sharding.make_mesh(MeshConfig(**sizes))

    assert dict(mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(UserError, match="= 6 devices, but 8 are present"):
        mesh(data=3, fsdp=2)
    with pytest.raises(UserError, match="does not divide the 8 devices"):
        mesh(data=-1, fsdp=3)
    with pytest.raises(UserError, match=r"mesh.data=8 does not split over mesh.slices=3"):
        mesh(slices=3)
    # one process is one slice here (CPU devices carry no slice index); 2 slices need 2 processes
    with pytest.raises(UserError, match="mesh.slices=2 does not match the devices .* 1 processes"):
        mesh(slices=2)
