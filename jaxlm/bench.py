"""`python -m jaxlm.bench`: how fast a config's train step runs, and how fast its data comes.

    python -m jaxlm.bench --config FILE [--steps N] [--json] [key=value ...]
    python -m jaxlm.bench --config FILE --data-only [key=value ...]

The step is timed on random batches of the config's shapes (no dataset needed): compile time,
step time (median and spread over --steps after --warmup), tokens/s, model FLOPs per step
counted analytically (`jaxlm.models.flops`) beside XLA's own count, MFU against the device's
datasheet peak (`jaxlm.perf.PEAKS`) and against a matmul peak measured in the same process, and
peak device memory where the backend reports it. `--data-only` times the input pipeline alone on
the config's real data: tokenizing, and reading packed batches from the prepared rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import perf, sharding, tasks
from jaxlm import train as train_lib
from jaxlm.config import Config
from jaxlm.errors import UserError, cli
from jaxlm.models import flops
from jaxlm.models.layers import attention_backend, dtype_of
from jaxlm.workdir import shapes_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlm.bench", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m jaxlm.bench --config configs/gpt2_small.yaml train.batch_size=8 "
               "data.seq_len=128 model.dtype=float32\n"
               "  python -m jaxlm.bench --config configs/gpt_tiny.yaml --data-only",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: built-in gpt_tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="side of the square matmuls that measure the peak (default 2048; 0: skip)")
    parser.add_argument("--data-only", action="store_true", help="time the input pipeline on the config's data")
    parser.add_argument("--batches", type=int, default=50, help="--data-only: batches read (default 50)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    for name in ("steps", "batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}={getattr(args, name)} must be at least 1")
    if args.warmup < 0 or args.matmul_size < 0:
        raise UserError("--warmup and --matmul-size must be >= 0")
    return args


def bench_step(config: Config, steps: int, warmup: int, matmul_size: int) -> dict[str, Any]:
    """Compiles the train step of `config` and times it on random batches of its shapes."""
    if config.mesh.mode == "pmap":
        print("pmap mode: timing the equivalent data-parallel mesh", file=sys.stderr)
    run = shapes_run(config, mode="jit")
    c, cfg, task = run.compiled, run.config, run.task
    rows, length = cfg.train.batch_size, cfg.data.seq_len
    rng = jax.random.key(cfg.seed)
    with c.context():
        batch = c.put_batch(task.synthetic_batch(rows, length, np.random.default_rng(cfg.seed)))
        state = c.init_state(cfg.seed)
        start = time.perf_counter()
        step = c.train_step.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - start
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = step(state, batch, rng)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - start)
    devices = c.mesh.size
    model_flops = flops.train_step(task.forward_flops(rows, length))
    counted = perf.xla_flops(step)
    median = statistics.median(times)
    achieved = model_flops / median / devices  # model FLOP/s per device
    out: dict[str, Any] = {
        "device": jax.devices()[0].device_kind, "devices": devices,
        "mesh": dict(c.mesh.shape), "dtype": cfg.model.dtype, "batch": rows, "seq_len": length,
        "attention": attention_backend(cfg.model.attention_impl, dtype_of(cfg.model), cfg.model.head_size),
        "parameters": sum(x.size for x in jax.tree_util.tree_leaves(c.abstract_state.params)),
        "compile_s": compile_s, "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
        "step_s_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "tokens_per_s": rows * length / median,
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": None if counted is None else counted * devices,
        "model_tflops_per_device": achieved / 1e12,
    }
    peak = perf.datasheet_peak(jax.devices()[0], cfg.model.dtype)
    out["datasheet_peak_tflops"] = peak / 1e12 if peak else None
    out["mfu_datasheet"] = achieved / peak if peak else None
    measured = perf.matmul_peak(cfg.model.dtype, matmul_size) if matmul_size else None
    out["matmul_peak_tflops"] = measured / 1e12 if measured else None
    out["mfu_matmul"] = achieved / measured if measured else None
    memory = [perf.peak_memory(d) for d in c.mesh.devices.flat]
    out["peak_memory_gib"] = max(memory) / 2 ** 30 if all(m is not None for m in memory) else None
    analysis = step.memory_analysis()
    out["compiled_memory_gib"] = None if analysis is None else sharding.compiled_bytes(analysis) / 2 ** 30
    return out


def bench_data(config: Config, batches: int) -> dict[str, Any]:
    """Tokenizer throughput on a sample of the train split, then packed batches read from the
    prepared rows (built, or found in the cache, first)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run, rows = train_lib.prepare(config, Path(tmp))
        prepare_s = time.perf_counter() - start
        cfg = run.config
        texts = list(tasks.load_splits(cfg).sample(4_000_000, cfg.seed))
        start = time.perf_counter()
        tokens = sum(len(ids) for ids in run.tokenizer.encode_batch(texts))
        tokenize_s = time.perf_counter() - start
        data = train_lib.open_data(run, rows["train"], None)
        next(data)  # start-up (threads, first shard) is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(data)
        read_s = time.perf_counter() - start
    per_batch = cfg.train.batch_size * cfg.data.seq_len // jax.process_count()
    return {"prepare_s": prepare_s, "tokenize_chars": sum(map(len, texts)),
            "tokenize_tokens_per_s": tokens / tokenize_s, "batches": batches,
            "batch_tokens_per_s": batches * per_batch / read_s, "batch_ms": 1000 * read_s / batches}


def _row(name: str, value: Any, unit: str = "") -> str:
    if value is None:
        return f"  {name:<34} n/a"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    else:
        text = str(value)
    return f"  {name:<34} {text} {unit}".rstrip()


def report(r: dict[str, Any]) -> str:
    """The console table of a step benchmark."""
    def pct(x: float | None) -> float | None:
        return None if x is None else 100 * x

    lines = [
        f"{r['config']} (task={r['task']}) on {r['devices']} x {r['device']} {r['mesh']}, {r['dtype']}, "
        f"batch {r['batch']} x {r['seq_len']}, {r['attention']} attention, {r['parameters']:,} parameters",
        _row("compile", r["compile_s"], "s"),
        _row("step (median)", r["step_s_median"], "s"),
        _row("step (min / max)", f"{r['step_s_min']:.4g} / {r['step_s_max']:.4g}", "s"),
        _row("tokens/s", r["tokens_per_s"]),
        _row("model FLOPs / step (analytic)", r["model_flops_per_step"]),
        _row("XLA FLOPs / step", r["xla_flops_per_step"]),
        _row("model TFLOP/s per device", r["model_tflops_per_device"]),
        _row("datasheet peak", r["datasheet_peak_tflops"], "TFLOP/s"),
        _row("MFU (datasheet)", pct(r["mfu_datasheet"]), "%"),
        _row("measured matmul peak", r["matmul_peak_tflops"], "TFLOP/s"),
        _row("MFU (measured matmul peak)", pct(r["mfu_matmul"]), "%"),
        _row("peak device memory", r["peak_memory_gib"], "GiB"),
        _row("compiled memory per device", r["compiled_memory_gib"], "GiB"),
    ]
    return "\n".join(lines)


def report_data(r: dict[str, Any]) -> str:
    """The console table of an input-pipeline benchmark."""
    return "\n".join([
        f"input pipeline of {r['config']} (task={r['task']})",
        _row("prepare (tokenizer, rows)", r["prepare_s"], "s"),
        _row("tokenize", r["tokenize_tokens_per_s"], f"tokens/s ({r['tokenize_chars']:,} characters)"),
        _row("packed batches", r["batch_tokens_per_s"], f"tokens/s ({r['batch_ms']:.3g} ms a batch)"),
    ])


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = config_lib.load(args.config, args.overrides)
    sharding.initialize_distributed(config.distributed)
    label = {"config": Path(args.config).stem if args.config else "gpt_tiny", "task": config.task}
    if args.data_only:
        result = {**label, **bench_data(config, args.batches)}
        text = report_data(result)
    else:
        result = {**label, **bench_step(config, args.steps, args.warmup, args.matmul_size)}
        text = report(result)
    if jax.process_index() == 0:
        print(text)
        if args.json:
            print(json.dumps(result))


if __name__ == "__main__":
    main()
