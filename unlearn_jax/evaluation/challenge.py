"""The NeurIPS 2023 machine-unlearning challenge score (Triantafillou et al., 2024).

For every forget example the challenge compares the distribution of a statistic over many unlearned
models (512 in the competition) with its distribution over many models retrained without the forget
set, and turns the best distinguishing attack into an empirical privacy loss epsilon:

1. Statistic: ``phi = log p_y - log(1 - p_y)``
   (:func:`unlearn_jax.evaluation.mia.logit_margins` on the models' logits).
2. Attacks: every threshold ``t`` over the pooled values of that example, in both directions (an
   attack says "unlearned" when ``phi > t``, or when ``phi <= t``). Unlearned models are the positive
   class: ``FPR`` = share of retrained models called unlearned, ``FNR`` = share of unlearned models
   called retrained.
3. Per attack: ``eps = max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR)``; a term
   whose ``1 - delta - rate`` is not positive is undefined and ignored.
4. Per example: ``epsilon = min(cap, max(0, max over attacks))`` with ``delta = 1e-5``, ``cap = 50``.

Zero rates, pinned: an attack with ``FPR = FNR = 0`` separates the two samples perfectly, so its
epsilon is infinite and the example's epsilon is the cap. An attack with exactly ONE zero rate is
discarded, as in the organisers' released code: with finite samples such attacks always exist (a
threshold just below the single largest value has ``FPR = 0``, ``FNR = 1 - 1/M`` whenever that value
is an unlearned model's), and counting their ``-log 0 = +inf`` would give epsilon = cap to about half
of the examples even when the two distributions are identical. An attack whose two terms are both
undefined (both rates near 1: the reverse attack is perfect) also counts as infinite.

Both directions, pinned: the released single-threshold attack only says "unlearned" ABOVE the
threshold, which misses unlearned models that are systematically LESS confident than retrained ones
(over-forgetting) unless the separation is perfect. A threshold attack may face either way, so both
are used (``both_directions=False`` restores the one-sided rule).

Finite-sample bias, stated: epsilon is the IN-SAMPLE maximum over all thresholds, so tail
thresholds that isolate a handful of models give count ratios such as ``log(3 / 1)`` even when the
two distributions are identical. On two independent samples of 256 standard normals per example the
median epsilon is about ``log 4`` (two-sided; ``log 3`` one-sided) whatever the number of models,
and the mean points are about 0.22 (0.40 one-sided), against 0.08 for a shift of 0.5 sd and 0.02 for
1 sd. Read the score against a baseline: the same computation on two disjoint halves of the retrained
models (``challenge_epsilons(retrained[: M // 2], retrained[M // 2 :])``).

5. Points: bucket ``k = floor(epsilon / bin_width)`` (``bin_width = 0.5``; epsilon in
   ``[0.5 k, 0.5 (k + 1))``) earns ``2^-k`` points: 1 for ``epsilon < 0.5``, 1/2 for
   ``[0.5, 1)``, 1/4 for ``[1, 1.5)``, ... (the capped epsilon 50 lands in bucket 100). The released
   code stops at bucket 12 (``max_bucket=12`` reproduces that).
6. Score: ``mean over forget examples of points  x  (RA_u / RA_r)  x  (TA_u / TA_r)`` with the mean
   retain and test accuracies of the unlearned (u) and retrained (r) models.

Reference:
  Triantafillou et al., "Are we making progress in unlearning? Findings from the first NeurIPS
  unlearning competition", arXiv:2406.09073.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unlearn_jax import _validate
from unlearn_jax.evaluation import _arrays

DELTA = 1e-5
EPSILON_CAP = 50.0
BIN_WIDTH = 0.5


def _attack_rates(
    unlearned: np.ndarray, retrained: np.ndarray, both_directions: bool
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and FNR ``[A]`` of every threshold attack on one example's two samples."""
    u = np.sort(unlearned)
    r = np.sort(retrained)
    thresholds = np.r_[-np.inf, np.unique(np.concatenate([u, r]))]
    # "unlearned iff phi > t": retrained above t are false positives, unlearned at or below t are
    # false negatives.
    fpr = (r.size - np.searchsorted(r, thresholds, side="right")) / r.size
    fnr = np.searchsorted(u, thresholds, side="right") / u.size
    if both_directions:
        fpr, fnr = np.r_[fpr, 1.0 - fpr], np.r_[fnr, 1.0 - fnr]
    return fpr, fnr


def _epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> float:
    """``max(0, max over attacks of eps)`` with the zero-rate rules of the module docstring."""
    if np.any((fpr == 0) & (fnr == 0)):
        return float("inf")
    keep = (fpr > 0) & (fnr > 0)
    fpr, fnr = fpr[keep], fnr[keep]
    a, b = 1.0 - delta - fpr, 1.0 - delta - fnr
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)) - np.log(fnr), np.nan)
        second = np.where(b > 0, np.log(np.where(b > 0, b, 1.0)) - np.log(fpr), np.nan)
    if np.any(np.isnan(first) & np.isnan(second)):
        return float("inf")
    per_attack = np.fmax(first, second)
    return float(max(0.0, np.max(per_attack))) if per_attack.size else 0.0


def _scores_pair(unlearned: Any, retrained: Any) -> tuple[np.ndarray, np.ndarray]:
    u = _arrays.float_array(unlearned, "unlearned_scores", ndim=2)
    r = _arrays.float_array(retrained, "retrained_scores", ndim=2)
    if u.shape[1] != r.shape[1]:
        raise ValueError(
            f"unlearned_scores {u.shape} and retrained_scores {r.shape} must share the example axis "
            "(shapes are [models, forget examples])."
        )
    return u, r


def challenge_epsilons(
    unlearned_scores: Any,
    retrained_scores: Any,
    *,
    delta: float = DELTA,
    cap: float = EPSILON_CAP,
    both_directions: bool = True,
) -> np.ndarray:
    """Per-forget-example empirical epsilon of the best threshold attack (module docstring, 2-4).

    Args:
      unlearned_scores: ``[M_u, N]`` the statistic ``phi = log p_y - log(1 - p_y)`` of each forget
        example under each unlearned model.
      retrained_scores: ``[M_r, N]`` the same under each retrained model.
      delta: the ``delta`` of ``(epsilon, delta)``, in ``[0, 1)`` (default 1e-5).
      cap: upper bound on epsilon (default 50); infinite epsilons become ``cap``.
      both_directions: attack with thresholds facing both ways (default) or only "unlearned above".

    Returns:
      ``[N]`` float64 epsilons in ``[0, cap]``.

    Raises:
      ValueError: on empty, non-finite or mis-shaped scores.
    """
    _validate.in_interval("delta", delta, 0.0, 1.0, closed="left")
    _validate.positive(cap=cap)
    u, r = _scores_pair(unlearned_scores, retrained_scores)
    eps = np.empty(u.shape[1], np.float64)
    for n in range(u.shape[1]):
        fpr, fnr = _attack_rates(u[:, n], r[:, n], both_directions)
        eps[n] = _epsilon_from_rates(fpr, fnr, delta)
    return np.minimum(eps, cap)


def challenge_points(
    epsilons: Any, *, bin_width: float = BIN_WIDTH, max_bucket: int | None = None
) -> np.ndarray:
    """Points ``2^-k`` for bucket ``k = floor(epsilon / bin_width)`` (capped at ``max_bucket``).

    Args:
      epsilons: ``[N]`` non-negative epsilons.
      bin_width: bucket width (default 0.5).
      max_bucket: optional last bucket (the released code's is 12); ``None``: no limit.

    Returns:
      ``[N]`` float64 points in ``(0, 1]``.

    Examples:
      >>> challenge_points([0.0, 0.49, 0.5, 1.2, 50.0]).tolist()[:4]
      [1.0, 1.0, 0.5, 0.25]
    """
    _validate.positive(bin_width=bin_width)
    _validate.positive_int(max_bucket=max_bucket)
    eps = _arrays.float_array(epsilons, "epsilons", ndim=1)
    if np.any(eps < 0):
        raise ValueError(f"epsilons must be >= 0, got {_arrays.describe(eps[eps < 0])}.")
    bucket = np.floor(eps / bin_width)
    if max_bucket is not None:
        bucket = np.minimum(bucket, max_bucket)
    return np.exp2(-bucket)


def _mean_accuracy(value: Any, name: str) -> float:
    arr = _arrays.float_array(value, name)
    mean = float(np.mean(arr))
    if mean <= 0:
        raise ValueError(f"{name} must be positive (an accuracy), got mean {mean}.")
    return mean


def challenge_score(
    unlearned_scores: Any,
    retrained_scores: Any,
    *,
    ra_unlearned: Any,
    ra_retrained: Any,
    ta_unlearned: Any,
    ta_retrained: Any,
    delta: float = DELTA,
    cap: float = EPSILON_CAP,
    bin_width: float = BIN_WIDTH,
    max_bucket: int | None = None,
    both_directions: bool = True,
) -> dict[str, float]:
    """The challenge's final score: forgetting quality times the two utility ratios.

    ``score = mean_n points(epsilon_n) * (RA_u / RA_r) * (TA_u / TA_r)``.

    Args:
      unlearned_scores: ``[M_u, N]`` ``phi`` of the forget examples under the unlearned models.
      retrained_scores: ``[M_r, N]`` ``phi`` under the retrained models.
      ra_unlearned, ra_retrained, ta_unlearned, ta_retrained: retain / test accuracies of the
        unlearned and retrained models, scalars or per-model arrays (averaged); any unit, as long as
        both sides of a ratio share it.
      delta, cap, both_directions: see :func:`challenge_epsilons`.
      bin_width, max_bucket: see :func:`challenge_points`.

    Returns:
      ``{"challenge/score", "challenge/forget_quality" (mean points), "challenge/ra_ratio",
      "challenge/ta_ratio", "challenge/epsilon_mean", "challenge/epsilon_max"}``.
    """
    ra_u = _mean_accuracy(ra_unlearned, "ra_unlearned")
    ra_r = _mean_accuracy(ra_retrained, "ra_retrained")
    ta_u = _mean_accuracy(ta_unlearned, "ta_unlearned")
    ta_r = _mean_accuracy(ta_retrained, "ta_retrained")
    eps = challenge_epsilons(
        unlearned_scores,
        retrained_scores,
        delta=delta,
        cap=cap,
        both_directions=both_directions,
    )
    quality = float(np.mean(challenge_points(eps, bin_width=bin_width, max_bucket=max_bucket)))
    return {
        "challenge/score": quality * (ra_u / ra_r) * (ta_u / ta_r),
        "challenge/forget_quality": quality,
        "challenge/ra_ratio": ra_u / ra_r,
        "challenge/ta_ratio": ta_u / ta_r,
        "challenge/epsilon_mean": float(np.mean(eps)),
        "challenge/epsilon_max": float(np.max(eps)),
    }
