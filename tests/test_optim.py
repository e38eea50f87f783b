import dataclasses
import fnmatch

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ModelConfig, OptimConfig
from jaxlm.optim import decay_mask, optimizer, schedule
from jaxlm.tasks.classify import ClassifyTask
from jaxlm.tasks.clm import ClmTask
from jaxlm.tasks.mlm import MlmTask


@pytest.mark.parametrize("name", ["linear", "cosine", "rsqrt", "constant", "wsd"])
def test_schedules_warm_up_to_the_peak(name):
    cfg = OptimConfig(learning_rate=1.0, schedule=name, warmup_steps=10, end_lr_fraction=0.1)
    lr = schedule(cfg, 100)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)


def test_schedule_ends():
    def end(name):
        return float(schedule(OptimConfig(learning_rate=1.0, schedule=name, warmup_steps=10,
                                          end_lr_fraction=0.1, decay_fraction=0.2), 100)(100))
    assert end("linear") == pytest.approx(0.1)
    assert end("cosine") == pytest.approx(0.1)
    assert end("constant") == pytest.approx(1.0)
    assert end("wsd") == pytest.approx(0.1)
    assert end("rsqrt") == pytest.approx((10 / 100) ** 0.5)
    wsd = schedule(OptimConfig(learning_rate=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2), 100)
    assert float(wsd(79)) == pytest.approx(1.0) and float(wsd(90)) < 1.0


def test_warmup_longer_than_the_run_rises_without_reaching_the_peak():
    lr = schedule(OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=30), 20)
    rates = [float(lr(s)) for s in range(20)]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(19 / 30)


MODEL = ModelConfig(num_layers=2, embed_dim=16, num_heads=2, vocab_size=64, max_len=16)
SEQ = 8


def _tasks(cfg: ModelConfig):
    from jaxlm.config import MlmConfig
    special = np.array([0, 1, 2, 3])
    return {"decoder": ClmTask(cfg, np.ones(64)),
            "encoder_mlm_nsp": MlmTask(cfg, MlmConfig(nsp=True), SEQ, 0, special, np.zeros(64, bool), 3),
            "encoder_classifier": ClassifyTask(cfg, 3)}


def _paths(mask) -> dict[str, bool]:
    flat = jax.tree_util.tree_leaves_with_path(mask)
    return {"/".join(k.key for k in path): value for path, value in flat}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("family", ["decoder", "encoder_mlm_nsp", "encoder_classifier"])
def test_weight_decay_only_on_kernels_and_embeddings(family, scan):
    cfg = dataclasses.replace(MODEL, scan_layers=scan, tie_embeddings=family != "decoder",
                              positions="learned" if family != "decoder" else "rotary")
    task = _tasks(cfg)[family]
    boxed = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(2, SEQ))["params"]
    params = nn.meta.unbox(boxed)
    mask = _paths(decay_mask(params))
    assert nn.meta.unbox(decay_mask(boxed)) == decay_mask(params)  # the optimizer's init sees boxed ones
    decayed = {p for p, v in mask.items() if v}
    kept = {p for p, v in mask.items() if not v}
    assert all(p.endswith(("/kernel", "/embedding")) for p in decayed)
    assert all(p.endswith(("/bias", "/scale", "mlm_bias")) for p in kept)
    block = "blocks" if scan else "block_0"
    prefix = "" if family == "decoder" else "encoder/"
    must_decay = {f"{prefix}{block}/attention/query/kernel", f"{prefix}{block}/mlp/wi/kernel",
                  f"{prefix}token_embed/embedding"}
    must_not = {f"{prefix}{block}/attention/query/bias", f"{prefix}{block}/attention/out/bias",
                f"{prefix}{block}/ln_attention/*/scale", f"{prefix}{block}/mlp/wo/bias"}
    if family == "decoder":
        must_decay.add("lm_head/kernel")
        must_not.add("ln_final/*/scale")
    else:
        must_not |= {"encoder/ln_embed/*/bias", "encoder/pooler/bias"}
    if family == "encoder_mlm_nsp":
        must_not |= {"mlm_bias", "mlm_ln/*/scale", "nsp/bias"}
    for pattern in must_decay:
        assert fnmatch.filter(decayed, pattern) and not fnmatch.filter(kept, pattern), pattern
    for pattern in must_not:
        assert fnmatch.filter(kept, pattern) and not fnmatch.filter(decayed, pattern), pattern


def test_adamw_leaves_biases_undecayed():
    """With zero gradients, only decayed parameters move (AdamW's decay term alone)."""
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((2, 4))}, "ln": {"scale": jnp.ones((2, 4))}}
    tx = optimizer(OptimConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5), 10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["dense"]["kernel"]).min()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["ln"]["scale"]).max()) == 0
