"""The device mesh, logical-axis rules -> shardings, and the one place host batches become global arrays.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data parallelism with
parameters, optimizer state and EMA sharded, ZeRO-3 style). The batch is split over both; a parameter is split over
`fsdp` along whichever of its logical axes `config.sharding_rules` maps to `fsdp`.

Device-order invariant (kept by `global_batch_rows` and `host_batch_to_global` below, relied on by train/input.py):
row r of every global batch is global example `step * global_batch + r`, on the device that `batch_sharding` assigns
row r to, whichever process loaded it. A process loads exactly the rows its addressable devices hold, in ascending
row order. Data and parameters use the same mesh (one device order), so nothing depends on how devices are spread
over processes: 1 process x 2 devices and 2 processes x 1 device build bit-identical global batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every device: FSDP is data parallelism too.
BATCH_AXES = MESH_AXES


class MeshError(ValueError):
    """The mesh sizes in the config do not fit the devices this job has."""


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves config sizes (one of them may be -1: "all remaining devices") to a shape using every device."""
    if data == -1 and fsdp == -1:
        raise MeshError("at most one of mesh.data and mesh.fsdp may be -1")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size == 0 or size < -1:
            raise MeshError(f"mesh.{name}={size}: use a positive size, or -1 for all remaining devices")
    known = max(data, 1) * max(fsdp, 1)
    if num_devices % known:
        raise MeshError(f"mesh data={data} x fsdp={fsdp} does not divide the {num_devices} devices of this job")
    data = num_devices // known if data == -1 else data
    fsdp = num_devices // known if fsdp == -1 else fsdp
    if data * fsdp != num_devices:
        raise MeshError(
            f"mesh data={data} x fsdp={fsdp} uses {data * fsdp} devices but this job has {num_devices}; "
            "set one of them to -1 to use all devices"
        )
    return data, fsdp


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp)` mesh over all devices (or `devices`), sizes from `config.mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(int(mesh_config.data), int(mesh_config.fsdp), len(devices))
    # create_device_mesh orders devices for fast collectives on TPU/GPU topologies; CPU devices keep jax's order.
    return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def logical_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Config rules ([logical name, mesh axis or None] pairs) as the tuple flax expects, checked against the mesh."""
    checked = []
    for rule in rules:
        if len(rule) != 2:
            raise MeshError(f"sharding rule {rule!r} must be a pair (logical axis name, mesh axis or None)")
        logical, axis = rule
        targets = axis if isinstance(axis, (tuple, list)) else (axis,)
        unknown = [a for a in targets if a is not None and a not in MESH_AXES]
        if unknown:
            raise MeshError(f"sharding rule {rule!r} names mesh axis {unknown[0]!r}; the mesh axes are {MESH_AXES}")
        checked.append((str(logical), tuple(axis) if isinstance(axis, list) else axis))
    return tuple(checked)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a tree of (abstract) values whose parameters carry logical axis names.

    Leaves without names (step counters, optimizer counts) are replicated. An axis whose size the mesh axes it maps
    to do not divide (the 3 RGB channels over fsdp=2, say) stays whole instead of failing at initialisation; the
    parameters this happens to are logged, since they then take their full size on every device.
    """
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
    whole: list[str] = []

    def fit(path: tuple, spec: PartitionSpec, value: Any) -> NamedSharding:
        axes = []
        for size, axis in zip(value.shape, tuple(spec) + (None,) * (len(value.shape) - len(spec)), strict=True):
            names = axis if isinstance(axis, tuple) else (axis,)
            devices = int(np.prod([mesh.shape[name] for name in names if name is not None]))
            if size % devices:
                whole.append(f"{jax.tree_util.keystr(path)} axis of size {size} (not split over {axis})")
                axis = None
            axes.append(axis)
        return NamedSharding(mesh, PartitionSpec(*axes))

    shardings = jax.tree_util.tree_map_with_path(
        fit, mesh_specs, nn.unbox(boxed_tree), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    if whole:
        log.warning("%d parameter axes kept whole, their size not divisible: %s", len(whole), "; ".join(whole[:8]))
    return shardings


def plan(init: Callable[[jax.Array], Any], mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> tuple[Any, Any]:
    """(abstract tree, shardings) of what `init(key)` returns (a tree whose parameters carry logical axis names):
    the shapes from `jax.eval_shape`, so nothing is computed, and each leaf's sharding from the rules. The abstract
    leaves are ShapeDtypeStructs carrying their shardings: what Orbax restores into, and what jit initialises to."""
    boxed = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jax.numpy.uint32))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dimension split over every device of the mesh, other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """The rows of each global batch that this process loads, ascending (see the invariant in the module doc)."""
    num_devices = mesh.devices.size
    if global_batch % num_devices:
        raise MeshError(f"batch_size={global_batch} must be a multiple of the number of devices ({num_devices})")
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = sorted({r for index in indices.values() for r in range(*index[0].indices(global_batch))})
    return np.asarray(rows, dtype=np.int64)


def host_batch_to_global(host_batch: Mapping[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict[str, jax.Array]:
    """THE function that turns this process's rows (`global_batch_rows` order) into global `jax.Array`s.

    `make_array_from_process_local_data` hands each addressable device its rows of `host_batch` in ascending row
    order, which is the order `global_batch_rows` gave the input pipeline.
    """
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, value, (global_batch, *value.shape[1:]))
        for name, value in host_batch.items()
    }
