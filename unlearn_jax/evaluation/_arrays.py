"""Host-side (numpy, float64) input checks and stable softmax pieces shared by the evaluation modules.

Evaluation statistics are computed on the host in float64: they are cheap next to the models that
produce their inputs, and float64 keeps ranks, tails and logarithms of tiny probabilities exact
whatever ``jax_enable_x64`` says. The finiteness check lives here rather than in
:func:`unlearn_jax._validate.finite` because that one converts to a JAX array, which under the default
32-bit mode would turn a large finite float64 into infinity.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def describe(values: Any, limit: int = 5) -> str:
    """A short description of some values for an error message: ``[3, 17, 99, ...] (12 in all)``."""
    values = np.asarray(values).reshape(-1)
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    more = ", ..." if values.size > limit else ""
    return f"[{shown}{more}] ({values.size} in all)"


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raises ``ValueError`` naming how many entries of ``arr`` are NaN or infinite, and where."""
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)
        first = tuple(int(i) for i in where[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN or infinite value(s) (first at index {first}: "
            f"{arr[first]!r}); evaluation needs finite inputs."
        )


def float_array(x: Any, name: str, *, ndim: int | None = None, min_ndim: int = 0) -> np.ndarray:
    """Converts ``x`` (numpy/JAX array, list) to a finite, non-empty float64 numpy array.

    Raises:
      ValueError: if ``x`` has the wrong number of dimensions, is empty, or holds NaN/infinity.
    """
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}.")
    if arr.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {arr.shape}."
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); at least one value is required.")
    check_finite(arr, name)
    return arr


def logits_array(logits: Any, name: str) -> np.ndarray:
    """Float64 logits ``[..., C]`` with ``C >= 2`` classes, finite and non-empty."""
    arr = float_array(logits, name, min_ndim=1)
    if arr.shape[-1] < 2:
        raise ValueError(
            f"{name} must have at least 2 classes on its last axis, got shape {arr.shape}; "
            "these statistics are defined for classifiers."
        )
    return arr


def label_array(labels: Any, name: str, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Integer labels broadcast to ``shape`` (the logits' shape without the class axis).

    Raises:
      ValueError: if the labels are not integers, do not broadcast to ``shape``, or fall outside
        ``[0, num_classes)``.
    """
    arr = np.asarray(labels)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {arr.dtype}.")
    try:
        arr = np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(
            f"{name} of shape {np.shape(labels)} does not match the logits, which have "
            f"{shape} examples (the logits' shape without the class axis)."
        ) from None
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) for {num_classes} classes; got out-of-range "
            f"labels {describe(np.unique(arr[bad]))}."
        )
    return arr.astype(np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log p_k = z_k - logsumexp(z)`` along the last axis, computed with the max shifted out."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def logsumexp(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log sum exp`` along ``axis``; entries equal to ``-inf`` contribute nothing (at least one
    entry per slice must be finite)."""
    top = values.max(axis=axis, keepdims=True)
    out = top + np.log(np.sum(np.exp(values - top), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis)


def log1m_softmax(logits: np.ndarray) -> np.ndarray:
    """``log(1 - p_k)`` for every class, accurate even where ``p_k`` rounds to 1.

    For every class but the arg-max, ``p_k <= 1/2`` and ``log1p(-p_k)`` is accurate. For the arg-max
    class, ``1 - p_k`` may be below float64 resolution, so it is taken exactly as
    ``logsumexp_{j != k} z_j - logsumexp_j z_j``.
    """
    logp = log_softmax(logits)
    with np.errstate(divide="ignore"):  # the arg-max entry may be log(0); it is replaced below
        out = np.log1p(-np.exp(logp))
    top = np.argmax(logits, axis=-1)[..., None]
    masked = logits.copy()
    np.put_along_axis(masked, top, -np.inf, axis=-1)
    exact = logsumexp(masked) - logsumexp(logits)
    np.put_along_axis(out, top, exact[..., None], axis=-1)
    return out
