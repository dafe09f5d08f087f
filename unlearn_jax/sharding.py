"""Mesh and sharding helpers. The library never creates a global mesh: callers pass one in.

Data parallelism is the common case for unlearning workloads: parameters replicated on every device,
the batch axis split over a ``"data"`` mesh axis. Under ``jax.jit`` the numerical core then runs
sharded with no code change (``vmap``'s batch axis follows the batch's sharding, and reductions over it
become cross-device sums inserted by XLA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unlearn_jax import _validate

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: all devices) named ``axis_name``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device.")
    return Mesh(np.asarray(devices), (axis_name,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Splits the leading (batch) axis of every leaf over ``axis_name``.

    Raises:
      ValueError: if the batch size is not divisible by the number of devices on that axis.
    """
    size = _validate.batch_size(batch)
    shards = mesh.shape[axis_name]
    if size % shards:
        raise ValueError(
            f"batch size {size} is not divisible by the {shards} devices of mesh axis {axis_name!r}; "
            "pad or trim the batch to a multiple."
        )
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec(axis_name))), batch
    )
