"""`python -m jaxlm.train`: train a model, resuming from the workdir's latest checkpoint.

    python -m jaxlm.train [--config FILE] [--workdir DIR] [--compile-only] [key=value ...]

With no --config the config saved in --workdir applies (a rerun, or a workdir made by
`python -m jaxlm.hf import`), else the built-in defaults (= configs/gpt_tiny.yaml); with no
--workdir a new directory under runs/ is made. Rerunning the same command on the same workdir resumes from the
latest checkpoint, data position included.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import optim, perf, sharding, tasks
from jaxlm.checkpoint import Checkpoints
from jaxlm.config import Config
from jaxlm.data import pipeline
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import Diverged, UserError, cli
from jaxlm.metrics import add_sums
from jaxlm.microbatch import Layout
from jaxlm.models import flops
from jaxlm.models.layers import restack
from jaxlm.tasks.base import batch_rows
from jaxlm.workdir import (
    Run,
    build,
    check_same_run,
    inherit_model,
    open_run,
    shapes_run,
    use_compile_cache,
    with_vocab,
)
from jaxlm.writers import Writers

# Steps the host may dispatch beyond the one the device is finishing. One keeps input preparation
# and dispatch overlapped with compute, and bounds what a stop or a checkpoint waits for (and
# the batches held in device memory) to about two steps, whatever train.log_every is.
RUN_AHEAD = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.train", description=__doc__.split("\n\n")[0],
        epilog="every config key, with its meaning, is in configs/gpt_tiny.yaml\n\n"
               "examples:\n  python -m jaxlm.train\n"
               "  python -m jaxlm.train --config configs/gpt_tiny.yaml --workdir runs/x "
               "train.steps=200 model.num_layers=4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: built-in gpt_tiny)")
    parser.add_argument("--workdir", help="run directory (default: runs/<date-time>)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the train step, print memory and FLOPs, and exit")
    parser.add_argument("--device-memory-gib", type=float, default=0.0, metavar="N",
                        help="with --compile-only: say whether the step fits a device of N GiB "
                             "(exit code 1 if not) and which knobs to turn")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.device_memory_gib and not args.compile_only:
        raise UserError("--device-memory-gib goes with --compile-only")
    if args.device_memory_gib < 0:
        raise UserError(f"--device-memory-gib={args.device_memory_gib} must be positive")
    return args


def prepare(config: Config, workdir: Path, mode: str | None = None) -> tuple[Run, dict[str, Any]]:
    """Compiled steps for training and the task's data rows; saves the resolved config."""
    config = tasks.task_class(config).resolve(inherit_model(config))
    if (workdir / "config.yaml").is_file():  # a rerun: refuse a different run before any work
        saved = config_lib.load_workdir(workdir)
        vocab = config.model.vocab_size or saved.model.vocab_size
        check_same_run(saved, dataclasses.replace(
            config, model=dataclasses.replace(config.model, vocab_size=vocab)), workdir)

    # process 0 prepares data and tokenizer first; the others then find them (shared disks)
    # or make identical copies of their own
    if jax.process_index() == 0:
        tok, rows = task_data(config, workdir)
    sharding.barrier("jaxlm: data prepared")
    if jax.process_index() != 0:
        tok, rows = task_data(config, workdir)
    config = with_vocab(config, tok)
    if jax.process_index() == 0:
        config_lib.save(config, workdir / "config.yaml")
    use_compile_cache(config)
    return build(config, tok, mode), rows


def task_data(config: Config, workdir: Path) -> tuple[TextTokenizer, dict[str, Any]]:
    """The run's tokenizer (trained on the task's train split, or loaded) and the task's rows,
    every split encoded now (so bad data in any of them stops the run before its first step)."""
    task = tasks.task_class(config)
    splits = tasks.load_splits(config)
    tok = tokenizer_lib.obtain(config.data, splits, workdir, config.seed)
    rows = task.rows(config, splits, tok)
    return tok, {name: rows[name] for name in rows}


def packer(run: Run, rows: Any, microbatches: int = 1) -> Callable | None:
    """The task's packing of this process's batches, in the groups the step sees whole."""
    host = run.config.train.batch_size // jax.process_count()
    return run.task.packer(rows, Layout(run.compiled.blocks, microbatches), host)


def evaluate(run: Run, params, rows: Any) -> dict[str, float]:
    """Metrics over eval rows (or their first `train.eval_batches` batches); where the rows
    come in labeled parts (the sources of a data mixture), also each part's, as `<label>/<metric>`.
    A task that scores predictions (e.g. exact match of answers) is evaluated on all the rows; one
    scored on generated text (BLEU) decodes the first `train.decode_eval_examples`."""
    return evaluate_outputs(run, params, rows, run.config.train.decode_eval_examples)[0]


def evaluate_outputs(run: Run, params, rows: Any, decoded: int | None = None
                     ) -> tuple[dict[str, float], dict[str, str]]:
    """`evaluate`'s metrics, and the files the task's predictions make (name -> text), if any;
    a task scored on generated text decodes `decoded` examples (None: all)."""
    if hasattr(run.task, "score"):  # one pass over all the rows: metric sums and predictions
        sums, outputs = _predictions(run, params, rows)
        scored, files = run.task.score(rows, outputs)
        return {**run.task.summarize(sums), **scored}, files
    sums = {label: _eval_sums(run, params, part) for label, part in pipeline.parts_of(rows).items()}
    total = {k: sum(s[k] for s in sums.values()) for k in next(iter(sums.values()))}
    parts = {f"{label}/{k}": v for label, s in sums.items() if label for k, v in run.task.summarize(s).items()}
    scored, files = {}, {}
    if hasattr(run.task, "decode_score") and decoded != 0:
        scored, files = run.task.decode_score(run, params, rows, decoded)
    return {**run.task.summarize(total), **parts, **scored}, files


def _predictions(run: Run, params, rows: Any) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metric sums over all of `rows`, and the task's per-row prediction outputs, in order, on
    every process."""
    total, outputs = None, []
    with run.compiled.context():
        for batch in pipeline.eval_batches(rows, run.config.train.batch_size, 0, jax.process_index(),
                                           jax.process_count()):
            sums, out = run.compiled.predict(params, batch)
            total = add_sums(total, sums)
            outputs.append(out)
    return total, {k: np.concatenate([o[k] for o in outputs])[:len(rows)] for k in outputs[0]}


def _eval_sums(run: Run, params, rows: Any) -> dict[str, float]:
    cfg = run.config
    total = None
    with run.compiled.context():
        for batch in pipeline.eval_batches(rows, cfg.train.batch_size, cfg.train.eval_batches,
                                           jax.process_index(), jax.process_count(), packer(run, rows)):
            total = add_sums(total, run.compiled.eval_step(params, run.compiled.put_batch(batch)))
    if total is None:
        raise UserError("the eval split yields no batch; give more eval data")
    return total


def open_data(run: Run, rows: Any, saved: dict | None) -> pipeline.TrainBatches:
    """This process's training batches, at the global row the checkpoint (if any) reached.

    The position is a count of rows, so it carries over to any process count or batch size.
    """
    cfg = run.config
    return pipeline.TrainBatches(rows, cfg.train.batch_size, cfg.seed, pipeline.start_row(rows, saved),
                                 jax.process_index(), jax.process_count(),
                                 packer(run, rows, cfg.train.grad_accum_steps), cfg.data.prefetch)


def initial_params(run: Run, params: Any) -> Any:
    """`params` with the `init.subtree` taken from `init.from_workdir` (fine-tuning), if set."""
    init = run.config.init
    if not init.from_workdir:
        return params
    source, ckpt = open_run(init.from_workdir)
    loaded, step = ckpt.restore_params(source.compiled.abstract_state.params)
    loaded = restack(loaded, run.config.model.scan_layers)  # either layout fine-tunes the other
    if init.subtree == "all":  # the whole model: every parameter but the adapters comes from the source
        print(f"initialised every parameter from {init.from_workdir} (step {step})", file=sys.stderr)
        return _taken(params, loaded, init.from_workdir, run.compiled.state_sharding.params)
    if init.subtree not in loaded or init.subtree not in params:
        raise UserError(f"init.subtree={init.subtree!r} is not in both models' parameters "
                        f"(source has {', '.join(loaded)}; this run has {', '.join(params)})")
    taken = _taken({init.subtree: params[init.subtree]}, {init.subtree: loaded[init.subtree]}, init.from_workdir,
                   {init.subtree: run.compiled.state_sharding.params[init.subtree]})
    print(f"initialised {init.subtree} from {init.from_workdir} (step {step})", file=sys.stderr)
    return {**params, **taken}


def _taken(params: dict, loaded: dict, source: str, shardings: dict) -> dict:
    """`params` with each parameter `loaded` holds (of the same shape) taken from it; only LoRA
    adapters may be missing there (they start fresh)."""
    def pick(path, mine, sharding):
        theirs = loaded
        for key in path:
            theirs = theirs.get(key.key) if isinstance(theirs, dict) else None
        if theirs is None:
            if path[-1].key in optim.ADAPTERS:
                return mine
            raise UserError(f"'{source}' has no parameter {jax.tree_util.keystr(path)}; fine-tune with the "
                            "source's model config")
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            raise UserError(f"'{source}' has other shapes than this model ({jax.tree_util.keystr(path)}: "
                            f"{theirs.shape} vs {mine.shape}); fine-tune with the source's model config")
        return jax.device_put(theirs, sharding)
    return jax.tree_util.tree_map_with_path(pick, params, shardings)


class Best:
    """Keeps the checkpoint with the best eval `metric` in its own directory (off when empty).

    Metrics in `lower_is_better` (the task says which) are better lower, every other metric
    higher. A resumed run knows the best so far.
    """

    def __init__(self, directory: Path, metric: str, async_save: bool, lower_is_better: frozenset[str]):
        self.metric = metric
        self.lower = metric in lower_is_better
        self._ckpt = Checkpoints(directory, keep=1, async_save=async_save) if metric else None
        self.value = None
        if self._ckpt is not None and self._ckpt.latest_step() is not None:
            self.value = self._ckpt.meta().get(metric)

    def offer(self, step: int, metrics: dict[str, float], state: Any, data_state: dict) -> None:
        if self._ckpt is None:
            return
        if self.metric not in metrics:
            raise UserError(f"checkpoint.best_metric={self.metric!r} is not an eval metric of this task "
                            f"({', '.join(metrics)})")
        value = metrics[self.metric]
        if self.value is None or (value < self.value if self.lower else value > self.value):
            self.value = value
            self._ckpt.save(step, state, data_state, {"step": step, self.metric: value})

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()


class _StopFlag:
    """Within `with`, SIGTERM/SIGINT ask the loop to checkpoint and exit instead of dying mid-step."""

    def __init__(self):
        self.stop = False
        self.at: float | None = None  # time.time() of the first signal
        self._previous = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.stop:  # a second signal: give up at once
            raise KeyboardInterrupt
        print(f"\nsignal {signum}: saving a checkpoint, then stopping (again to abort)", file=sys.stderr)
        self.stop, self.at = True, time.time()


class Profile:
    """A `jax.profiler` trace of steps [first, last] (`train.profile_steps`) in `directory`, for
    TensorBoard's profile plugin or Perfetto. The trace covers the steps' device work: it starts
    before `first` is dispatched and stops once `last` has finished."""

    def __init__(self, directory: Path, steps: list[int]):
        self.directory = directory
        self.first, self.last = steps if steps else (0, -1)
        self.active = False

    def before(self, step: int) -> None:
        """Call before dispatching `step`."""
        if step == self.first and jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True
            print(f"profiling steps {self.first}-{self.last} into {self.directory}", file=sys.stderr)

    def after(self, step: int) -> bool:
        """Whether the trace should stop now that `step` is dispatched (wait for it first)."""
        return self.active and step >= self.last

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            print(f"wrote a profile of steps {self.first}-{self.last}: "
                  f"tensorboard --logdir {self.directory} (Profile tab), or open the .trace.json.gz in "
                  "https://ui.perfetto.dev", file=sys.stderr)


class NonFinite:
    """The loop's answer to steps whose loss or gradient was not finite (the step itself
    already dropped their update, `steps.train_step`): `stop` at the first, or `skip` up to
    `max_skipped` in a row; `halt` then holds the message to stop with."""

    def __init__(self, policy: str, max_skipped: int):
        self.policy, self.max_skipped = policy, max_skipped
        self.total = self.in_a_row = 0
        self.halt: str | None = None

    def saw(self, step: int, nonfinite: bool) -> None:
        if not nonfinite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.policy == "skip" and self.in_a_row < self.max_skipped:
            print(f"step {step}: the loss or gradient is not finite; its update was skipped "
                  f"({self.in_a_row} in a row, {self.total} in all)", file=sys.stderr)
        elif self.halt is None:
            stop = self.policy == "stop"
            what = "is not finite" if stop else f"was not finite {self.in_a_row} steps in a row"
            self.halt = (f"step {step}: the loss or gradient {what} (NaN or Inf); no update with it was "
                         "applied. Lower optim.learning_rate, set optim.clip_norm, or train in float32 "
                         "(model.dtype)" + ("; train.on_nonfinite=skip drops such steps and goes on" if stop else ""))


def train(config: Config, workdir: Path) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the final eval metrics."""
    workdir.mkdir(parents=True, exist_ok=True)
    run, rows = prepare(config, workdir)
    cfg, c = run.config, run.compiled
    tcfg = cfg.train
    ckpt = Checkpoints(workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
    best = Best(workdir / "best", cfg.checkpoint.best_metric, cfg.checkpoint.async_save,
                run.task.lower_is_better)
    start_step, saved_data = 0, None
    if ckpt.latest_step() is not None:
        state, saved_data, _ = ckpt.restore(c.abstract_state)
        start_step = int(state.step)
        state = c.adopt(state)
        print(f"resumed from step {start_step} in {workdir}", file=sys.stderr)
    else:
        state = c.init_state(cfg.seed)
        if cfg.init.from_workdir:  # fine-tuning: part of the parameters from another run
            one = c.saveable(state)
            state = c.adopt(one.replace(params=initial_params(run, one.params)))
    data = open_data(run, rows["train"], saved_data)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(c.abstract_state.params))
    layout = (f"pmap over {jax.device_count()} devices" if cfg.mesh.mode == "pmap"
              else f"{c.mesh.size} devices {dict(c.mesh.shape)}")
    print(f"training {n_params:,} parameters for {tcfg.steps} steps on {layout}; workdir {workdir}",
          file=sys.stderr)

    writers = Writers(workdir, tcfg.steps, start_step, enabled=jax.process_index() == 0)
    lr_at = optim.schedule(cfg.optim, tcfg.steps)
    if cfg.optim.warmup_steps >= tcfg.steps:
        print(f"note: optim.warmup_steps={cfg.optim.warmup_steps} is not below train.steps={tcfg.steps}, "
              f"so the learning rate rises to {float(lr_at(tcfg.steps - 1)):.2e} and never reaches its "
              f"peak {cfg.optim.learning_rate:.2e}", file=sys.stderr)
    rng = jax.random.key(cfg.seed)  # the run's key; the step draws from its streams (jaxlm.rngs)
    peak = perf.utilisation_peak(cfg)
    profile = Profile(workdir / "profile", tcfg.profile_steps)
    last_eval: dict[str, float] = {}
    clock, clock_step = time.time(), start_step
    inflight: deque = deque()  # (step, device metrics, rows) of dispatched steps not yet seen finished
    rows_done = 0  # rows of model input the steps finished since the last log computed
    data_wait = 0.0  # seconds spent waiting for input batches since the last log
    nonfinite = NonFinite(tcfg.on_nonfinite, tcfg.max_skipped)

    def log_train(step: int, device_metrics) -> None:
        nonlocal clock, clock_step, data_wait, rows_done
        sums = add_sums(None, device_metrics)  # waits for that step only
        now = time.time()
        steps = max(step - clock_step, 1)
        seconds = max(now - clock, 1e-9)
        # the rows the steps computed, not the examples they took: packing puts several in a row
        model_flops = flops.train_step(run.task.forward_flops(rows_done, cfg.data.seq_len))
        tflops = model_flops / jax.device_count() / seconds / 1e12  # model TFLOP/s per device
        values = {**run.task.summarize(sums), "learning_rate": float(lr_at(step - 1)), "grad_norm": sums["grad_norm"],
                  "tokens_per_s": rows_done * cfg.data.seq_len / seconds,
                  "examples_per_s": tcfg.batch_size * steps / seconds, "model_tflops_per_device": tflops,
                  **({"mfu": tflops * 1e12 / peak} if peak else {}),
                  "data_wait_s": data_wait / steps, "eta_s": writers.eta(step),
                  **({"skipped_steps": nonfinite.total} if nonfinite.total else {})}
        clock, clock_step, data_wait, rows_done = now, step, 0.0, 0
        writers.write(step, "train", values)

    def finish(unfinished: int) -> None:
        """Waits until at most `unfinished` dispatched steps are still running; logs and counts
        the finished ones (so the console and TensorBoard show steps the device has done)."""
        nonlocal rows_done
        while len(inflight) > unfinished:
            done, device_metrics, rows = inflight.popleft()
            rows_done += rows
            jax.block_until_ready(device_metrics)  # that step, all of it
            nonfinite.saw(done, bool(device_metrics["nonfinite"]))
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                log_train(done, device_metrics)
            writers.advance(done)

    step = start_step
    if start_step >= tcfg.steps:
        print(f"'{workdir}' is already trained to step {start_step} (train.steps={tcfg.steps}); "
              "raise train.steps to train longer", file=sys.stderr)
    vote = sharding.StopVote(cfg.distributed.timeout_s)
    stopping = False  # every process agrees on it at each step (one signalled process stops all)
    try:
        with c.context(), _StopFlag() as signal_flag:
            while step < tcfg.steps and not stopping:
                asked = time.perf_counter()
                host_batch = next(data)
                data_wait += time.perf_counter() - asked
                batch = c.put_batch(host_batch)
                profile.before(step + 1)
                state, metrics = c.train_step(state, batch, rng)
                step += 1
                inflight.append((step, metrics, batch_rows(run.task, host_batch) * jax.process_count()))
                # wait for step N - 1 while step N runs: the next batch is prepared and dispatched
                # in the meantime, and a stop (or a checkpoint) never waits for a queue of steps
                finish(RUN_AHEAD)
                if nonfinite.halt:  # every update applied so far was finite: save, then stop
                    finish(0)
                    ckpt.save(step, c.saveable(state), data.get_state(), {"step": step, "time": time.time()})
                    break
                if profile.after(step):
                    finish(0)
                    profile.stop()
                ckpt.check()  # a background save that failed ends the run now, not at the next save
                stopping = vote(step, signal_flag.stop)
                if stopping and not signal_flag.stop:
                    print(f"another process was signalled: saving a checkpoint at step {step}, then stopping",
                          file=sys.stderr)
                    signal_flag.at = time.time()
                if (step % tcfg.eval_every == 0 or step == tcfg.steps) and not stopping:  # a stop saves first
                    finish(0)
                    last_eval = evaluate(run, state.params, rows["eval"])
                    writers.write(step, "eval", last_eval)
                    best.offer(step, last_eval, c.saveable(state), data.get_state())
                if step % cfg.checkpoint.every == 0 or step == tcfg.steps or stopping:
                    ckpt.save(step, c.saveable(state), data.get_state(), {"step": step, "time": time.time()})
            finish(0)
    finally:  # finish writing checkpoints even when a step fails: no lost work
        profile.stop()
        ckpt.close()
        best.close()
        writers.close()
    if nonfinite.halt:
        raise Diverged(f"{nonfinite.halt}. The last good state is saved at step {step}; a rerun resumes there")
    if stopping:
        took, grace = time.time() - signal_flag.at, cfg.checkpoint.preemption_grace_s
        print(f"stopped at step {step}; its checkpoint was complete {took:.1f} s after the signal; "
              "rerun the same command to resume", file=sys.stderr)
        if took > grace:
            print(f"warning: that is more than checkpoint.preemption_grace_s={grace:g}: a preempted run would "
                  "have been killed before its checkpoint was complete (and resumed from the one before). "
                  "Ask the scheduler for a longer notice (SLURM: --signal=TERM@<seconds>), and set "
                  "checkpoint.preemption_grace_s to the notice you have", file=sys.stderr)
    return last_eval


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    saved = args.workdir and not args.config and (Path(args.workdir) / "config.yaml").is_file()
    # a rerun (or an imported workdir) without --config continues with the config saved there
    config = config_lib.load_workdir(args.workdir, args.overrides) if saved else config_lib.load(args.config, args.overrides)
    sharding.initialize_distributed(config.distributed)
    if config.mesh.mode == "pmap":  # refused before any data work
        sharding.check_pmap_processes()
    if args.compile_only:  # shapes only: no data, no workdir
        if config.mesh.mode == "pmap":
            print("pmap mode: compiling the equivalent data-parallel mesh", file=sys.stderr)
        if not perf.compile_only(shapes_run(config, mode="jit"), args.device_memory_gib):
            sys.exit(1)
        return
    workdir = Path(args.workdir or time.strftime("runs/%Y%m%d-%H%M%S"))
    start = time.time()
    final = train(config, workdir)
    if final:
        print(f"done in {time.time() - start:.0f}s: eval " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
              file=sys.stderr)


if __name__ == "__main__":
    main()
