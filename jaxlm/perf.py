"""Peak throughput of devices and model FLOPs utilisation (MFU).

MFU is the model FLOPs a step does (`Task.forward_flops`, counted analytically) per second and
device, over a peak: the device's datasheet figure from `PEAKS`, or a matrix-multiply rate
measured in the same process (`matmul_peak`), which is what a CPU has to go by.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) peak TFLOP/s per JAX device, by a substring of `device.device_kind`, in
# order (the first match wins). float32 is what JAX's default matmul precision runs: TF32 tensor
# cores on NVIDIA GPUs since Ampere, one bfloat16 pass on TPUs.
# Sources: NVIDIA H100 and H200 datasheets (SXM; H100 PCIe 756 / 378), A100 datasheet, L4 and A10
# datasheets, B200 (DGX B200 datasheet, per GPU); Google Cloud TPU system architecture pages
# (per chip; TPU v3 per core, as JAX sees a v3 core as a device).
PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("GH200", {"bfloat16": 989.4, "float32": 494.7}),
    ("B200", {"bfloat16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("A10", {"bfloat16": 125.0, "float32": 62.5}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v3", {"bfloat16": 61.5, "float32": 61.5}),
)


def datasheet_peak(device: jax.Device, dtype: str) -> float | None:
    """Peak FLOP/s of one device in `dtype` ("float32" or "bfloat16"), or None if not in `PEAKS`."""
    for kind, peaks in PEAKS:
        if kind.lower() in device.device_kind.lower():
            return peaks[dtype] * 1e12
    return None


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
