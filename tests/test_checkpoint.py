import shutil
from pathlib import Path

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


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_limits_checkpoints(tmp_path, async_save):
    a = compiled(MeshConfig())
    state = a.init_state(0)
    ckpt = Checkpoints(tmp_path / "c", keep=2, async_save=async_save)
    for step in (1, 2, 3):
        ckpt.save(step, state, {}, {})
    ckpt.close()
    assert Checkpoints(tmp_path / "c", read_only=True).all_steps() == [2, 3]


def test_missing_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoints"):
        Checkpoints(tmp_path / "none", read_only=True)


def saved_steps(directory: Path, steps=(1, 2, 3)):
    """Checkpoints at `steps` whose parameters differ (all + step), and the states saved."""
    a = compiled(MeshConfig())
    base, states = a.init_state(0), {}
    ckpt = Checkpoints(directory, keep=len(steps), async_save=False)
    for step in steps:
        states[step] = base.replace(step=jnp.asarray(step, jnp.int32),
                                    params=jax.tree_util.tree_map(lambda x, s=step: x + s, base.params))
        ckpt.save(step, states[step], {"next_row": step}, {"step": step})
    ckpt.close()
    return a, states


def largest_file(item: Path) -> Path:
    """The largest data file an item's restore reads (Orbax merges each process's writes into `d/`)."""
    return max((item / "d").iterdir(), key=lambda p: p.stat().st_size)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # what each does to a checkpoint step directory
    "truncated": lambda d: largest_file(d / "params").write_bytes(largest_file(d / "params").read_bytes()[:10]),
    "garbled": lambda d: flip_a_byte(largest_file(d / "params")),
    "emptied": lambda d: largest_file(d / "opt").write_bytes(b""),
    "item missing": lambda d: shutil.rmtree(d / "opt"),
    "manifest missing": lambda d: (d / "params" / "manifest.ocdbt").unlink(),
    "broken json": lambda d: (d / "data" / "metadata").write_text("{bad"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_restored(tmp_path, capsys, damage):
    a, states = saved_steps(tmp_path / "c")
    DAMAGE[damage](tmp_path / "c" / "3")
    reader = Checkpoints(tmp_path / "c", read_only=True)  # evaluate / infer: fall back, move nothing
    assert int(reader.restore(a.abstract_state)[0].step) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "checkpoint 3 in " in lines[0] and "is damaged (" in lines[0], lines
    with pytest.raises(UserError, match="checkpoint 3 in .* is damaged"):  # asked for by step: no fallback
        reader.restore(a.abstract_state, step=3)
    assert reader.all_steps() == [1, 2, 3]

    writer = Checkpoints(tmp_path / "c", keep=2, async_save=False)  # training: the rerun sets 3 aside
    state, data_state, meta = writer.restore(a.abstract_state)
    assert int(state.step) == 2 and data_state == {"next_row": 2} and meta == {"step": 2}
    for want, got in zip(jax.tree_util.tree_leaves(states[2]), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert writer.all_steps() == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged-checkpoints").iterdir()] == ["3"]
    writer.save(3, states[3], {"next_row": 3}, {"step": 3})  # the step can be saved again
    writer.close()
    assert Checkpoints(tmp_path / "c", read_only=True).all_steps() == [2, 3]


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(tmp_path):
    a, _ = saved_steps(tmp_path / "c", steps=(1, 2))
    for step in (1, 2):
        DAMAGE["garbled"](tmp_path / "c" / str(step))
    writer = Checkpoints(tmp_path / "c", keep=2, async_save=False)
    with pytest.raises(UserError, match="no readable checkpoint .*2: checksum.*1: checksum"):
        writer.restore(a.abstract_state)
    assert writer.all_steps() == [1, 2] and not (tmp_path / "damaged-checkpoints").exists()


def test_a_checkpoint_of_another_model_names_the_parameters(tmp_path):
    saved_steps(tmp_path / "c", steps=(1,))
    wider = Compiled(ClmTask(ModelConfig(num_layers=1, embed_dim=48, num_heads=4, vocab_size=64, max_len=16),
                             np.ones(64, np.int32)), optax.adamw(1e-3), sharding.make_mesh(MeshConfig()),
                     sharding.rules(MeshConfig()), 8, 16)
    with pytest.raises(UserError, match=r"holds another model: block_0/attention/key/bias \(4, 8\) saved, "
                                        r"\(4, 12\) here; .* \(19 parameters differ\)"):
        Checkpoints(tmp_path / "c", read_only=True).restore_params(wider.abstract_state.params)
