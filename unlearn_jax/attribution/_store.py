"""On-disk arrays of the attribution cache: memory-mapped ``.npy`` files, digests, atomic writes.

Arrays are written to ``<name>.npy.partial`` and renamed into place when complete, and a
directory's ``meta.json`` (written last, also by rename) marks everything in it as complete: a
killed run leaves only ``.partial`` files, which the next run overwrites. bfloat16 arrays are stored
as their ``uint16`` bits (``.npy`` has no bfloat16 type) and viewed back on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

META = "meta.json"
_BF16 = np.dtype(ml_dtypes.bfloat16)


def digest(*parts: Any) -> str:
    """SHA-256 hex digest of JSON-serialisable parts (canonical: sorted keys, no spaces)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def array_digest(*arrays: Any) -> str:
    """SHA-256 hex digest of arrays' shapes, dtypes and C-order bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.shape}|{a.dtype.str}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def params_digest(params: Any) -> str:
    """The digest of a parameter pytree: every leaf's path, shape, dtype and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(array_digest(leaf).encode())
    return h.hexdigest()


def dataset_digest(dataset: Any) -> str:
    """The digest of a dataset's ids, inputs, targets (and token weights)."""
    arrays = [dataset.ids, dataset.x, dataset.y]
    if getattr(dataset, "weights", None) is not None:
        arrays.append(dataset.weights)
    return array_digest(*arrays)


def create(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A writable memory map ``<path>.partial`` of ``shape`` (viewed as ``dtype``); call
    :func:`commit` when it is written."""
    stored = np.dtype(np.uint16) if np.dtype(dtype) == _BF16 else np.dtype(dtype)
    array = np.lib.format.open_memmap(_partial(path), mode="w+", dtype=stored, shape=shape)
    return array.view(_BF16) if stored != np.dtype(dtype) else array


def commit(array: np.ndarray, path: Path) -> None:
    """Flushes a memory map from :func:`create` and moves it to ``path``."""
    base = array if isinstance(array, np.memmap) else getattr(array, "base", None)
    if isinstance(base, np.memmap):
        base.flush()
    os.replace(_partial(path), path)


def save(path: Path, array: np.ndarray) -> None:
    """Writes a whole array to ``path`` atomically."""
    out = create(path, array.shape, array.dtype)
    out[...] = array
    commit(out, path)
    del out


def load(path: Path, dtype: np.dtype | None = None) -> np.ndarray:
    """A read-only memory map of ``path`` (viewed as bfloat16 when ``dtype`` says so)."""
    array = np.load(path, mmap_mode="r")
    if dtype is not None and np.dtype(dtype) == _BF16:
        return array.view(_BF16)
    return array


def write_meta_file(path: Path, meta: dict[str, Any]) -> None:
    """Writes a JSON record atomically (after the arrays it describes: their completion marker)."""
    tmp = _partial(path)
    tmp.write_text(json.dumps(meta, sort_keys=True, indent=1, default=str))
    os.replace(tmp, path)


def read_meta_file(path: Path) -> dict[str, Any] | None:
    """A JSON record from :func:`write_meta_file`, or ``None`` when it is absent (incomplete)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Writes the directory's ``meta.json`` last: the marker that everything in it is complete."""
    write_meta_file(directory / META, meta)


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The directory's ``meta.json``, or ``None`` when it is absent (incomplete)."""
    return read_meta_file(directory / META)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")
