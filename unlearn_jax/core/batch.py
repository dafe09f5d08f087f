"""Batches as dicts of arrays: their size, padding to a fixed size with a row mask, masked means.

A batch is a dict of arrays sharing a leading axis ``B`` (see :mod:`unlearn_jax.core.task` for the
keys). Compiled steps depend on shapes, so every layer that feeds batches to a jitted function pads
them to a fixed number of rows with :func:`pad_batch`, which marks the real rows in ``"mask"``;
everything that reduces over a batch weights by that mask (:func:`row_mask`, :func:`masked_mean`).
This is the one padding helper of the library.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate

Batch = dict[str, Any]
MASK = "mask"
PADDING_ID = -1


def batch_rows(batch: Batch, name: str = "batch") -> int:
    """The common leading size of a batch's leaves (validated: :func:`_validate.batch_size`)."""
    return _validate.batch_size(batch, name)


def row_mask(batch: Batch, dtype: Any = jnp.float32) -> jax.Array:
    """The ``[B]`` row weights of a batch: ``batch["mask"]`` if present, else ones."""
    if MASK in batch:
        return jnp.asarray(batch[MASK], dtype)
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return jnp.ones((size,), dtype)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    r""":math:`\sum_i m_i v_i / \sum_i m_i` over the leading axis: the mean over a padded batch's real rows.

    ``values`` is ``[B]``; an all-padding batch (``sum m = 0``) gives 0, not NaN, so a step on it
    changes nothing through this term.
    """
    mask = mask.astype(values.dtype)
    total = jnp.sum(mask)
    return jnp.sum(mask * values) / jnp.where(total > 0, total, 1.0)


def pad_batch(batch: Batch, rows: int) -> Batch:
    """``batch`` padded with zero rows to exactly ``rows`` rows, real rows marked in ``"mask"``.

    Padding rows have zeros in every leaf, ``id == -1`` and mask 0; an existing ``"mask"`` is kept
    for the real rows (so padding twice is harmless). Numpy leaves stay numpy (pad on the host before
    the copy to the device), JAX leaves stay JAX arrays.

    Args:
      batch: a dict of arrays with a common leading size ``n <= rows``.
      rows: the padded size.

    Returns:
      A new dict with every leaf ``[rows, ...]`` and ``"mask" [rows]`` float32.

    Raises:
      ValueError: ``rows < n`` or an invalid batch.
    """
    n = batch_rows(batch)
    _validate.positive_int(rows=rows)
    if rows < n:
        raise ValueError(f"pad_batch: the batch has {n} rows, more than {rows=}.")
    out = {}
    for name, leaf in batch.items():
        xp = np if isinstance(leaf, np.ndarray) else jnp
        if name == MASK:
            leaf = leaf.astype(np.float32) if xp is np else leaf.astype(jnp.float32)
        if rows == n:
            out[name] = leaf
            continue
        fill = PADDING_ID if name == "id" else 0
        pad = xp.full((rows - n, *leaf.shape[1:]), fill, dtype=leaf.dtype)
        out[name] = xp.concatenate([leaf, pad])
    if MASK not in out:
        out[MASK] = np.concatenate([np.ones(n, np.float32), np.zeros(rows - n, np.float32)])
    return out


def example_struct(batch: Batch) -> Batch:
    """``jax.ShapeDtypeStruct``\\ s of ONE example of ``batch`` (the leading axis dropped)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), batch)


__all__ = [
    "MASK",
    "PADDING_ID",
    "batch_rows",
    "example_struct",
    "masked_mean",
    "pad_batch",
    "row_mask",
]
