import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import sharding
from jaxlm.checkpoint import Checkpoints
from jaxlm.config import MeshConfig, ModelConfig
from jaxlm.errors import UserError
from jaxlm.steps import Compiled
from jaxlm.tasks.clm import ClmTask


def compiled(mesh_cfg):
    task = ClmTask(ModelConfig(num_layers=1, embed_dim=32, num_heads=4, vocab_size=64, max_len=16),
                   np.ones(64, np.int32))
    return Compiled(task, optax.adamw(1e-3), sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg), 8, 16)


def test_round_trip_restores_into_a_different_state_and_mesh(tmp_path):
    a = compiled(MeshConfig(data=8))
    state = a.init_state(seed=1)
    state = state.replace(step=jnp.asarray(7, jnp.int32),
                          opt_state=jax.tree_util.tree_map(lambda x: x + 1, state.opt_state))
    ckpt = Checkpoints(tmp_path / "ckpt", keep=2)
    ckpt.save(7, state, {"position": 3}, {"note": "x"})
    ckpt.close()

    b = compiled(MeshConfig(data=2, fsdp=4))  # another mesh: params now sharded over fsdp
    other = b.init_state(seed=2)
    table = ("token_embed", "embedding")
    assert not np.allclose(other.params[table[0]][table[1]], state.params[table[0]][table[1]])
    reader = Checkpoints(tmp_path / "ckpt", read_only=True)
    restored, data_state, meta = reader.restore(b.abstract_state)
    assert int(restored.step) == 7 and data_state == {"position": 3} and meta == {"note": "x"}
    for want, got, target in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored),
                                 jax.tree_util.tree_leaves(b.abstract_state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == target.sharding
    params, step = reader.restore_params(b.abstract_state.params)
    assert step == 7
    with pytest.raises(UserError, match="no checkpoint at step 3"):
        reader.restore_params(b.abstract_state.params, step=3)


def test_keep_limits_checkpoints(tmp_path):
    a = compiled(MeshConfig())
    state = a.init_state(0)
    ckpt = Checkpoints(tmp_path / "c", keep=2, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, state, {}, {})
    ckpt.close()
    assert Checkpoints(tmp_path / "c", read_only=True).all_steps() == [2, 3]


def test_missing_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoints"):
        Checkpoints(tmp_path / "none", read_only=True)
