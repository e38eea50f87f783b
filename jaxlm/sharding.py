"""Device mesh, logical-axis rules and shardings of the state and the batch.

Models name axes logically; this module maps those names onto the mesh axes `data`, `fsdp`
and `tensor` with the rules from `MeshConfig`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import DistributedConfig, MeshConfig
from jaxlm.errors import UserError

AXES = ("data", "fsdp", "tensor")


def initialize_distributed(cfg: DistributedConfig) -> None:
    """Joins a multi-process run when one is configured or detected; checks what it found.

    Explicit settings (config, then JAXLM_* environment variables) win; otherwise TPU VM
    slices and SLURM jobs of several tasks are detected by JAX itself. After joining, every
    process must see the expected process count and the same number of local devices.
    """
    coordinator = cfg.coordinator or os.environ.get("JAXLM_COORDINATOR", "")
    count = cfg.num_processes or int(os.environ.get("JAXLM_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAXLM_PROCESS_ID", "-1") or -1)
    detected = (int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ
                or os.environ.get("JAXLM_DISTRIBUTED") == "auto")
    if count <= 1 and not detected:
        return
    if count > 1 and (not coordinator or not 0 <= pid < count):
        raise UserError(f"a {count}-process run needs distributed.coordinator (host:port) and "
                        f"distributed.process_id in [0, {count}) (or JAXLM_COORDINATOR, JAXLM_PROCESS_ID)")
    # only CPU processes use it; set before anything touches a backend
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    kwargs = dict(initialization_timeout=cfg.timeout_s)
    if count > 1:
        kwargs.update(coordinator_address=coordinator, num_processes=count, process_id=pid)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # a timeout or an unreachable coordinator
        raise UserError(f"could not join the multi-process run ({str(e).splitlines()[0][:200]}); "
                        "check distributed.coordinator and that every process was started") from None
    if count > 1 and jax.process_count() != count:
        raise UserError(f"expected {count} processes, found {jax.process_count()}; "
                        "check distributed.num_processes on every process")
    if jax.device_count() != jax.local_device_count() * jax.process_count():
        raise UserError(f"processes see different numbers of devices ({jax.device_count()} in all, "
                        f"{jax.local_device_count()} here); give every process the same devices")


def check_pmap_processes() -> None:
    """`mesh.mode=pmap` runs in one process: across processes, pmap's contract needs every
    process's devices in one program, which the jit mesh gives with the same data parallelism."""
    if jax.process_count() > 1:
        raise UserError(f"mesh.mode=pmap runs in one process, not {jax.process_count()}; use "
                        "mesh.mode=jit, whose default mesh is the same data parallelism over all processes")


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); a -1 takes the devices the others leave."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise UserError(f"mesh {dict(zip(AXES, sizes))} does not divide the {device_count} devices; "
                            "pick sizes whose product divides the device count")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise UserError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                        f"devices, but {device_count} are present; make the product equal the device "
                        "count or set one axis to -1")
    return tuple(sizes)


def _hybrid_mesh(cfg: MeshConfig, shape: tuple[int, int, int], devices: list) -> Mesh:
    """A multi-slice mesh: `cfg.slice_axis` spans the slices, the rest stays within each."""
    axis = AXES.index(cfg.slice_axis)
    if shape[axis] % cfg.slices:
        raise UserError(f"mesh.{cfg.slice_axis}={shape[axis]} does not split over mesh.slices={cfg.slices}; "
                        f"make it a multiple of {cfg.slices}")
    dcn = [1, 1, 1]
    dcn[axis] = cfg.slices
    ici = [size // parts for size, parts in zip(shape, dcn)]
    # devices of one slice (CPU, GPU, a single TPU slice): each process counts as a slice
    by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
    unit = "process_index" if by_process else "slice_index"
    try:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
    except ValueError as e:
        found = len({getattr(d, unit) for d in devices})
        raise UserError(f"mesh.slices={cfg.slices} does not match the devices ({e}); the run has {found} "
                        f"{'processes' if by_process else 'slices'}") from None
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """The device mesh the config describes, over all devices (or the given ones)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    if cfg.slices > 1:
        return _hybrid_mesh(cfg, shape, devices)
    if len(devices) == jax.device_count():  # all devices: let JAX lay the mesh out by topology
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """Flax logical-axis rules from the config (an empty list means replicated)."""
    out = []
    for logical, axes in cfg.rules.items():
        out.append((logical, tuple(axes) if len(axes) > 1 else (axes[0] if axes else None)))
    return tuple(out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, axis_rules: tuple) -> Any:
    """NamedShardings for a tree of (possibly boxed) arrays with logical axis metadata."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def batch_sharding(mesh: Mesh, axis_rules: tuple) -> NamedSharding:
    """Rows (the first axis) of a batch array over the `batch` rule's mesh axes."""
    spec = nn.logical_to_mesh_axes(("batch",), axis_rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each host's rows into global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_divisible(abstract_tree: Any, what: str = "parameter") -> None:
    """Every sharded dimension divides evenly over its mesh axes, or one clear error before compiling.

    Args:
      abstract_tree: arrays or ShapeDtypeStructs carrying NamedShardings.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
        spec, mesh = leaf.sharding.spec, leaf.sharding.mesh
        for dim, axes in enumerate(spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(mesh.shape[a] for a in axes)
            if leaf.shape[dim] % ways:
                name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
                raise UserError(
                    f"{what} {name} {tuple(leaf.shape)}: dimension {dim} ({leaf.shape[dim]}) does not "
                    f"divide over mesh axes {'x'.join(axes)} = {ways}; change the mesh sizes or the "
                    "model shape, or map that logical axis to fewer mesh axes in mesh.rules")


def bytes_per_device(abstract_tree: Any) -> int:
    """Bytes of the largest shard each device holds of a tree of sharded arrays."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree_util.tree_leaves(abstract_tree))


def compiled_bytes(analysis: Any) -> int:
    """Device bytes a compiled program needs (its `memory_analysis()`): arguments, outputs and
    temporaries, less the outputs that reuse donated arguments."""
    return (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
            + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)


class StopVote:
    """Agrees across processes on the step to stop at after a signal (SIGTERM/SIGINT).

    A signal may reach one process only (a preemption notice, a user's Ctrl-C on one host), and
    at a different step than the others: stopping alone would leave the rest waiting in the next
    step's collectives. So after every step each process says whether it was signalled, through
    the coordination service of `jax.distributed` (a host-side key-value store and barrier, no
    device work), and every process stops at the first step where any of them was. In a single
    process this is the local flag.
    """

    def __init__(self, timeout_s: int):
        self._client = None
        if jax.process_count() > 1:
            from jax._src import distributed  # JAX's coordination client (no public handle)
            self._client = distributed.global_state.client
        self._timeout_ms = timeout_s * 1000

    def __call__(self, step: int, signalled: bool) -> bool:
        """Whether every process stops after `step`; `signalled`: this process was signalled."""
        if self._client is None:
            return signalled
        key = f"jaxlm/stop/{step}"
        if signalled:
            self._client.key_value_set(f"{key}/{jax.process_index()}", "1", allow_overwrite=True)
        self._client.wait_at_barrier(key, self._timeout_ms)  # every process has voted on `step`
        return bool(self._client.key_value_dir_get(f"{key}/"))


def barrier(name: str) -> None:
    """Waits until every process gets here (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
