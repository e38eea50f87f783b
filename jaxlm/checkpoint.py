"""Orbax checkpoints of a run (the only module that imports orbax).

Each checkpoint step holds four items:
  params  the model parameters (sharded arrays)
  opt     {"step", "opt_state"} (sharded arrays)
  data    the data iterator's position (JSON)
  meta    small facts about the run (JSON)
Parameters are a separate item so evaluation, inference and fine-tuning read only them.
Restoring always targets abstract arrays that carry shardings, so a checkpoint restores onto
any mesh or device count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm.errors import UserError


class Checkpoints:
    """One `CheckpointManager` over `<workdir>/checkpoints`."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise UserError(f"no checkpoints in '{self.directory.parent}'; train first or pass the run's --workdir")
        # readers simply never save (Orbax's read_only mode only adds warnings)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
            create=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Starts writing a checkpoint (in the background when async); returns at once."""
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ), force=True)

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise UserError(f"no checkpoints in '{self.directory}'; train first")
        if step is None:
            return max(steps)
        if step not in steps:
            raise UserError(f"no checkpoint at step {step} in '{self.directory}'; "
                            f"available: {', '.join(map(str, sorted(steps)))}")
        return step

    def _restore(self, step: int, **items: Any) -> Any:
        """Restores the named items of checkpoint `step`; a mismatch is one clear error."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {step} in '{self.directory}' does not match this model "
                            f"({str(e).splitlines()[0][:200]}); use the config it was trained with") from None

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, meta) onto the shardings of `abstract_state`."""
        out = self._restore(
            self._check_step(step),
            params=ocp.args.StandardRestore(abstract_state.params),
            opt=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore())
        state = abstract_state.replace(step=out.opt["step"], params=out.params,
                                       opt_state=out.opt["opt_state"])
        return state, out.data, out.meta

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores only the parameters; returns (params, step)."""
        step = self._check_step(step)
        return self._restore(step, params=ocp.args.StandardRestore(abstract_params)).params, step

    def data_state(self, step: int | None = None) -> dict:
        """The data position saved with checkpoint `step` (default: the latest)."""
        return self._restore(self._check_step(step), data=ocp.args.JsonRestore()).data

    def meta(self, step: int | None = None) -> dict:
        """The metadata saved with checkpoint `step` (default: the latest)."""
        return self._restore(self._check_step(step), meta=ocp.args.JsonRestore()).meta

    def wait(self) -> None:
        """Blocks until background writes are done."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding of each array of a tree (a restore target)."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
