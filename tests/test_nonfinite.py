"""Numerical faults: a step with a NaN/Inf loss or gradient drops its update, and the loop stops
(or skips, up to `train.max_skipped` in a row) with the last good state saved; parameters are
never written with NaN or Inf."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import train
from jaxlm.checkpoint import Checkpoints
from jaxlm.workdir import open_run, shapes_run

DIVERGE = ["optim.learning_rate=1e6", "optim.clip_norm=0", "optim.warmup_steps=0", "optim.schedule=constant"]


def test_a_nonfinite_step_keeps_the_state_and_says_so(tiny):
    run = shapes_run(config_lib.load(None, tiny + ["optim.warmup_steps=0"]), mode="jit")
    c = run.compiled
    with c.context():
        batch = c.put_batch(run.task.synthetic_batch(16, 32, np.random.default_rng(0)))
        state = c.init_state(0)
        initial = jax.device_get(state.params)  # the step donates its input state
        good, metrics = c.train_step(state, batch, jax.random.key(0))
        assert float(metrics["nonfinite"]) == 0.0
        changed = jax.tree_util.tree_map(lambda a, b: bool((a != b).any()), initial, jax.device_get(good.params))
        assert all(jax.tree_util.tree_leaves(changed))  # a finite step updates every parameter
        # a NaN in one parameter: the loss and gradient are NaN, and nothing is updated
        poisoned = jax.tree_util.tree_map(lambda x: x, good)
        leaves, tree = jax.tree_util.tree_flatten(poisoned.params)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
        poisoned = poisoned.replace(params=jax.tree_util.tree_unflatten(tree, leaves))
        before = jax.device_get(poisoned)
        after, metrics = c.train_step(poisoned, batch, jax.random.key(0))
        assert float(metrics["nonfinite"]) == 1.0 and int(after.step) == int(before.step) + 1
        for a, b in zip(jax.tree_util.tree_leaves((before.params, before.opt_state)),
                        jax.tree_util.tree_leaves(jax.device_get((after.params, after.opt_state)))):
            np.testing.assert_array_equal(a, b)


def finite_params(workdir) -> tuple[int, bool]:
    run, ckpt = open_run(workdir)
    params, step = ckpt.restore_params(run.compiled.abstract_state.params)
    return step, all(bool(np.isfinite(x).all()) for x in jax.tree_util.tree_leaves(jax.device_get(params)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_divergence_stops_with_exit_3_and_the_last_good_state_saved(tiny, tmp_path, capsys, dtype):
    """The learning rate blows the weights up until the activations overflow (in bfloat16
    compute as well); the run stops at that step with the last finite state saved, and a rerun
    with train.on_nonfinite=skip (what the message suggests) is accepted on the same workdir."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--workdir", str(tmp_path / "w"), *tiny, *DIVERGE, "train.steps=30", f"model.dtype={dtype}"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error: step"))
    bad = int(line.split()[2].rstrip(":"))
    assert "is not finite" in line and "last good state is saved at step" in line
    step, finite = finite_params(tmp_path / "w")
    assert bad <= step < 30 and finite
    assert Checkpoints(tmp_path / "w" / "checkpoints", read_only=True).latest_step() == step
    if dtype == "bfloat16":
        return
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--workdir", str(tmp_path / "w"), *tiny, *DIVERGE, "train.steps=30",
                    "train.on_nonfinite=skip", "train.max_skipped=2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and f"resumed from step {step}" in err
    assert "was not finite 2 steps in a row" in err


def test_skip_drops_steps_then_stops_after_max_skipped_in_a_row(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--workdir", str(tmp_path / "w"), *tiny, *DIVERGE, "train.steps=30",
                    "train.on_nonfinite=skip", "train.max_skipped=3", "train.log_every=1"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert err.count("update was skipped (") == 2  # the first two of three in a row
    assert "was not finite 3 steps in a row" in err
    logged = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_steps", 0) for r in logged) >= 2
    _, finite = finite_params(tmp_path / "w")
    assert finite
