"""The little the checkpoint store needs from a multi-process (multi-host) JAX run.

Every function here is a *collective* when ``jax.process_count() > 1``: all processes call it, in the
same order, or they wait for each other until the distributed runtime gives up. In a single process
each returns at once without touching a device, so single-process saves cost nothing extra.

Values travel as bytes in ``uint8`` arrays through ``jax.experimental.multihost_utils``
(``process_allgather``: one jitted all-gather over every device, gloo on CPUs, NCCL/ICI elsewhere).
Lengths are gathered first, then the bytes in rounds of fixed width, so three compiled all-gathers
serve every exchange.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

# Payloads travel in rounds of fixed widths, so the all-gathers compile once each, whatever the
# sizes: small ones (status, paths, file lists) in one round of 1 KiB, large ones (block digests)
# in rounds of 64 KiB.
_SMALL = 1 << 10
_CHUNK = 1 << 16


def process_index() -> int:
    """This process's index, ``0 <= index < process_count()``."""
    return jax.process_index()


def process_count() -> int:
    """The number of processes of the run (1 unless ``jax.distributed.initialize`` was called)."""
    return jax.process_count()


def is_primary() -> bool:
    """Whether this is process 0, the one that creates, renames and deletes checkpoint files."""
    return jax.process_index() == 0


def _gather_int(value: int) -> np.ndarray:
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.array([value], np.int32))
    return np.asarray(gathered).reshape(-1)


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's ``data``, in process order (collective).

    Args:
      data: this process's bytes (any length; processes may differ).

    Returns:
      ``[data of process 0, data of process 1, ...]``, the same list on every process.
    """
    from jax.experimental import multihost_utils

    if process_count() == 1:
        return [bytes(data)]
    sizes = _gather_int(len(data))
    longest = int(sizes.max())
    width = _SMALL if longest <= _SMALL else _CHUNK
    payload = np.frombuffer(data, np.uint8)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for start in range(0, max(longest, 1), width):
        buffer = np.zeros(width, np.uint8)
        piece = payload[start : start + width]
        buffer[: piece.size] = piece
        gathered = np.asarray(multihost_utils.process_allgather(buffer))
        for p in range(len(sizes)):
            parts[p].append(gathered[p])
    return [np.concatenate(parts[p])[: int(sizes[p])].tobytes() for p in range(len(sizes))]


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable ``value``, in process order (collective)."""
    payloads = allgather_bytes(json.dumps(value, sort_keys=True).encode())
    return [json.loads(p) for p in payloads]


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serialisable ``value`` on every process (collective; others pass anything)."""
    if process_count() == 1:
        return value
    payload = json.dumps(value, sort_keys=True).encode() if is_primary() else b""
    return json.loads(allgather_bytes(payload)[0])


def gather_flags(flag: bool) -> list[bool]:
    """Every process's ``flag`` (collective): one small all-gather, the cheap "did anyone fail?"."""
    if process_count() == 1:
        return [bool(flag)]
    return [bool(f) for f in _gather_int(int(flag))]


def assign(sizes: dict[str, int], count: int) -> list[list[str]]:
    """Splits named items of given sizes among ``count`` processes, deterministically.

    Largest first, each to the process with the least assigned so far (ties: the lower index), so
    every process computes the same split from the same ``sizes`` without talking to the others.

    Returns:
      ``count`` lists of names, each sorted.
    """
    loads = [0] * count
    shares: list[list[str]] = [[] for _ in range(count)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        p = min(range(count), key=lambda i: (loads[i], i))
        shares[p].append(name)
        loads[p] += sizes[name]
    return [sorted(s) for s in shares]
