"""Device meshes with named axes, and batch placement. The library never creates a global mesh.

A mesh arranges devices in a grid whose axes carry the names the sharding rules know:

* ``"data"``: data parallelism. Parameters are replicated along it; the batch axis is split over it.
* ``"fsdp"``: fully sharded data parallelism. The batch is split over it as well, and every large
  parameter (and optimizer or method state leaf) is split over it, each device holding ``1/n``;
  XLA gathers a layer's weights when it needs them.
* ``"tensor"``: tensor (model) parallelism. Attention heads, MLP hidden units and the vocabulary
  are split over it; the batch is replicated along it.

Any subset of the three works (``make_mesh({"data": 2, "fsdp": 4})``). Under ``jax.jit`` the
numerical core runs sharded with no code change: ``vmap``'s batch axis follows the batch's sharding,
and reductions over it become cross-device sums inserted by XLA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from unlearn_jax import _validate

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
# The axes a batch's leading dimension is split over, in this order, when present in the mesh.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh whose named axes have the given sizes, over ``devices`` (default: all devices).

    Args:
      axes: ordered ``{axis name: size}`` with names among ``"data"``, ``"fsdp"``, ``"tensor"``;
        one size may be ``-1`` (the devices left over). The order is the mesh's axis order; the
        last axis varies fastest over ``devices``, so put ``"tensor"`` last to keep its
        (communication-heavy) groups on neighbouring devices.
      devices: the devices, all of them used; default ``jax.devices()``. Without explicit devices
        the order comes from ``jax.make_mesh`` (topology-aware on TPUs).

    Returns:
      A ``jax.sharding.Mesh`` with ``Auto`` axis types (shardings propagate through ``jit``).

    Raises:
      ValueError: for an empty ``axes``, an unknown axis name, a size that is not a positive int
        (or more than one ``-1``), or sizes whose product differs from the number of devices.

    Examples:
      >>> mesh = make_mesh({"data": -1})
      >>> mesh.axis_names
      ('data',)
    """
    if not axes:
        raise ValueError("make_mesh needs at least one axis, e.g. make_mesh({'data': -1}).")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device.")
    names = tuple(axes)
    for name in names:
        if name not in MESH_AXES:
            raise ValueError(
                f"unknown mesh axis name {name!r}; the sharding rules know {MESH_AXES}. "
                "Build a jax.sharding.Mesh yourself for other names and map logical axes to them "
                "in ShardingRules.logical_axes."
            )
    sizes = [axes[n] for n in names]
    inferred = [n for n, s in zip(names, sizes, strict=True) if s == -1]
    if len(inferred) > 1:
        raise ValueError(f"at most one axis size may be -1, got {dict(axes)}.")
    for name, size in zip(names, sizes, strict=True):
        if size != -1:
            _validate.positive_int(**{f"axes[{name!r}]": size})
    known = math.prod(s for s in sizes if s != -1)
    if inferred:
        if len(devices) % known:
            raise ValueError(
                f"the fixed axis sizes {dict(axes)} multiply to {known}, which does not divide the "
                f"{len(devices)} devices."
            )
        sizes = [len(devices) // known if s == -1 else s for s in sizes]
    elif known != len(devices):
        raise ValueError(
            f"mesh axes {dict(axes)} need {known} devices but {len(devices)} were given; pass "
            f"devices=jax.devices()[:{known}] or change the sizes (one may be -1)."
        )
    return jax.make_mesh(
        tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: all devices) named ``axis_name``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device.")
    return jax.make_mesh(
        (len(devices),), (axis_name,), axis_types=(AxisType.Auto,), devices=devices
    )


def batch_axes(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
    """The axes of ``axes`` that ``mesh`` has (size > 1 or not), in order: what a batch is split over."""
    return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, axis_name: str | Sequence[str] | None = None) -> NamedSharding:
    """The sharding of a batch leaf: leading axis split over the batch axes, the rest replicated.

    Args:
      mesh: the mesh.
      axis_name: the mesh axis (or axes) to split the batch over; default every axis of
        :data:`BATCH_AXES` (``"data"``, ``"fsdp"``) that the mesh has.

    Raises:
      ValueError: if a named axis is not an axis of ``mesh``.
    """
    names = _batch_axis_names(mesh, axis_name)
    return NamedSharding(mesh, PartitionSpec(names if names else None))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: Any, mesh: Mesh, axis_name: str | Sequence[str] | None = None) -> Any:
    """Splits the leading (batch) axis of every leaf over the batch axes of ``mesh``.

    Args:
      batch: a pytree of arrays with a common leading batch size ``B``.
      mesh: the mesh.
      axis_name: as in :func:`batch_sharding` (default: ``"data"`` and ``"fsdp"`` when present).

    Raises:
      ValueError: if ``B`` is not divisible by the number of devices along those axes, or an axis
        is not in the mesh.
    """
    size = _validate.batch_size(batch)
    names = _batch_axis_names(mesh, axis_name)
    shards = math.prod(mesh.shape[n] for n in names)
    if size % shards:
        raise ValueError(
            f"batch size {size} is not divisible by the {shards} devices of mesh axes {names}; "
            "pad or trim the batch to a multiple."
        )
    sharding = NamedSharding(mesh, PartitionSpec(names if names else None))
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), batch)


def _batch_axis_names(mesh: Mesh, axis_name: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis_name is None:
        return batch_axes(mesh)
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    for name in names:
        if name not in mesh.shape:
            raise ValueError(
                f"batch axis {name!r} is not an axis of the mesh {dict(mesh.shape)}; pass one of "
                f"{tuple(mesh.axis_names)}."
            )
    return names
