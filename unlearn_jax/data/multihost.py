"""Global batches on a mesh, each process reading only its own part of every batch.

In a multi-process (multi-host) run every process iterates the same epoch plan: the order
``jax.random.permutation(key, N)`` (the order of :func:`unlearn_jax.data.padded_batches`, identical on
every process for the same key) cut into global batches of ``G`` rows, the last completed with
padding. Process ``p`` of ``P`` reads rows ``[p * G / P, (p + 1) * G / P)`` of each global batch, and
:func:`make_global` assembles the local parts into one ``jax.Array`` of ``G`` rows sharded over the
mesh's batch axes (``jax.make_array_from_process_local_data``). No two processes read the same
example, every example is read once per epoch, and with one process the batches are exactly those of
``padded_batches(dataset, G, key=key)``.

The row blocks are assigned by process index; ``make_array_from_process_local_data`` places each
process's block on that process's devices. On a mesh that lists each process's devices in process
order (``jax.make_mesh`` and :func:`unlearn_jax.sharding.make_mesh` do) the global batch is therefore
row for row the single-process batch; on any other mesh it holds the same rows, blocks permuted.
The batch axes must give each process a distinct part of the batch (data parallelism across
processes), which is what :func:`unlearn_jax.sharding.batch_sharding` sets up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from unlearn_jax import _validate
from unlearn_jax import sharding as sharding_lib
from unlearn_jax.data.batching import (
    Batch,
    _check,
    _epoch_order,
    _read_ahead,
    pad_rows,
    read_rows,
)
from unlearn_jax.data.dataset import Dataset
from unlearn_jax.data.stream import StreamedDataset, prefetched, to_device


def _check_processes(global_batch_size: int, process_index: Any, process_count: Any) -> None:
    for name, value in (("process_count", process_count), ("process_index", process_index)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {name}={value!r}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need process_count >= 1 and 0 <= process_index < process_count, got "
            f"{process_index=}, {process_count=}."
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"{global_batch_size=} must be divisible by {process_count=}: every process reads "
            "an equal part of each global batch."
        )


def process_rows(
    n: int,
    global_batch_size: int,
    *,
    key: Any = None,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """The dataset positions process ``process_index`` reads in one epoch, batch by batch.

    With ``order = jax.random.permutation(key, n)`` (``arange(n)`` for ``key=None``) padded with
    ``-1`` to ``S * G`` entries, ``S = ceil(n / G)``, global batch ``s`` is
    ``order[s * G : (s + 1) * G]`` and this process reads its block
    ``[p * L, (p + 1) * L)``, ``L = G / P``.

    Args:
      n: the number of examples, >= 1.
      global_batch_size: ``G``, rows of each global batch, divisible by ``process_count``.
      key: the epoch's PRNG key (the same on every process), or ``None`` for dataset order.
      process_index, process_count: ``p`` and ``P``.

    Returns:
      ``[S, L]`` int64 positions in ``[0, n)``, ``-1`` for padding (real positions first in each
      row). Over ``p = 0..P-1`` the blocks are disjoint and together hold every position once.

    Raises:
      ValueError: for ``n < 1``, a bad batch size, or process numbers out of range.

    Examples:
      >>> process_rows(5, 4, process_index=1, process_count=2).tolist()
      [[2, 3], [-1, -1]]
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got n={n!r}.")
    _validate_batch(global_batch_size)
    _check_processes(global_batch_size, process_index, process_count)
    steps = -(-n // global_batch_size)
    plan = np.full((steps * global_batch_size,), -1, np.int64)
    plan[:n] = _epoch_order(n, key)
    local = global_batch_size // process_count
    return plan.reshape(steps, process_count, local)[:, process_index]


def _validate_batch(global_batch_size: Any) -> None:
    if (
        isinstance(global_batch_size, bool)
        or not isinstance(global_batch_size, int | np.integer)
        or global_batch_size < 1
    ):
        raise ValueError(f"global_batch_size must be an integer >= 1, got {global_batch_size=!r}.")


def process_batches(
    dataset: Dataset | StreamedDataset,
    global_batch_size: int,
    *,
    key: Any = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """One epoch of this process's parts of the global batches, on the host.

    Args:
      dataset: the examples (every process holds the same dataset: ids and record indices).
      global_batch_size: ``G``, divisible by ``process_count``.
      key: the epoch's PRNG key, the same on every process (``None``: dataset order).
      process_index, process_count: default ``jax.process_index()`` and ``jax.process_count()``.

    Returns:
      An iterator over ``ceil(N / G)`` pairs ``(batch, mask)`` of ``L = G / P`` rows: ``batch`` as
      :func:`unlearn_jax.data.batching.read_rows` gives it (inputs in their storage dtype; padding
      rows zeros with ``id == -1``), ``mask [L]`` float32. Only the rows of :func:`process_rows`
      are read, ahead of use for a streamed dataset.

    Raises:
      ValueError, TypeError: as :func:`process_rows` and :func:`unlearn_jax.data.padded_batches`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check(dataset, global_batch_size, key)
    plan = process_rows(
        len(dataset),
        global_batch_size,
        key=key,
        process_index=process_index,
        process_count=process_count,
    )
    local = plan.shape[1]

    def read(positions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return pad_rows(read_rows(dataset, positions[positions >= 0]), local)

    return prefetched(read, iter(plan), _read_ahead(dataset))


def make_global(local_batch: Any, mesh: Mesh, axis_name: str | tuple[str, ...] | None = None):
    """Each process's part of a batch -> one global ``jax.Array`` per leaf, sharded over the batch axes.

    ``jax.make_array_from_process_local_data`` with :func:`unlearn_jax.sharding.batch_sharding`:
    the leading axis of the result is the processes' parts concatenated (in the mesh's order of
    their devices), every other axis replicated. With one process it is ``local_batch`` placed on
    the mesh.

    Args:
      local_batch: a pytree of host arrays ``[L, ...]`` with a common leading size.
      mesh: the mesh (spanning every process).
      axis_name: the batch axes (default ``"data"`` and ``"fsdp"`` where the mesh has them).

    Returns:
      The same pytree of global arrays ``[L * P, ...]``.

    Raises:
      ValueError: if the leaves disagree on ``L``, or ``L`` is not divisible by the number of this
        process's devices along the batch axes.
    """
    local = _validate.batch_size(local_batch, "local_batch")
    target = sharding_lib.batch_sharding(mesh, axis_name)
    names = _names(target)
    shards = math.prod(mesh.shape[a] for a in names)
    processes = len({d.process_index for d in mesh.devices.flat})
    if (local * processes) % shards:
        raise ValueError(
            f"a local batch of {local} rows from each of {processes} processes cannot be split "
            f"over the {shards} devices of mesh axes {names}; make the global batch size a "
            f"multiple of {shards}."
        )
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(target, np.asarray(a)), local_batch
    )


def global_batches(
    dataset: Dataset | StreamedDataset,
    global_batch_size: int,
    *,
    mesh: Mesh,
    key: Any = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> Iterator[tuple[Batch, jax.Array]]:
    """One epoch of global batches on ``mesh``, each process reading only its own rows.

    :func:`process_batches` for this process (``jax.process_index()`` of ``jax.process_count()``),
    each part made global with :func:`make_global`, then stored integer inputs converted to float32
    on the devices (``x / x_divisor`` of a streamed dataset).

    Args:
      dataset: the examples (the same on every process).
      global_batch_size: ``G`` rows per global batch, divisible by the number of processes and by
        the number of devices along the batch axes.
      mesh: the mesh, spanning every process.
      key: the epoch's PRNG key, the same on every process (``None``: dataset order).
      axis_name: the batch axes, as in :func:`unlearn_jax.sharding.batch_sharding`.

    Returns:
      An iterator over ``ceil(N / G)`` pairs ``(batch, mask)``: ``batch`` ``{"x": [G, ...], "y",
      "id"[, "weights"]}`` and ``mask [G]`` float32, all sharded by ``batch_sharding(mesh)``. With one
      process they equal ``padded_batches(dataset, G, key=key)`` value for value.

    Raises:
      ValueError, TypeError: as :func:`process_batches` and :func:`make_global`.
    """
    _check(dataset, global_batch_size, key)
    target = sharding_lib.batch_sharding(mesh, axis_name)
    shards = math.prod(target.mesh.shape[a] for a in _names(target))
    if global_batch_size % shards:
        raise ValueError(
            f"{global_batch_size=} must be divisible by the {shards} devices of mesh axes "
            f"{_names(target)}."
        )
    parts = process_batches(dataset, global_batch_size, key=key)
    x_divisor = dataset.x_divisor if isinstance(dataset, StreamedDataset) else None

    def generate() -> Iterator[tuple[Batch, jax.Array]]:
        for batch, mask in parts:
            both = to_device(
                {**batch, "mask": mask},
                x_divisor=x_divisor,
                put=lambda b: make_global(b, mesh, axis_name),
            )
            mask = both.pop("mask")
            yield both, mask

    return generate()


def _names(target: jax.sharding.NamedSharding) -> tuple[str, ...]:
    names = target.spec[0] if len(target.spec) else None
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)
