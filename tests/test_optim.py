import jax.numpy as jnp
import pytest

from jaxlm.config import OptimConfig
from jaxlm.optim import decay_mask, schedule


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


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "ln": {"scale": jnp.ones(4)},
              "embed": {"embedding": jnp.ones((10, 4))}}
    mask = decay_mask(params)
    assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
                    "embed": {"embedding": True}}
