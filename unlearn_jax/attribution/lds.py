r"""The linear datamodeling score (LDS): how well attribution scores predict retraining on subsets.

For ``S`` random training subsets :math:`D_1, \dots, D_S` (each a fraction :math:`\alpha` of the
training set, :func:`subset_masks`), models trained on each (as one population:
:func:`~unlearn_jax.training.fit_many` with ``member_masks``) give the actual outputs
:math:`f(z_j; \theta(D_s))` of every query :math:`z_j`; the scores predict them as the sum of the
subset's scores, :math:`g_s(z_j) = \sum_{i \in D_s} \tau_{ij}`. The LDS of query ``j`` is the
Spearman rank correlation over the subsets,

.. math:: \mathrm{LDS}_j = \rho_{\mathrm{Spearman}}\bigl(\{f(z_j; \theta(D_s))\}_{s},
          \{g_s(z_j)\}_{s}\bigr),

and the reported LDS is the mean over queries. Ranks of ties are averaged (as
``scipy.stats.spearmanr``); a query whose predictions or outputs are all equal has no defined
correlation and is left out of the mean (counted in :attr:`LDSResult.undefined`).

When several models are trained per subset (different seeds), average their outputs first: the
LDS measures the prediction of the expected output of training on a subset.

References:
  Park, Georgiev, Ilyas, Leclerc, Madry. TRAK: Attributing Model Behavior at Scale. ICML 2023
  (arXiv:2303.14186), section 2.2 (definition 2.3), alpha = 0.5 in its evaluations.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from unlearn_jax import _validate


class LDSResult(NamedTuple):
    """The linear datamodeling score.

    Attributes:
      mean: the mean over queries with a defined correlation.
      per_query: ``[n_q]`` float64 Spearman correlations (NaN where undefined).
      predicted: ``[S, n_q]`` the scores' predictions :math:`g_s(z_j)`.
      undefined: the number of queries whose correlation is undefined (constant values).
    """

    mean: float
    per_query: np.ndarray
    predicted: np.ndarray
    undefined: int


def subset_masks(n: int, num_subsets: int, *, key: jax.Array, fraction: float = 0.5) -> np.ndarray:
    """``[S, n]`` boolean masks of random subsets, each of exactly ``round(fraction * n)`` examples.

    Subset ``s`` is the first ``round(fraction * n)`` positions of
    ``jax.random.permutation(fold_in(key, s), n)``.

    Raises:
      ValueError: ``fraction`` outside ``(0, 1)``, non-positive sizes, or an empty subset.
    """
    _validate.positive_int(n=n, num_subsets=num_subsets)
    _validate.in_interval("fraction", fraction, 0.0, 1.0, closed="neither")
    size = round(fraction * n)
    if size == 0:
        raise ValueError(f"fraction={fraction} of n={n} examples selects nothing.")
    masks = np.zeros((num_subsets, n), bool)
    for s in range(num_subsets):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, s), n))
        masks[s, order[:size]] = True
    return masks


def average_ranks(values: Any, axis: int = 0) -> np.ndarray:
    """Ranks ``1..n`` along ``axis``, ties given the mean of the ranks they span, float64."""
    a = np.moveaxis(np.asarray(values, np.float64), axis, -1)
    n = a.shape[-1]
    order = np.argsort(a, axis=-1, kind="stable")
    sorted_a = np.take_along_axis(a, order, axis=-1)
    # Tie groups: a new group starts wherever the sorted value changes.
    starts = np.concatenate(
        [np.ones((*a.shape[:-1], 1), bool), sorted_a[..., 1:] != sorted_a[..., :-1]], axis=-1
    )
    group = np.cumsum(starts, axis=-1) - 1
    positions = np.broadcast_to(np.arange(n, dtype=np.float64), a.shape)
    flat_group = group.reshape(-1, n) + n * np.arange(group.size // n)[:, None]
    sums = np.bincount(flat_group.ravel(), positions.reshape(-1), minlength=group.size)
    counts = np.bincount(flat_group.ravel(), minlength=group.size)
    mean_rank = (sums / np.maximum(counts, 1))[flat_group].reshape(a.shape) + 1.0
    ranks = np.empty_like(mean_rank)
    np.put_along_axis(ranks, order, mean_rank, axis=-1)
    return np.moveaxis(ranks, -1, axis)


def spearman(a: Any, b: Any, axis: int = 0) -> np.ndarray:
    """Spearman correlations of ``a`` and ``b`` along ``axis`` (one per other index), float64:
    the Pearson correlation of their average ranks; NaN where either is constant."""
    ra, rb = average_ranks(a, axis), average_ranks(b, axis)
    ra = ra - ra.mean(axis=axis, keepdims=True)
    rb = rb - rb.mean(axis=axis, keepdims=True)
    num = np.sum(ra * rb, axis=axis)
    den = np.sqrt(np.sum(ra * ra, axis=axis) * np.sum(rb * rb, axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def linear_datamodeling_score(scores: Any, masks: Any, actual: Any) -> LDSResult:
    r"""The LDS of attribution scores (module docstring).

    Args:
      scores: ``[n, n_q]`` scores :math:`\tau_{ij}` (training rows, query columns): an array, a
        memory map, or a :class:`~unlearn_jax.attribution.trak.ScoreStore` (read in row blocks).
      masks: ``[S, n]`` subset memberships (bool or 0/1), e.g. from :func:`subset_masks`.
      actual: ``[S, n_q]`` outputs of the models trained on each subset (the same output
        function the scores attribute, e.g. margins), averaged over seeds per subset.

    Returns:
      An :class:`LDSResult`.

    Raises:
      ValueError: mismatched shapes, fewer than 3 subsets, non-finite values.
    """
    masks = np.asarray(masks)
    actual = np.asarray(actual, np.float64)
    if masks.ndim != 2 or actual.ndim != 2 or masks.shape[0] != actual.shape[0]:
        raise ValueError(
            f"masks [S, n] and actual [S, n_q] must share the subset axis; got {masks.shape} and "
            f"{actual.shape}."
        )
    if masks.shape[0] < 3:
        raise ValueError(f"a rank correlation needs at least 3 subsets, got {masks.shape[0]}.")
    if not np.all(np.isfinite(actual)):
        raise ValueError("actual holds NaN or infinite outputs.")
    want = (masks.shape[1], actual.shape[1])
    shape = tuple(scores.shape)
    if shape != want:
        raise ValueError(
            f"scores {shape} must be [n, n_q] = [{want[0]}, {want[1]}] for masks {masks.shape} and "
            f"actual {actual.shape} (per-class scores do not fit the LDS)."
        )
    if hasattr(scores, "masked_sums"):
        predicted = scores.masked_sums(masks)
    else:
        predicted = masks.astype(np.float64) @ np.asarray(scores, np.float64)
    per_query = spearman(predicted, actual, axis=0)
    defined = np.isfinite(per_query)
    mean = float(np.mean(per_query[defined])) if defined.any() else float("nan")
    return LDSResult(mean, per_query, predicted, int((~defined).sum()))


__all__ = ["LDSResult", "average_ranks", "linear_datamodeling_score", "spearman", "subset_masks"]
