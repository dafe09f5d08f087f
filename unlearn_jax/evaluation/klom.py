"""KLoM: KL divergence of margins between many unlearned models and many retrained oracles.

For one evaluation example, an unlearning algorithm run with different seeds (or on different models
of a stack) gives a DISTRIBUTION of margins; so does retraining without the forget set. KLoM compares
the two distributions by histogramming them on a shared grid and taking a KL divergence: 0 means the
unlearned models are indistinguishable from retraining on that example.

Pinned choices (the authors' two code paths disagree on the direction):
  * Direction: ``KLoM_n = KL(P_unlearned || P_oracle) = sum_b P_u[b] log(P_u[b] / P_o[b])``: the
    expectation is under the UNLEARNED models' distribution, so unlearned mass where oracles never go
    is penalised heavily (up to ``log(1 / floor)``), while oracle mass the unlearned models miss is
    penalised less.
  * Margins: ``m = z_y - logsumexp_{k != y} z_k`` (:func:`unlearn_jax.evaluation.mia.logit_margins`),
    clipped to ``[-clip, clip]`` (100 by default).
  * Bins: ``num_bins`` (20) equal-width bins spanning ``[min, max]`` of the POOLED margins of that
    example (unlearned and oracle together); the right edge belongs to the last bin. If every margin
    of an example is equal, both histograms are a single spike and KLoM is 0.
  * Floor: bin probabilities are raised to at least ``floor`` (1e-5) and then RENORMALISED to sum to
    1, so both arguments of the KL are proper distributions and KLoM >= 0 (Gibbs); without the
    renormalisation small negative values could appear.

Reference:
  Georgiev et al., "Attribute-to-delete: machine unlearning via datamodel matching", ICLR 2025.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unlearn_jax import _validate
from unlearn_jax.evaluation import _arrays
from unlearn_jax.evaluation.mia import logit_margins

DEFAULT_PERCENTILES = (50, 95, 99)


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
) -> np.ndarray:
    """KLoM per example from margins: ``KL(P_unlearned || P_oracle)`` on a shared histogram.

    Args:
      unlearned_margins: ``[M, N]`` margins of ``N`` examples under ``M`` unlearned models.
      oracle_margins: ``[M', N]`` margins under ``M'`` retrained (oracle) models.
      num_bins: equal-width bins over each example's pooled ``[min, max]`` (default 20).
      clip: margins are clipped to ``[-clip, clip]`` first (default 100).
      floor: minimum bin probability before renormalisation (default 1e-5).

    Returns:
      ``[N]`` float64 KLoM values (nats), each in ``[0, log(1 / floor')]`` where ``floor'`` is the
      renormalised floor.

    Raises:
      ValueError: on empty or non-finite margins, or a different number of examples.

    Examples:
      >>> import numpy as np
      >>> u = np.zeros((4, 1)); o = np.array([[0.0], [0.0], [10.0], [10.0]])
      >>> round(float(klom_from_margins(u, o)[0]), 4)   # about log 2
      0.6929
    """
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
    return np.sum(p_u * (np.log(p_u) - np.log(p_o)), axis=-1)


def klom(
    unlearned_logits: Any,
    oracle_logits: Any,
    labels: Any,
    *,
    num_bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
) -> np.ndarray:
    """KLoM per example from logits of many unlearned and many oracle models.

    Args:
      unlearned_logits: ``[M, N, C]`` logits of ``N`` evaluation examples under ``M`` unlearned
        models (e.g. the unlearning method run from ``M`` seeds or ``M`` trained models).
      oracle_logits: ``[M', N, C]`` logits under ``M'`` models retrained without the forget set.
      labels: ``[N]`` integer labels.
      num_bins, clip, floor: see :func:`klom_from_margins`.

    Returns:
      ``[N]`` float64, ``KL(P_unlearned || P_oracle)`` of each example's margin distribution.

    Raises:
      ValueError: on shape mismatches (models may differ in number, examples and classes may not),
        non-finite logits, or bad labels.
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
    )


def _percentile_key(q: float) -> str:
    return f"p{q:g}"


def klom_summary(
    values: Any,
    groups: Mapping[str, Any],
    *,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    prefix: str = "klom",
) -> dict[str, float]:
    """Mean and percentiles of per-example KLoM values within each group.

    Args:
      values: ``[N]`` KLoM values (from :func:`klom`).
      groups: name -> which examples belong to it, as a bool mask ``[N]`` or integer indices, e.g.
        ``{"forget": forget_mask, "retain": retain_mask, "test": test_mask}``.
      percentiles: in ``[0, 100]``; numpy's default (linear interpolation) percentile rule.
      prefix: the first key component.

    Returns:
      ``{"klom/<group>/mean", "klom/<group>/p50", "klom/<group>/p95", "klom/<group>/p99"}`` for each
      group (keys follow ``percentiles``).

    Raises:
      ValueError: on non-finite values, an empty group, masks of the wrong length or indices out of
        range.
    """
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
        out[f"{prefix}/{name}/mean"] = float(np.mean(chosen))
        for q in percentiles:
            out[f"{prefix}/{name}/{_percentile_key(q)}"] = float(np.percentile(chosen, q))
    return out
