"""What a train step costs: peak throughput of devices, model FLOPs utilisation (MFU), and the
memory and FLOPs of a compiled step (`--compile-only`).

MFU is the model FLOPs a step does (`Task.forward_flops`, counted analytically) per second and
device, over a peak: the device's datasheet figure from `PEAKS`, or a matrix-multiply rate
measured in the same process (`matmul_peak`), which is what a CPU has to go by.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.models import flops

if TYPE_CHECKING:
    from jaxlm.workdir import Run

# Dense (no sparsity) peak TFLOP/s per JAX device, by a substring of `device.device_kind`, in
# order (the first match wins). float32 is what JAX's default matmul precision runs: TF32 tensor
# cores on NVIDIA GPUs since Ampere, one bfloat16 pass on TPUs.
# Sources: NVIDIA H100 and H200 datasheets (SXM; H100 PCIe 756 / 378), A100 datasheet, L4 and A10
# datasheets, B200 (DGX B200 datasheet, per GPU); Google Cloud TPU system architecture pages
# (per chip; TPU v3 per core, as JAX sees a v3 core as a device).
PEAKS: tuple[tuple[str, float, float], ...] = (  # (device kind, bfloat16, float32)
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),
    ("H200", 989.4, 494.7),  # also GH200
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("L4", 121.0, 60.0),
    ("A10", 125.0, 62.5),
    ("TPU v6 lite", 918.0, 918.0),
    ("TPU v5 lite", 197.0, 197.0),
    ("TPU v5", 459.0, 459.0),
    ("TPU v4", 275.0, 275.0),
    ("TPU v3", 61.5, 61.5),
)


def datasheet_peak(device: jax.Device, dtype: str) -> float | None:
    """Peak FLOP/s of one device in `dtype` ("float32" or "bfloat16"), or None if not in `PEAKS`."""
    for kind, bf16, f32 in PEAKS:
        if kind.lower() in device.device_kind.lower():
            return (bf16 if dtype == "bfloat16" else f32) * 1e12
    return None


def xla_flops(compiled: jax.stages.Compiled) -> float | None:
    """XLA's own FLOP count of a compiled program, per device (a loop's body counted once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak(dtype: str, size: int = 2048, seconds: float = 1.0, device: jax.Device | None = None) -> float:
    """FLOP/s of [size, size] x [size, size] matrix multiplies in `dtype` on one device: the best
    of repeated timed runs of a chain of 8 products (after a warm-up run), over about `seconds`."""
    device = device or jax.devices()[0]
    dt = jnp.dtype(dtype)
    a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32).astype(dt), device)
    b = jax.device_put(np.eye(size, dtype=np.float32).astype(dt), device)  # values stay bounded
    chain = 8

    @jax.jit
    def products(x):
        for _ in range(chain):
            x = x @ b
        return x

    products(a).block_until_ready()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        products(a).block_until_ready()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return chain * 2.0 * size ** 3 / best


def peak_memory(device: jax.Device | None = None) -> int | None:
    """The device's peak bytes in use so far, where the backend reports it (GPUs, TPUs)."""
    stats = (device or jax.devices()[0]).memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def utilisation_peak(cfg: Config) -> float | None:
    """Peak FLOP/s of one device for the logged mfu (`train.peak_tflops`, else the datasheet's);
    says once where it comes from, or how to get mfu logged where no peak is known."""
    device = jax.devices()[0]
    if cfg.train.peak_tflops:
        peak, source = cfg.train.peak_tflops * 1e12, "train.peak_tflops"
    else:
        peak, source = datasheet_peak(device, cfg.model.dtype), f"the {device.device_kind} datasheet"
    if peak:
        print(f"mfu: model FLOPs over {peak / 1e12:g} TFLOP/s a device ({cfg.model.dtype}, {source})", file=sys.stderr)
    else:
        print(f"mfu: no {cfg.model.dtype} peak known for '{device.device_kind}'; set train.peak_tflops "
              "(python -m jaxlm.bench measures a matmul peak) to log it", file=sys.stderr)
    return peak


def compile_only(run: Run, device_memory_gib: float = 0.0) -> bool:
    """Compiles the train step and prints per-device memory and FLOPs; with `device_memory_gib`,
    also whether the step fits a device of that size and, if not, which knobs to turn.

    Returns False when it does not fit.
    """
    c, cfg = run.compiled, run.config
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=c.batch_sharding)
             for k, v in run.task.dummy_batch(cfg.train.batch_size, cfg.data.seq_len).items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    start = time.time()
    with c.context():
        exe = c.train_step.lower(c.abstract_state, batch, rng).compile()
    params = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(c.abstract_state.params))
    mem = exe.memory_analysis()
    gib = 2 ** 30
    print(f"compiled the train step in {time.time() - start:.1f}s on {c.mesh.size} devices {dict(c.mesh.shape)}")
    print(f"parameters: {params:,}")
    print(f"per device: params {sharding.bytes_per_device(c.abstract_state.params) / gib:.3f} GiB, "
          f"optimizer {sharding.bytes_per_device(c.abstract_state.opt_state) / gib:.3f} GiB")
    model_flops = flops.train_step(run.task.forward_flops(cfg.train.batch_size, cfg.data.seq_len))
    print(f"model FLOPs per step (analytic, all devices): {model_flops:.3e}")
    counted = xla_flops(exe)
    if counted is not None:
        print(f"FLOPs per step (per device, XLA's count): {counted:.3e}")
    if mem is None:
        if device_memory_gib:
            print("this backend reports no compiled memory: cannot say whether the step fits")
        return True
    total = sharding.compiled_bytes(mem)
    print(f"per device (compiled): arguments {mem.argument_size_in_bytes / gib:.3f} GiB, "
          f"activations and temporaries {mem.temp_size_in_bytes / gib:.3f} GiB, total {total / gib:.3f} GiB")
    if not device_memory_gib:
        return True
    if total <= device_memory_gib * gib:
        print(f"fits a {device_memory_gib:g} GiB device ({100 * total / (device_memory_gib * gib):.0f}% of it)")
        return True
    print(f"does not fit a {device_memory_gib:g} GiB device: needs {total / gib:.1f} GiB; "
          + "; ".join(memory_knobs(cfg, mem.temp_size_in_bytes > mem.argument_size_in_bytes,
                                   c.mesh.shape["data"] * c.mesh.shape["fsdp"])))
    return False


def memory_knobs(cfg: Config, activations_dominate: bool, batch_devices: int) -> list[str]:
    """What to change, in the order that costs least speed, for a step that does not fit
    (`batch_devices`: the devices a batch's rows split over)."""
    m, t = cfg.model, cfg.train
    knobs = []
    if activations_dominate:
        if not m.logits_chunk:
            knobs.append("model.logits_chunk=128 for a decoder (its output logits a slice of each row at a time)")
        if t.batch_size % (2 * t.grad_accum_steps * batch_devices) == 0:
            knobs.append(f"train.grad_accum_steps={2 * t.grad_accum_steps} (half the rows at a time, same update)")
        if m.remat == "none":
            knobs.append("model.remat=save_dots_no_batch or full (recompute activations in the backward pass; "
                         "a CPU compile does not show the saving)")
        elif m.remat != "full":
            knobs.append("model.remat=full")
    if cfg.mesh.fsdp == 1:
        knobs.append("mesh.fsdp=-1 mesh.data=1 (shard parameters and optimizer state over the devices)")
    if m.dtype == "float32":
        knobs.append("model.dtype=bfloat16")
    return knobs or ["use more devices (mesh.fsdp) or a smaller model"]
