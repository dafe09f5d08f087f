"""Digests of array leaves that depend on their values only: not on their sharding, on the devices or
processes holding them, or on how many processes there are.

Definition (the leaf digest of ``unlearn_jax.checkpoint-digest/2``). Let a leaf have shape
``(s_0, s_1, ..., s_{r-1})`` and ``N`` elements, ``R = s_1 ... s_{r-1}`` the size of one slice
along its leading axis, and ``K =`` :data:`BLOCK_ELEMENTS` (``2**20``). Blocks group
``g = max(1, floor(K / R))`` consecutive leading slices: block ``j``, ``0 <= j < m`` with
``m = ceil(s_0 / g)``, holds the slices ``[j g, min(s_0, (j + 1) g))``, i.e. the C-order elements
``[j g R, min(N, (j + 1) g R))``. A 0-d leaf, and a leaf of no elements, is one block. Then

    b_j  = SHA-256(bytes of block j)         (numpy's ``tobytes()``; little-endian on JAX platforms)
    leaf = SHA-256(b_0 || b_1 || ... || b_{m-1})   over the raw 32-byte block digests.

A block holds at most ``max(K, R)`` elements and is a function of the leaf's shape, dtype and values
only, so whoever holds a block can hash it without the rest, and a leaf hashed on one host gets the
digest it gets on a thousand. (Blocks follow the leading axis, rather than cutting the flat array
every ``K`` elements, so that laying them out over devices is one all-to-all along that axis: cuts
that fall inside slices would make XLA gather whole leaves.)

Who hashes which block:

* a host value (numpy, a Python number; in a multi-process run also a ``jax.Array`` that lives on
  one process only, which the store saves from process 0 too): process 0, from its copy;
* a ``jax.Array`` on one device, or fully replicated: the process holding its shard of
  ``replica_id`` 0 (the whole array);
* a sharded ``jax.Array`` on ``D`` devices, one block (``m = 1``): one jitted all-gather to a
  replicated copy (at most ``max(K, R)`` elements per device), hashed by the process of replica 0;
* a sharded ``jax.Array``, several blocks: one jitted reshard, device to device with no host copy,
  zero-pads the leading axis to a multiple of ``D g`` and splits it over the ``D`` devices, so that
  every device holds whole blocks; each process hashes the blocks its devices hold, one device's
  shard on the host at a time. Per device that is ``ceil(s_0 / (D g)) g R <= N / D + max(K, R)``
  elements (plus XLA's transient buffers, about as much again).

Each distinct (shape, dtype, sharding) compiles its reshard once (cached).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from unlearn_jax.checkpoint import _multihost

BLOCK_ELEMENTS = 1 << 20


def block_rows(shape: tuple[int, ...] | list[int], block: int = BLOCK_ELEMENTS) -> int:
    """``g = max(1, floor(K / R))``: the leading slices per block of a leaf of this shape."""
    slice_size = math.prod(shape[1:])
    return max(1, block // max(slice_size, 1))


def num_blocks(shape: tuple[int, ...] | list[int], block: int = BLOCK_ELEMENTS) -> int:
    """``m``: the number of blocks of a leaf of this shape (1 for 0-d and empty leaves)."""
    if len(shape) == 0 or math.prod(shape) == 0:
        return 1
    return -(-shape[0] // block_rows(shape, block))


def combine(blocks: list[str]) -> str:
    """The leaf digest from its block digests (hex): ``SHA-256(b_0 || ... || b_{m-1})``, raw bytes."""
    return hashlib.sha256(b"".join(bytes.fromhex(b) for b in blocks)).hexdigest()


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _hash_whole(arr: np.ndarray, block: int) -> dict[int, str]:
    """Block digests of a whole leaf held on this host."""
    if arr.ndim == 0 or arr.size == 0:
        return {0: _sha(arr)}
    g = block_rows(arr.shape, block)
    return {j: _sha(arr[j * g : (j + 1) * g]) for j in range(num_blocks(arr.shape, block))}


def _is_host_value(leaf: Any) -> bool:
    # A jax.Array on a single process of a multi-process run is that process's own value; the store
    # saves process 0's, so process 0 hashes it like a numpy array.
    return not isinstance(leaf, jax.Array) or (
        _multihost.process_count() > 1 and leaf.is_fully_addressable
    )


def shape_dtype(leaf: Any) -> tuple[list[int], str]:
    """A leaf's shape and dtype name as the manifest records them (host values through numpy)."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"cannot checkpoint a typed PRNG key array (dtype {leaf.dtype}); store "
                "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data."
            )
        return list(leaf.shape), np.dtype(leaf.dtype).name
    arr = np.asarray(leaf)
    return list(arr.shape), arr.dtype.name


def owned_blocks(leaf: Any, block: int = BLOCK_ELEMENTS) -> dict[int, str]:
    """The digests of the blocks of ``leaf`` that this process hashes (see the module docstring).

    Collective for a sharded ``jax.Array`` spanning several processes (every process holding a part
    of it must call this for that leaf, in the same order); local otherwise.

    Args:
      leaf: a numpy array, Python number or ``jax.Array``.
      block: ``K``, the elements per block.

    Returns:
      ``{j: hex digest of block j}`` for this process's blocks (possibly none).
    """
    if _is_host_value(leaf):
        if not _multihost.is_primary():
            return {}
        return _hash_whole(np.asarray(leaf), block)
    if leaf.size == 0 or len(leaf.sharding.device_set) == 1 or leaf.sharding.is_fully_replicated:
        return _hash_replica(leaf, block)
    sharding = _auto(leaf.sharding)
    if sharding != leaf.sharding:
        leaf = jax.device_put(leaf, sharding)  # the same layout under Auto axes: no copy
    shape = tuple(leaf.shape)
    laid_out = _reshard_fn(shape, np.dtype(leaf.dtype), sharding, block)(leaf)
    if num_blocks(shape, block) == 1:
        return _hash_replica(laid_out, block)
    g = block_rows(shape, block)
    out = {}
    for shard in laid_out.addressable_shards:
        if shard.replica_id != 0:
            continue
        first = shard.index[0].start or 0  # a multiple of g: every device holds whole blocks
        if first >= shape[0]:
            continue  # padding only
        data = np.asarray(shard.data)
        for offset in range(0, data.shape[0], g):
            if first + offset >= shape[0]:
                break
            end = min(g, shape[0] - first - offset)
            out[(first + offset) // g] = _sha(data[offset : offset + end])
    return out


def _hash_replica(leaf: jax.Array, block: int) -> dict[int, str]:
    """Every block of a leaf whose shards are whole copies, by the process holding replica 0."""
    for shard in leaf.addressable_shards:
        if shard.replica_id == 0:
            return _hash_whole(np.asarray(shard.data), block)
    return {}


def _auto(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The same layout on a mesh whose axes are all ``Auto``, so that XLA chooses the collectives of
    the reshard (under ``Explicit`` axes the padding and the change of mesh would be sharding type
    errors unless spelled out)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    mesh = sharding.mesh
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return sharding
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return NamedSharding(auto, sharding.spec, memory_kind=sharding.memory_kind)


def _devices(sharding: jax.sharding.Sharding) -> list[jax.Device]:
    if isinstance(sharding, NamedSharding):
        return list(sharding.mesh.devices.flat)  # the mesh's order keeps neighbours together
    return sorted(sharding.device_set, key=lambda d: d.id)


@functools.lru_cache(maxsize=512)
def _reshard_fn(
    shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding, block: int
) -> Any:
    """The jitted layout of a sharded leaf's blocks over its devices (see the module docstring):
    a replicated copy for one block, else the leading axis zero-padded to a multiple of ``D g``
    and split over the ``D`` devices."""
    del dtype  # part of the cache key: one compilation per dtype
    devices = _devices(sharding)
    mesh = Mesh(np.array(devices), ("blocks",), axis_types=(AxisType.Auto,))
    if num_blocks(shape, block) == 1:
        return jax.jit(
            lambda x: x, in_shardings=sharding, out_shardings=NamedSharding(mesh, PartitionSpec())
        )
    group = len(devices) * block_rows(shape, block)
    lead = -(-shape[0] // group) * group
    pad = [(0, lead - shape[0])] + [(0, 0)] * (len(shape) - 1)
    return jax.jit(
        lambda x: jnp.pad(x, pad),
        in_shardings=sharding,
        out_shardings=NamedSharding(mesh, PartitionSpec("blocks")),
    )


def leaf_infos(flat: Mapping[str, Any], block: int = BLOCK_ELEMENTS) -> dict[str, dict[str, Any]]:
    """``{path: {"shape", "dtype", "blocks", "sha256"}}`` of every leaf: what the manifest records.

    Collective in a multi-process run: each process hashes its blocks (:func:`owned_blocks`), then
    one all-gather of the (small) digests gives every process every block's digest.

    Args:
      flat: ``{path: leaf}``, the same paths in the same order on every process.
      block: ``K``.

    Returns:
      Per leaf: ``shape`` (list), ``dtype`` (numpy name), ``blocks`` (the ``m`` block digests, hex)
      and ``sha256`` (:func:`combine` of them).
    """
    mine: dict[str, dict[str, str]] = {}
    described = {}
    for path, leaf in flat.items():
        described[path] = shape_dtype(leaf)
        mine[path] = {str(j): d for j, d in owned_blocks(leaf, block).items()}
    parts = _multihost.allgather_json(mine) if _multihost.process_count() > 1 else [mine]
    infos = {}
    for path, (shape, dtype) in described.items():
        blocks: list[str | None] = [None] * num_blocks(shape, block)
        for part in parts:
            for j, digest in part.get(path, {}).items():
                blocks[int(j)] = digest
        missing = [j for j, b in enumerate(blocks) if b is None]
        if missing:
            raise RuntimeError(
                f"no process hashed blocks {missing[:8]} of leaf {path!r} {shape} (is it a "
                "jax.Array whose devices span processes that did not all call the checkpoint "
                "function?)."
            )
        infos[path] = {"shape": shape, "dtype": dtype, "blocks": blocks, "sha256": combine(blocks)}
    return infos


class Mismatch(NamedTuple):
    """The first block of this process that does not match the manifest."""

    position: int  # of the leaf in the manifest's order
    path: str
    block: int
    actual: str
    expected: str


def first_mismatch(
    flat: Mapping[str, Any], expected: Mapping[str, Mapping[str, Any]], block: int = BLOCK_ELEMENTS
) -> Mismatch | None:
    """The first of this process's blocks whose digest differs from ``expected[path]["blocks"]``.

    Collective like :func:`owned_blocks`: every process hashes its blocks of every leaf, in the
    order of ``expected``, even after a mismatch (a process that stopped early would leave the
    others waiting in the next leaf's reshard). A process reports only the blocks it hashes.
    """
    found = None
    for position, (path, info) in enumerate(expected.items()):
        recorded = info["blocks"]
        for j, digest in sorted(owned_blocks(flat[path], block).items()):
            want = recorded[j] if j < len(recorded) else "(no such block)"
            if found is None and digest != want:
                found = Mismatch(position, path, j, digest, want)
    return found
