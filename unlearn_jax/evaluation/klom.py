"""KLoM: KL divergence of margins between many unlearned models and many retrained oracles.

For one evaluation example, an unlearning algorithm run with different seeds (or on different models
of a stack) gives a DISTRIBUTION of margins; so does retraining without the forget set. KLoM compares
the two distributions by histogramming them on a shared grid and taking a KL divergence: 0 means the
unlearned models are indistinguishable from retraining on that example.

Direction, named because the published numbers use both:
  * ``direction="unlearned||oracle"`` (default):
    ``KLoM_n = KL(P_u || P_o) = sum_b P_u[b] log(P_u[b] / P_o[b])``, the expectation under the
    UNLEARNED models: unlearned mass where oracles never go is penalised heavily (up to
    ``log(1 / floor)``), oracle mass the unlearned models miss only lightly. The datamodel-matching
    paper's code (Georgiev et al.) computes this, and so does ``kl_from_margins`` of the KLoM
    benchmark (RoyRin/data-unlearning-bench, ``unlearning_bench/eval.py``) as defined.
  * ``direction="oracle||unlearned"``: ``KL(P_o || P_u)``, the expectation under the ORACLES:
    unlearned margins narrower than the oracles' (a method that is too sure) are penalised heavily.
    The benchmark's pipeline (``unlearning_bench/run.py``, ``load_klom``) calls
    ``kl_from_margins(oracle_margins, unlearned_margins)``, so the KLoM numbers it publishes are in
    this direction.
  The two can differ several-fold when the spreads differ: on 200 models per side with unlearned
  margins 0.5 (0.3) times as spread as the oracles', the mean KLoM is 0.37 (0.77) one way and 1.26
  (2.93) the other. Swapping the direction is the same as swapping the two arguments (the grid is
  pooled, so it does not change). :func:`klom_summary` puts the direction in its keys.

Other pinned choices:
  * Margins: ``m = z_y - logsumexp_{k != y} z_k`` (:func:`unlearn_jax.evaluation.mia.logit_margins`),
    clipped to ``[-clip, clip]`` (100 by default).
  * Bins: ``num_bins`` (20) equal-width bins spanning ``[min, max]`` of the POOLED margins of that
    example (unlearned and oracle together); the right edge belongs to the last bin, so every margin
    is counted. Both reference codes bin with ``np.digitize`` on ``num_bins + 1`` edges and keep bins
    1 to ``num_bins``, which DROPS the samples equal to the pooled maximum from their side's
    histogram (and renormalises over the rest); we keep them. On 200 models per side this changes
    single values by up to about 0.1. If every margin of an example is equal, both histograms are a
    single spike and KLoM is 0 (as there).
  * Floor: bin probabilities of BOTH histograms are raised to at least ``floor`` (1e-5) and then
    renormalised to sum to 1, so both arguments of the KL are proper distributions and KLoM >= 0
    (Gibbs). The reference codes floor only the second distribution, only where the first has mass,
    and renormalise it; the two floors differ by at most about ``num_bins * floor * log(1 / floor)``
    (0.002) per example.

References:
  Georgiev et al., "Attribute-to-delete: machine unlearning via datamodel matching", ICLR 2025.
  The KLoM benchmark, GitHub repository RoyRin/data-unlearning-bench.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unlearn_jax import _validate
from unlearn_jax.evaluation import _arrays
from unlearn_jax.evaluation.mia import logit_margins

DEFAULT_PERCENTILES = (50, 95, 99)
UNLEARNED_ORACLE = "unlearned||oracle"
ORACLE_UNLEARNED = "oracle||unlearned"
DIRECTIONS = (UNLEARNED_ORACLE, ORACLE_UNLEARNED)


def _histograms(
    values: np.ndarray, low: np.ndarray, width: np.ndarray, num_bins: int
) -> np.ndarray:
    """Per-example bin probabilities ``[N, num_bins]`` of ``values [M, N]`` on the given grid."""
    num_models, n = values.shape
    safe_width = np.where(width > 0, width, 1.0)
    index = np.floor((values - low) / safe_width).astype(np.int64)
    index = np.where(width > 0, np.clip(index, 0, num_bins - 1), 0)
    flat = index + num_bins * np.arange(n)[None, :]
    counts = np.bincount(flat.reshape(-1), minlength=n * num_bins).reshape(n, num_bins)
    return counts / num_models


def _floored(p: np.ndarray, floor: float) -> np.ndarray:
    p = np.maximum(p, floor)
    return p / p.sum(axis=-1, keepdims=True)


def klom_from_margins(
    unlearned_margins: Any,
    oracle_margins: Any,
    *,
    num_bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
    direction: str = UNLEARNED_ORACLE,
) -> np.ndarray:
    """KLoM per example from margins: a KL divergence between two histograms on a shared grid.

    With ``P_u[n, b]`` and ``P_o[n, b]`` the floored bin probabilities ``[N, num_bins]`` of the
    unlearned and oracle margins of example ``n`` (module docstring):
    ``"unlearned||oracle"``: ``KLoM_n = sum_b P_u[n, b] log(P_u[n, b] / P_o[n, b])``;
    ``"oracle||unlearned"``: ``KLoM_n = sum_b P_o[n, b] log(P_o[n, b] / P_u[n, b])``.

    Args:
      unlearned_margins: ``[M, N]`` margins of ``N`` examples under ``M`` unlearned models.
      oracle_margins: ``[M', N]`` margins under ``M'`` retrained (oracle) models.
      num_bins: equal-width bins over each example's pooled ``[min, max]`` (default 20).
      clip: margins are clipped to ``[-clip, clip]`` first (default 100).
      floor: minimum bin probability before renormalisation (default 1e-5).
      direction: ``"unlearned||oracle"`` (default; the datamodel-matching paper's) or
        ``"oracle||unlearned"`` (the KLoM benchmark's published numbers).

    Returns:
      ``[N]`` float64 KLoM values (nats), each in ``[0, log(1 / floor')]`` where ``floor'`` is the
      renormalised floor.

    Raises:
      ValueError: on empty or non-finite margins, a different number of examples, or an unknown
        direction.

    Examples:
      >>> import numpy as np
      >>> u = np.zeros((4, 1)); o = np.array([[0.0], [0.0], [10.0], [10.0]])
      >>> round(float(klom_from_margins(u, o)[0]), 4)   # about log 2
      0.6929
    """
    _validate.one_of("direction", direction, DIRECTIONS)
    _validate.positive_int(num_bins=num_bins)
    _validate.positive(clip=clip)
    _validate.in_interval("floor", floor, 0.0, 1.0 / num_bins, closed="neither")
    u = _arrays.float_array(unlearned_margins, "unlearned_margins", ndim=2)
    o = _arrays.float_array(oracle_margins, "oracle_margins", ndim=2)
    if u.shape[1] != o.shape[1]:
        raise ValueError(
            f"unlearned_margins {u.shape} and oracle_margins {o.shape} must share the example axis "
            "(shapes are [models, examples])."
        )
    u = np.clip(u, -clip, clip)
    o = np.clip(o, -clip, clip)
    low = np.minimum(u.min(axis=0), o.min(axis=0))
    high = np.maximum(u.max(axis=0), o.max(axis=0))
    width = (high - low) / num_bins
    p_u = _floored(_histograms(u, low, width, num_bins), floor)
    p_o = _floored(_histograms(o, low, width, num_bins), floor)
    p, q = (p_u, p_o) if direction == UNLEARNED_ORACLE else (p_o, p_u)
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def klom(
    unlearned_logits: Any,
    oracle_logits: Any,
    labels: Any,
    *,
    num_bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
    direction: str = UNLEARNED_ORACLE,
) -> np.ndarray:
    """KLoM per example from logits of many unlearned and many oracle models.

    Args:
      unlearned_logits: ``[M, N, C]`` logits of ``N`` evaluation examples under ``M`` unlearned
        models (e.g. the unlearning method run from ``M`` seeds or ``M`` trained models).
      oracle_logits: ``[M', N, C]`` logits under ``M'`` models retrained without the forget set.
      labels: ``[N]`` integer labels.
      num_bins, clip, floor, direction: see :func:`klom_from_margins`.

    Returns:
      ``[N]`` float64, ``KL(P_unlearned || P_oracle)`` (default) or ``KL(P_oracle || P_unlearned)``
      of each example's margin distribution; pass the same ``direction`` to :func:`klom_summary`.

    Raises:
      ValueError: on shape mismatches (models may differ in number, examples and classes may not),
        non-finite logits, bad labels, or an unknown direction.
    """
    u = np.asarray(unlearned_logits)
    o = np.asarray(oracle_logits)
    if u.ndim != 3 or o.ndim != 3:
        raise ValueError(
            "unlearned_logits and oracle_logits must be [models, examples, classes]; got shapes "
            f"{u.shape} and {o.shape}."
        )
    if u.shape[1:] != o.shape[1:]:
        raise ValueError(
            f"unlearned_logits {u.shape} and oracle_logits {o.shape} must agree on examples and "
            "classes (only the number of models may differ)."
        )
    return klom_from_margins(
        logit_margins(u, labels),
        logit_margins(o, labels),
        num_bins=num_bins,
        clip=clip,
        floor=floor,
        direction=direction,
    )


def _percentile_key(q: float) -> str:
    return f"p{q:g}"


def klom_summary(
    values: Any,
    groups: Mapping[str, Any],
    *,
    direction: str = UNLEARNED_ORACLE,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    prefix: str = "klom",
) -> dict[str, float]:
    """Mean and percentiles of per-example KLoM values within each group, keyed by direction.

    Args:
      values: ``[N]`` KLoM values (from :func:`klom` or :func:`klom_from_margins`).
      groups: name -> which examples belong to it, as a bool mask ``[N]`` or integer indices, e.g.
        ``{"forget": forget_mask, "retain": retain_mask, "test": test_mask}``.
      direction: the ``direction`` the values were computed with (:func:`klom_from_margins`);
        recorded in every key.
      percentiles: in ``[0, 100]``; numpy's default (linear interpolation) percentile rule.
      prefix: the first key component.

    Returns:
      ``{"<prefix>/<direction>/<group>/mean", ".../p50", ".../p95", ".../p99"}`` for each group (keys
      follow ``percentiles``), e.g. ``"klom/unlearned||oracle/forget/p95"``.

    Raises:
      ValueError: on non-finite values, an empty group, masks of the wrong length, indices out of
        range, or an unknown direction.

    Examples:
      >>> klom_summary([0.5, 1.5], {"forget": [0, 1]}, percentiles=(95,))
      {'klom/unlearned||oracle/forget/mean': 1.0, 'klom/unlearned||oracle/forget/p95': 1.45}
    """
    _validate.one_of("direction", direction, DIRECTIONS)
    v = _arrays.float_array(values, "values", ndim=1)
    if not groups:
        raise ValueError("groups is empty; pass e.g. {'forget': mask_or_indices, ...}.")
    for q in percentiles:
        _validate.in_interval("percentile", q, 0.0, 100.0, closed="both")
    out = {}
    for name, selector in groups.items():
        sel = np.asarray(selector)
        if sel.dtype == np.bool_:
            if sel.shape != v.shape:
                raise ValueError(
                    f"group {name!r} mask has shape {sel.shape} but values have shape {v.shape}."
                )
            chosen = v[sel]
        else:
            if sel.size and not np.issubdtype(sel.dtype, np.integer):
                raise ValueError(
                    f"group {name!r} must be a bool mask or integer indices, got dtype {sel.dtype}."
                )
            sel = sel.astype(np.int64).reshape(-1)
            bad = (sel < 0) | (sel >= v.size)
            if bad.any():
                raise ValueError(
                    f"group {name!r} has indices out of range [0, {v.size}): "
                    f"{_arrays.describe(sel[bad])}."
                )
            chosen = v[sel]
        if chosen.size == 0:
            raise ValueError(f"group {name!r} selects no examples.")
        key = f"{prefix}/{direction}/{name}"
        out[f"{key}/mean"] = float(np.mean(chosen))
        for q in percentiles:
            out[f"{key}/{_percentile_key(q)}"] = float(np.percentile(chosen, q))
    return out
