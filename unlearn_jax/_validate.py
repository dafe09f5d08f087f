"""Shared input checks whose error messages name the problem and the values involved.

Every public function of the library validates its arguments eagerly through these helpers, so that
misuse fails at the call site with a message such as ``batch leaves disagree on the batch size:
{'x': 32, 'y': 31}`` instead of an XLA shape error deep inside a jitted computation.

The checks only look at static information (shapes, tree structures, Python numbers), so they are
safe to call on tracers inside ``jax.jit``; the value checks (:func:`finite`) need concrete arrays
and are skipped for tracers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def batch_size(batch: Any, name: str = "batch") -> int:
    """Returns the common leading (batch) dimension of every leaf of ``batch``.

    Raises:
      ValueError: if ``batch`` has no leaves, a leaf is a scalar, the leaves disagree on their leading
        dimension, or the batch is empty.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError(
            f"{name} has no array leaves; expected a pytree of arrays with a batch axis."
        )
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every leaf of a "
                "batch needs a leading batch axis."
            )
        sizes[jax.tree_util.keystr(path) or "<root>"] = shape[0]
    distinct = set(sizes.values())
    if len(distinct) != 1:
        raise ValueError(f"{name} leaves disagree on the batch size: {sizes}")
    (size,) = distinct
    if size == 0:
        raise ValueError(f"{name} is empty (batch size 0); at least one example is required.")
    return int(size)


def same_structure(a: Any, b: Any, a_name: str, b_name: str, *, check_shapes: bool = True) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have the same tree structure (and leaf shapes)."""
    sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if sa != sb:
        raise ValueError(
            f"{b_name} must have the same tree structure as {a_name}.\n"
            f"  {a_name}: {sa}\n  {b_name}: {sb}"
        )
    if check_shapes:
        for (path, la), lb in zip(
            jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b), strict=True
        ):
            if np.shape(la) != np.shape(lb):
                raise ValueError(
                    f"{b_name} leaf {jax.tree_util.keystr(path)} has shape {np.shape(lb)} but "
                    f"{a_name} has {np.shape(la)}."
                )


def positive(**values: float) -> None:
    """Raises ``ValueError`` unless every keyword value is a finite number > 0."""
    for name, value in values.items():
        if not (isinstance(value, int | float | np.number) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}.")


def non_negative(**values: float) -> None:
    """Raises ``ValueError`` unless every keyword value is a finite number >= 0."""
    for name, value in values.items():
        if not (isinstance(value, int | float | np.number) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}.")


def positive_int(**values: int | None) -> None:
    """Raises ``ValueError`` unless every keyword value is an int >= 1 (``None`` passes)."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (or None), got {name}={value!r}.")


def in_interval(
    name: str, value: float, low: float, high: float, *, closed: str = "neither"
) -> None:
    """Raises ``ValueError`` unless ``value`` lies in the interval; ``closed`` in neither/left/right/both."""
    ok_low = value >= low if closed in ("left", "both") else value > low
    ok_high = value <= high if closed in ("right", "both") else value < high
    if not (isinstance(value, int | float | np.number) and ok_low and ok_high):
        left = "[" if closed in ("left", "both") else "("
        right = "]" if closed in ("right", "both") else ")"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {name}={value!r}.")


def one_of(name: str, value: Any, choices: Mapping[str, Any] | tuple | list | set) -> None:
    """Raises ``ValueError`` naming the valid choices unless ``value`` is one of them."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in sorted(choices, key=str))
        raise ValueError(f"unknown {name} {value!r}; expected one of: {valid}.")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


@functools.partial(jax.jit, static_argnames=("stacked",))
def _finite_flags(leaves: list, stacked: bool) -> jax.Array:
    """``[L]`` (or ``[L, M]`` per model when ``stacked``): whether each leaf is all finite."""

    def one(a):
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.ones(a.shape[:1] if stacked else (), bool)
        return jnp.all(jnp.isfinite(a), axis=tuple(range(1, a.ndim)) if stacked else None)

    return jnp.stack([one(a) for a in leaves])


def nonfinite(tree: Any, *, stacked: bool = False) -> tuple[str, int | None] | None:
    """The first leaf of ``tree`` (and model, when ``stacked``: leaves carry a leading model axis)
    that holds a NaN or infinity, as ``(path, model)``; ``None`` when everything is finite.

    One jitted reduction and one host copy for the whole tree (never one per leaf).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays = list(flat)
    if not arrays:
        return None
    flags = np.asarray(_finite_flags([jnp.asarray(leaf) for _, leaf in arrays], stacked))
    bad = np.argwhere(~flags)
    if bad.size == 0:
        return None
    leaf = int(bad[0][0])
    where = jax.tree_util.keystr(arrays[leaf][0]) or "<root>"
    return where, (int(bad[0][1]) if stacked else None)


def finite(tree: Any, name: str) -> None:
    """Raises ``ValueError`` naming the first leaf of ``tree`` that holds a NaN or infinity.

    The library's one finiteness check of a pytree (:func:`nonfinite`). Tracers (inside ``jit``)
    are skipped: the check needs values.
    """
    if any(not _is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(tree)):
        return
    found = nonfinite(tree)
    if found is not None:
        raise ValueError(f"{name}{found[0]} contains NaN or infinite values.")


def scalar_output(value: Any, fn_name: str) -> None:
    """Raises ``TypeError`` unless ``value`` (an output or its ``ShapeDtypeStruct``) is a scalar."""
    shape = np.shape(value) if not hasattr(value, "shape") else tuple(value.shape)
    if shape != ():
        raise TypeError(
            f"{fn_name} must return a scalar (the loss of ONE example), but it returned shape {shape}. "
            "If it returns per-example losses of a batch, pass it the loss of a single example instead: "
            "the batch axis is added by vmap."
        )
