"""Orbax checkpoints of a run (the only module that imports orbax).

Each checkpoint step holds four items:
  params  the model parameters (sharded arrays)
  opt     {"step", "opt_state"} (sharded arrays)
  data    the data iterator's position (JSON)
  meta    small facts about the run (JSON)
Parameters are a separate item so evaluation, inference and fine-tuning read only them.
Restoring always targets abstract arrays that carry shardings, so a checkpoint restores onto
any mesh or device count.

What a crash, a full disk or a damaged file can do to them:
- A save is written into a temporary directory and renamed into place once complete, so a
  process killed mid-save leaves no step a restore would read (the leftover is removed on the
  next run).
- Old checkpoints are deleted only after a newer save has completed without error, so the
  newest good checkpoint always stays; a save that fails is one `SaveFailed` error naming the
  directory, the reason and the checkpoint that is still intact.
- A restore first compares the saved shapes with the model's (a mismatch names the parameters);
  a newest checkpoint that cannot be read (truncated, missing or garbled files: Orbax's storage
  checksums its data) is reported on one line and the one before it is used. Training then sets
  the damaged one aside in `<workdir>/damaged-checkpoints/` so the step can be saved again.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm.errors import UserError

_ITEMS = ("params", "opt", "data", "meta")


class SaveFailed(UserError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class Damaged(Exception):
    """A checkpoint step that cannot be read back."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step} is damaged: {reason}")
        self.step, self.reason = step, reason


class Checkpoints:
    """One `CheckpointManager` over `<workdir>/checkpoints`, keeping the newest `keep` steps."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise UserError(f"no checkpoints in '{self.directory.parent}'; train first or pass the run's --workdir")
        self.keep, self.read_only, self.async_save = keep, read_only, async_save
        _quiet_orbax_failures()
        # old steps are pruned here (`_prune`), only once a newer save is known complete;
        # readers simply never save (Orbax's read_only mode only adds warnings)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        self._pending: int | None = None  # the step of a save that may still be in flight

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ----- saving -----

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Starts writing a checkpoint (in the background when async); returns at once.

        Raises `SaveFailed` if the previous save failed (it is noticed here, at `check` or at
        `close`)."""
        self._settle()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ), force=True)
        except Exception as e:  # a synchronous write, or the start of an async one, failed
            self._failed(step, e)
        self._pending = step
        if not self.async_save:
            self._settle()

    def check(self) -> None:
        """Raises `SaveFailed` as soon as a background save has failed; never waits. (Several
        processes settle saves together, at the next save or `close`: pruning is collective.)"""
        if self._pending is not None and jax.process_count() == 1 and not self._manager.is_saving_in_progress():
            self._settle()

    def wait(self) -> None:
        """Blocks until background writes are done (raises `SaveFailed` if one failed)."""
        self._settle()

    def close(self) -> None:
        try:
            self._settle()
        finally:
            self._manager.close()

    def _settle(self) -> None:
        """Waits for the save in flight; on success prunes steps beyond `keep`."""
        if self._pending is None:
            return
        step = self._pending
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            self._failed(step, e)
        self._manager.reload()
        if step not in self._manager.all_steps():  # Orbax skipped finalizing it after an error
            self._failed(step, RuntimeError("the save did not complete"))
        self._pending = None
        self._prune()

    def _prune(self) -> None:
        for old in self.all_steps()[:-self.keep]:
            self._manager.delete(old)

    def _failed(self, step: int, error: Exception) -> None:
        self._pending = None
        if jax.process_index() == 0:  # leave no partial directory behind to fill the disk
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        self._manager.reload()
        intact = [s for s in self.all_steps() if s != step]
        kept = (f"checkpoint {intact[-1]} is intact and a rerun resumes from it" if intact
                else "no earlier checkpoint exists")
        raise SaveFailed(f"could not write checkpoint {step} to '{self.directory}' ({_reason(error)}); "
                         f"{kept}. Free space there (or give the run a --workdir with room), then rerun") from None

    # ----- restoring -----

    def _candidates(self, step: int | None) -> list[int]:
        steps = self.all_steps()
        if not steps:
            raise UserError(f"no checkpoints in '{self.directory}'; train first")
        if step is None:
            return steps[::-1]
        if step not in steps:
            raise UserError(f"no checkpoint at step {step} in '{self.directory}'; "
                            f"available: {', '.join(map(str, steps))}")
        return [step]

    def _restore(self, step: int | None, abstract_params: Any = None, **items: Any) -> tuple[int, Any]:
        """(step, items) of checkpoint `step`, or of the newest readable one when `step` is None:
        a damaged newer one is named on one line and passed over (and, when training, set
        aside). Parameters are compared with `abstract_params` first."""
        damaged: list[Damaged] = []
        for candidate in self._candidates(step):
            try:
                if abstract_params is not None:
                    self._check_shapes(candidate, abstract_params)
                out = self._read(candidate, items)
            except Damaged as d:
                if step is not None:
                    raise UserError(f"checkpoint {step} in '{self.directory}' is damaged ({d.reason}); restore "
                                    f"another step (available: {', '.join(map(str, self.all_steps()))})") from None
                damaged.append(d)
                if jax.process_index() == 0:
                    print(f"checkpoint {d.step} in '{self.directory}' is damaged ({d.reason}); "
                          "trying the one before it", file=sys.stderr)
                continue
            if damaged and not self.read_only:
                self._set_aside([d.step for d in damaged])
            return candidate, out
        raise UserError(f"no readable checkpoint in '{self.directory}': "
                        + "; ".join(f"{d.step}: {d.reason}" for d in damaged)
                        + ". Move the directory away to start the run over")

    def _read(self, step: int, items: dict) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if (cause := _damage(e)) is not None:
                raise Damaged(step, _reason(cause, self.directory)) from None
            raise

    def _check_shapes(self, step: int, abstract_params: Any) -> None:
        """Names the parameters whose saved shape differs from the model's (another model)."""
        try:
            saved = self._manager.item_metadata(step)["params"]
        except Exception as e:
            if (cause := _damage(e)) is not None:
                raise Damaged(step, _reason(cause, self.directory)) from None
            raise
        if saved is None:
            raise Damaged(step, "the metadata of its parameters is missing")
        saved_shapes = _shapes(getattr(saved, "tree", saved))
        want = _shapes(abstract_params)
        if saved_shapes == want:
            return
        diff = [f"{p} {saved_shapes.get(p, 'absent')} saved, {want.get(p, 'absent')} here"
                for p in sorted(set(saved_shapes) | set(want)) if saved_shapes.get(p) != want.get(p)]
        raise UserError(f"checkpoint {step} in '{self.directory}' holds another model: "
                        f"{'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''} ({len(diff)} parameters differ). "
                        "Use the model config it was trained with, or another --workdir")

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps to `<workdir>/damaged-checkpoints/` (kept for inspection), so
        training can save those steps again."""
        from jaxlm import sharding  # a barrier: every process has read before one moves files
        sharding.barrier("jaxlm: checkpoint restored")
        if jax.process_index() == 0:
            aside = self.directory.parent / "damaged-checkpoints"
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(step)), str(target))
                print(f"moved damaged checkpoint {step} to '{target}'", file=sys.stderr)
        sharding.barrier("jaxlm: damaged checkpoints set aside")
        self._manager.reload()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, meta) onto the shardings of `abstract_state`."""
        _, out = self._restore(
            step, abstract_state.params,
            params=ocp.args.StandardRestore(abstract_state.params),
            opt=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore())
        state = abstract_state.replace(step=out.opt["step"], params=out.params,
                                       opt_state=out.opt["opt_state"])
        return state, out.data, out.meta

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores only the parameters; returns (params, step)."""
        step, out = self._restore(step, abstract_params, params=ocp.args.StandardRestore(abstract_params))
        return out.params, step

    def data_state(self, step: int | None = None) -> dict:
        """The data position saved with checkpoint `step` (default: the latest)."""
        return self._restore(step, data=ocp.args.JsonRestore())[1].data

    def meta(self, step: int | None = None) -> dict:
        """The metadata saved with checkpoint `step` (default: the latest)."""
        return self._restore(step, meta=ocp.args.JsonRestore())[1].meta


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding of each array of a tree (a restore target)."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): tuple(leaf.shape)
            for path, leaf in leaves}


# What reading a damaged checkpoint raises: TensorStore's status codes (a checksum or a short
# read), a file that is gone, JSON that does not parse, an item that is missing.
_DAMAGE = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN)\b"
                     r"|was not found in the checkpoint|No such file|does not exist|not a directory")


def _damage(error: BaseException | None) -> BaseException | None:
    """The error in `error`'s chain (Orbax wraps TensorStore's) that says the files are damaged."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OSError, json.JSONDecodeError)) or _DAMAGE.search(str(error)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _reason(error: Exception, directory: Path | None = None) -> str:
    """A short reason: what went wrong (and, given the checkpoint `directory`, in which file)."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        what, files = error.strerror.lower(), [error.filename] if error.filename else []
    else:
        known = re.search(r"No space left on device|Permission denied|Read-only file system|"
                          r"Disk quota exceeded|checksum|[Tt]runcated|Unexpected end", text)
        status = re.match(r"^([A-Z_]+):", text)
        what = (known.group(0).lower() if known else status.group(1).lower().replace("_", " ") if status
                else text.splitlines()[0].split(". ")[0][:200])
        files = re.findall(r'file "([^"]+)"', text)
    if directory is not None and files and str(directory) in str(files[-1]):
        what += f" in {Path(files[-1]).relative_to(directory)}"
    return what


class _DropOrbaxNoise(logging.Filter):
    """Orbax logs a failed background write with its traceback, its writes left unawaited after
    the failure log theirs through asyncio, and TensorStore's callbacks can land on an event loop
    Orbax already closed; all of it is reported as one `SaveFailed` or `Damaged` line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return not record.getMessage().split("\n")[0].endswith("exception was never retrieved")
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _quiet_orbax_failures() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropOrbaxNoise) for f in logger.filters):
            logger.addFilter(_DropOrbaxNoise())
    if getattr(sys.unraisablehook, "_jaxlm", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    hook._jaxlm = True
    sys.unraisablehook = hook
