"""The NeurIPS 2023 machine-unlearning challenge score, as the organisers' released scorer computes it.

For every forget example the challenge compares the distribution of a statistic over many unlearned
models (512 in the competition) with its distribution over as many models retrained without the
forget set, and turns the best distinguishing attack of a fixed family into an empirical privacy
loss epsilon. The rules below are those of the released scorer (google-deepmind/unlearning_evaluation,
``metric.py``), stated as we implement them; for one example with samples ``U`` (``M_u`` unlearned
models) and ``R`` (``M_r`` retrained models):

1. Statistic: ``phi = log p_y - log(1 - p_y)``. :func:`unlearn_jax.evaluation.mia.logit_margins`
   computes it exactly from logits; the released code computes
   ``log(p_y + 1e-45) - log(sum_{k != y} p_k + 1e-45)`` from a softmax, which agrees within
   ``1e-12`` while ``|phi| < 75``, then falls behind and saturates at ``+-log(1e45) = +-103.6``
   (:func:`challenge_confidences` computes that form).
2. Positive class, per example: the side with the larger median (``R`` if ``median R > median U``,
   otherwise ``U``); the other side is the negative class. So over-forgetting (unlearned models LESS
   confident than retrained ones) is attacked as readily as under-forgetting.
3. Peaky rule: with ``w_U = max U - min U`` and ``w_R`` likewise, if
   ``min(w_U, w_R) / max(w_U, w_R) < 0.01`` the example's epsilon is ``cap`` (50) and no attack is
   run. (Both ranges zero gives ``0 / 0``, which is not below 0.01: the attacks are run.)
4. Attack family 1, one threshold: thresholds ``t`` on ``n = ceil(100 (hi - lo))`` equally spaced
   points from ``lo`` to ``hi``, the pooled minimum and maximum (a grid step of about 0.01; the
   released code builds this grid in float32, and so does :func:`challenge_epsilons`). The attack
   predicts "positive" iff ``phi >= t``.
5. Attack family 2, an interval: let ``P`` be the side with the smaller range (``U`` and ``R`` tied:
   the NEGATIVE class of rule 2), ``Q`` the other, ``w = min(w_U, w_R)``. Right ends ``b`` take
   ``ceil(100 (max P + 2 - (min P + w - 2)))`` (about 400) equally spaced values from
   ``min P + w - 2`` to ``max P + 2``; for each ``b``, left ends ``a`` take 400 equally spaced values
   from ``b - w - 2`` to ``b - w + 2``. The attack predicts "``P``" iff ``a <= phi <= b``, and ``P``
   is its positive class.
6. Rates of an attack: ``FPR`` = share of the negative class predicted positive, ``FNR`` = share of
   the positive class predicted negative.
7. Epsilon of an attack: ``FPR = FNR = 0`` (perfect separation) gives ``+inf``; exactly one zero
   rate: the attack is DISCARDED (with finite samples such attacks always exist at the tails, and
   ``-log 0`` would give every example the cap). Otherwise
   ``eps = max(0, log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR)`` where a term
   whose ``1 - delta - rate`` is not positive is undefined and left out; if both are undefined
   (``FPR = FNR = 1``) the attack is discarded.
8. Epsilon of the example: ``min(cap, max over the kept attacks of both families)``, with
   ``delta = 1e-5`` and ``cap = 50``. If no attack is kept (possible only in degenerate cases such as
   every value of the example being equal), the released code stops with an assertion error; here
   epsilon is 0: the family cannot tell the two samples apart.
9. Points: with ``M = M_u`` unlearned models, ``E = ceil(ln(M - 1))`` and the last bucket
   ``K = 2 E - 1`` (13 for 512 models, 9 for 128, 3 for 8), an epsilon in bucket
   ``k = floor(epsilon / 0.5)`` earns ``2^-k`` points if ``k <= K`` and 0 points beyond: 1 for
   ``epsilon < 0.5``, 1/2 for ``[0.5, 1)``, ..., so an epsilon at or above ``E`` earns nothing.
10. Score: ``mean over forget examples of points  x  (RA_u / RA_r)  x  (TA_u / TA_r)`` with the mean
    retain and test accuracies of the unlearned (u) and retrained (r) models.

Where this module and the released code differ, knowingly: rates and epsilons are float64 here and
float32 there (epsilons agree to about 1e-6 relative, so points differ only for an epsilon within
that of a bucket edge); the grid points of rule 4 are reproduced with float32 arithmetic but a GPU
may round an interior point differently in the last bit; the released code needs ``M_u = M_r``
(here the two may differ, and rule 9 uses ``M_u`` as there); rule 8's degenerate case.

The grids are in absolute units of ``phi`` (steps of 0.01, intervals within 2 of the peakier side),
so the score is not invariant to rescaling the statistic: feed it ``phi`` itself.

Finite-sample bias, stated: epsilon is the IN-SAMPLE maximum over some 160,000 attacks, so tail
thresholds and intervals that isolate a handful of models give count ratios such as ``log(3 / 1)``
even when the two distributions are identical. On two independent samples of 256 standard normals
per example the median epsilon is about 1.6 and the mean points about 0.17 (0.18-0.20 at 512 and
128 models); a shift of 0.5 sd gives about 0.08 and 1 sd about 0.02 (200 examples each). Read the
score against a baseline: the same computation on two disjoint halves of the retrained models
(``challenge_epsilons(retrained[: M // 2], retrained[M // 2 :])``, whose points then use
``num_models=M // 2``).

Reference:
  Triantafillou et al., "Are we making progress in unlearning? Findings from the first NeurIPS
  unlearning competition", arXiv:2406.09073.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from unlearn_jax import _validate
from unlearn_jax.evaluation import _arrays

DELTA = 1e-5
EPSILON_CAP = 50.0
BIN_WIDTH = 0.5
# The released scorer's constants: grid points per unit of phi, the half-width of the interval
# family's search window, the range ratio of the peaky rule, and the probability offset of the
# statistic.
THRESHOLDS_PER_UNIT = 100
INTERVAL_BUFFER = 2.0
INTERVAL_LEFT_POINTS = 400
PEAKY_RATIO = 0.01
CONFIDENCE_OFFSET = 1e-45


def challenge_confidences(logits: Any, labels: Any) -> np.ndarray:
    """The released scorer's statistic ``log(p_y + 1e-45) - log(sum_{k != y} p_k + 1e-45)``.

    ``p`` is the float64 softmax of the logits with their maximum shifted out. Within
    ``|phi| < 75`` this equals :func:`unlearn_jax.evaluation.mia.logit_margins` within ``1e-12``;
    beyond, the ``1e-45`` offsets pull it in until it saturates at ``+-log(1e45) = +-103.6``. (The released code
    exponentiates the models' float32 logits before converting to float64, which adds float32
    rounding, about ``1e-7``, to its values.)

    Args:
      logits: ``[..., C]`` logits with ``C >= 2`` (e.g. ``[M, N, C]`` for ``M`` models).
      labels: integer labels broadcastable to ``logits.shape[:-1]`` (e.g. ``[N]``).

    Returns:
      ``[...]`` float64 statistics (``logits.shape[:-1]``).

    Raises:
      ValueError: on empty or non-finite logits, fewer than 2 classes, or bad labels.

    Examples:
      >>> round(float(challenge_confidences(np.log([[0.8, 0.1, 0.1]]), [0])[0]), 4)
      1.3863
      >>> round(float(challenge_confidences([[500.0, 0.0]], [0])[0]), 2)  # saturated
      103.62
    """
    z = _arrays.logits_array(logits, "logits")
    y = _arrays.label_array(labels, "labels", z.shape[:-1], z.shape[-1])
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    p_y = np.take_along_axis(p, y[..., None], axis=-1)[..., 0]
    # The other classes' mass is summed directly, never as 1 - p_y, which would cancel to 0.
    np.put_along_axis(p, y[..., None], 0.0, axis=-1)
    p_other = p.sum(axis=-1)
    return np.log(p_y + CONFIDENCE_OFFSET) - np.log(p_other + CONFIDENCE_OFFSET)


def _float32_grid(low: float, high: float, num: int) -> np.ndarray:
    """``num`` points from ``low`` to ``high`` computed as the released scorer's float32 grid.

    That grid comes from ``torch.linspace`` in the default float32: with ``lo = float32(low)``,
    ``hi = float32(high)`` and ``step = (hi - lo) / (num - 1)`` in float32, point ``i`` is
    ``lo + i step`` in the first half and ``hi - (num - 1 - i) step`` in the second, so the ends are
    exactly ``lo`` and ``hi``.

    Returns:
      ``[num]`` float64 (the float32 values, converted exactly).
    """
    lo, hi = np.float32(low), np.float32(high)
    if num <= 1:
        return np.full(num, lo, np.float64)
    step = (hi - lo) / np.float32(num - 1)
    i = np.arange(num)
    half = num // 2
    first = lo + step * i[:half].astype(np.float32)
    second = hi - step * (num - 1 - i[half:]).astype(np.float32)
    return np.concatenate([first, second]).astype(np.float64)


@functools.lru_cache(maxsize=16)
def _epsilon_table(num_negative: int, num_positive: int, delta: float) -> np.ndarray:
    """Epsilon of an attack from its error counts (rule 7 of the module docstring), tabulated.

    Args:
      num_negative, num_positive: the class sizes.
      delta: the ``delta`` of ``(epsilon, delta)``.

    Returns:
      ``[num_negative + 1, num_positive + 1]`` read-only float64 table: entry ``[fp, fn]`` (``fp``
      negatives predicted positive, ``fn`` positives predicted negative) is ``+inf`` for a perfect
      attack (``fp = fn = 0``), ``-inf`` for a discarded one (exactly one zero, or both terms
      undefined), else ``max(0, defined terms)``.
    """
    fpr = (np.arange(num_negative + 1) / num_negative)[:, None]
    fnr = (np.arange(num_positive + 1) / num_positive)[None, :]
    a, b = 1.0 - delta - fpr, 1.0 - delta - fnr
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)) - np.log(fnr), np.nan)
        second = np.where(b > 0, np.log(np.where(b > 0, b, 1.0)) - np.log(fpr), np.nan)
    per_attack = np.maximum(np.fmax(first, second), 0.0)  # NaN where both terms are undefined
    table = np.where(np.isnan(per_attack), -np.inf, per_attack)
    table = np.where((fpr > 0) & (fnr > 0), table, -np.inf)
    table[0, 0] = np.inf
    table.setflags(write=False)
    return table


def _count_at_least(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``#{v >= t}`` for every threshold ``t``."""
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="left")


def _count_between(sorted_values: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``#{left <= v <= right}`` for ``left [B, A]`` and ``right [B]`` (0 where ``left > right``)."""
    upto_right = np.searchsorted(sorted_values, right, side="right")[:, None]
    below_left = np.searchsorted(sorted_values, left, side="left")
    return np.maximum(upto_right - below_left, 0)


def _example_epsilon(
    u: np.ndarray, r: np.ndarray, delta: float, cap: float, both_directions: bool
) -> float:
    """Epsilon of one forget example from its ``[M_u]`` and ``[M_r]`` statistics (rules 2-8)."""
    pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
    pos_range, neg_range = np.ptp(pos), np.ptp(neg)
    largest, smallest = max(pos_range, neg_range), min(pos_range, neg_range)
    if largest > 0 and smallest / largest < PEAKY_RATIO:
        return cap
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)

    # Family 1: "positive iff phi >= t" on the pooled range's grid.
    low, high = min(pos_sorted[0], neg_sorted[0]), max(pos_sorted[-1], neg_sorted[-1])
    t = _float32_grid(low, high, math.ceil((high - low) * THRESHOLDS_PER_UNIT))
    tp = _count_at_least(pos_sorted, t)
    fp = _count_at_least(neg_sorted, t)
    table = _epsilon_table(neg.size, pos.size, delta)
    best = table[fp, pos.size - tp].max(initial=-np.inf)  # no grid when every value is equal
    if both_directions:  # "positive iff phi < t": every count flips to its complement
        best = max(best, table[neg.size - fp, tp].max(initial=-np.inf))

    # Family 2: "P iff a <= phi <= b" around the peakier side P (ties: the negative class).
    p_sorted, q_sorted = (
        (neg_sorted, pos_sorted) if pos_range >= neg_range else (pos_sorted, neg_sorted)
    )
    right_low = p_sorted[0] + smallest - INTERVAL_BUFFER
    right_high = p_sorted[-1] + INTERVAL_BUFFER
    right = np.linspace(
        right_low, right_high, math.ceil((right_high - right_low) * THRESHOLDS_PER_UNIT)
    )
    left = np.linspace(
        right - smallest - INTERVAL_BUFFER,
        right - smallest + INTERVAL_BUFFER,
        INTERVAL_LEFT_POINTS,
        axis=1,
    )
    tp = _count_between(p_sorted, left, right)
    fp = _count_between(q_sorted, left, right)
    table = _epsilon_table(q_sorted.size, p_sorted.size, delta)
    best = max(best, table[fp, p_sorted.size - tp].max())
    # -inf: every attack was discarded (the released code's assertion error).
    return 0.0 if best == -np.inf else float(min(cap, best))


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
    both_directions: bool = False,
) -> np.ndarray:
    """Per-forget-example empirical epsilon of the released scorer (module docstring, rules 2-8).

    Costs about 160,000 interval attacks per example (tens of milliseconds), whatever the number of
    models.

    Args:
      unlearned_scores: ``[M_u, N]`` the statistic ``phi`` of each forget example under each
        unlearned model (:func:`challenge_confidences` or
        :func:`unlearn_jax.evaluation.mia.logit_margins`).
      retrained_scores: ``[M_r, N]`` the same under each retrained model (``M_r`` may differ from
        ``M_u``; the released code needs them equal).
      delta: the ``delta`` of ``(epsilon, delta)``, in ``[0, 1)`` (default 1e-5).
      cap: upper bound on epsilon and the peaky rule's value (default 50).
      both_directions: also run the one-threshold attacks facing the other way (the smaller-median
        side predicted above the threshold). Not part of the released scorer, which is reproduced
        with the default ``False``; ``True`` can only raise epsilon.

    Returns:
      ``[N]`` float64 epsilons in ``[0, cap]``.

    Raises:
      ValueError: on empty, non-finite or mis-shaped scores, or ``delta``/``cap`` out of range.

    Examples:
      >>> u = np.array([[0.0], [1.0], [2.0], [3.0]]); r = u + 10.0   # perfectly separated
      >>> challenge_epsilons(u, r).tolist()
      [50.0]
    """
    _validate.in_interval("delta", delta, 0.0, 1.0, closed="left")
    _validate.positive(cap=cap)
    u, r = _scores_pair(unlearned_scores, retrained_scores)
    return np.array(
        [
            _example_epsilon(u[:, n], r[:, n], delta, cap, both_directions)
            for n in range(u.shape[1])
        ],
        np.float64,
    )


def _last_bucket(num_models: int, bin_width: float) -> int:
    """``floor(ceil(ln(num_models - 1)) / bin_width) - 1``: the released scorer's last bucket."""
    max_epsilon = math.ceil(math.log(num_models - 1))
    return math.floor(max_epsilon / bin_width) - 1


def challenge_points(
    epsilons: Any,
    *,
    num_models: int | None = None,
    bin_width: float = BIN_WIDTH,
    max_bucket: int | None = None,
) -> np.ndarray:
    """Points ``2^-k`` for bucket ``k = floor(epsilon / bin_width)``, 0 beyond the last bucket.

    The released scorer's last bucket depends on the number of unlearned models ``M``:
    ``K = floor(ceil(ln(M - 1)) / bin_width) - 1``, i.e. ``2 ceil(ln(M - 1)) - 1`` for the width 0.5
    (13 for ``M = 512``, 9 for 128, 3 for 8; ``M = 2`` gives ``K = -1``: no points at all). Pass
    ``num_models`` for that rule, or ``max_bucket`` for a last bucket of your own; with neither,
    every bucket earns ``2^-k`` (not the released rule).

    Args:
      epsilons: ``[N]`` non-negative epsilons.
      num_models: number of unlearned models ``M >= 2``; sets the last bucket as above.
      bin_width: bucket width (default 0.5, the released value).
      max_bucket: the last bucket that earns points (``>= 0``); epsilons in later buckets earn 0.
        Exclusive with ``num_models``.

    Returns:
      ``[N]`` float64 points in ``[0, 1]``.

    Raises:
      ValueError: on negative or non-finite epsilons, ``num_models < 2``, ``max_bucket < 0``, both
        ``num_models`` and ``max_bucket`` given, or a non-positive ``bin_width``.

    Examples:
      >>> challenge_points([0.0, 0.49, 0.5, 1.2, 50.0]).tolist()[:4]
      [1.0, 1.0, 0.5, 0.25]
      >>> challenge_points([0.2, 1.9, 2.0, 50.0], num_models=8).tolist()   # last bucket 3
      [1.0, 0.125, 0.0, 0.0]
    """
    _validate.positive(bin_width=bin_width)
    if num_models is not None and max_bucket is not None:
        raise ValueError(
            f"give num_models or max_bucket, not both (got {num_models=}, {max_bucket=})."
        )
    if num_models is not None:
        if isinstance(num_models, bool) or not isinstance(num_models, int | np.integer):
            raise ValueError(f"num_models must be an integer >= 2, got {num_models=!r}.")
        if num_models < 2:
            raise ValueError(f"num_models must be an integer >= 2, got {num_models=}.")
        max_bucket = _last_bucket(int(num_models), bin_width)
    elif max_bucket is not None:
        if isinstance(max_bucket, bool) or not isinstance(max_bucket, int | np.integer):
            raise ValueError(f"max_bucket must be an integer >= 0 (or None), got {max_bucket=!r}.")
        if max_bucket < 0:
            raise ValueError(f"max_bucket must be an integer >= 0 (or None), got {max_bucket=}.")
    eps = _arrays.float_array(epsilons, "epsilons", ndim=1)
    if np.any(eps < 0):
        raise ValueError(f"epsilons must be >= 0, got {_arrays.describe(eps[eps < 0])}.")
    bucket = np.floor(eps / bin_width)
    points = np.exp2(-bucket)
    if max_bucket is not None:
        points = np.where(bucket <= max_bucket, points, 0.0)
    return points


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
    both_directions: bool = False,
) -> dict[str, float]:
    """The challenge's final score: forgetting quality times the two utility ratios.

    ``score = mean_n points(epsilon_n) * (RA_u / RA_r) * (TA_u / TA_r)``, with the points' last
    bucket set by the number of unlearned models ``M_u`` (rule 9 of the module docstring) unless
    ``max_bucket`` is given. With the defaults this is the released scorer's final score.

    Args:
      unlearned_scores: ``[M_u, N]`` ``phi`` of the forget examples under the unlearned models
        (``M_u >= 2``).
      retrained_scores: ``[M_r, N]`` ``phi`` under the retrained models.
      ra_unlearned, ra_retrained, ta_unlearned, ta_retrained: retain / test accuracies of the
        unlearned and retrained models, scalars or per-model arrays (averaged); any unit, as long as
        both sides of a ratio share it.
      delta, cap, both_directions: see :func:`challenge_epsilons`.
      bin_width: see :func:`challenge_points`.
      max_bucket: overrides the last bucket that earns points (default: from ``M_u``).

    Returns:
      ``{"challenge/score", "challenge/forget_quality" (mean points), "challenge/ra_ratio",
      "challenge/ta_ratio", "challenge/epsilon_mean", "challenge/epsilon_max",
      "challenge/last_bucket"}``.

    Raises:
      ValueError: on bad scores (see :func:`challenge_epsilons`), fewer than 2 unlearned models, or
        a non-positive mean accuracy.
    """
    ra_u = _mean_accuracy(ra_unlearned, "ra_unlearned")
    ra_r = _mean_accuracy(ra_retrained, "ra_retrained")
    ta_u = _mean_accuracy(ta_unlearned, "ta_unlearned")
    ta_r = _mean_accuracy(ta_retrained, "ta_retrained")
    num_models = np.shape(unlearned_scores)[0] if np.ndim(unlearned_scores) == 2 else 0
    if max_bucket is None and num_models == 1:
        raise ValueError("unlearned_scores has 1 model; the points rule needs at least 2.")
    eps = challenge_epsilons(
        unlearned_scores,
        retrained_scores,
        delta=delta,
        cap=cap,
        both_directions=both_directions,
    )
    if max_bucket is None:
        points = challenge_points(eps, num_models=num_models, bin_width=bin_width)
        last = _last_bucket(num_models, bin_width)
    else:
        points = challenge_points(eps, bin_width=bin_width, max_bucket=max_bucket)
        last = max_bucket
    quality = float(np.mean(points))
    return {
        "challenge/score": quality * (ra_u / ra_r) * (ta_u / ta_r),
        "challenge/forget_quality": quality,
        "challenge/ra_ratio": ra_u / ra_r,
        "challenge/ta_ratio": ta_u / ta_r,
        "challenge/epsilon_mean": float(np.mean(eps)),
        "challenge/epsilon_max": float(np.max(eps)),
        "challenge/last_bucket": float(last),
    }
