"""Accuracy-type metrics of a model on the forget / retain / test sets, the gap to retraining, speed-up.

Units, pinned:
  * ``forget/acc``, ``retain/acc``, ``test/acc`` are FRACTIONS in ``[0, 1]``;
  * the table-facing ``UA`` (= 1 - forget accuracy), ``RA``, ``TA`` and ``MIA-Efficacy`` are
    PERCENTAGES in ``[0, 100]``, as printed in the SalUn / l1-sparse tables, so that their gaps to
    retraining and the ``avg_gap`` are in percentage points like the papers' "Avg. Gap".
  * ``*/loss`` is the task's mean per-example loss (softmax cross-entropy, or half squared error for
    regression); ``*/mse`` (regression) is the mean over examples and outputs of ``(f(x) - y)^2``.

Datasets are anything that yields a batch dict ``{"x", "y", ...}``: an object with ``.as_batch()``
(:class:`unlearn_jax.data.Dataset`), a mapping with ``"x"`` and ``"y"``, or an object with ``x`` and
``y`` attributes. They are evaluated in chunks of ``batch_size`` with one jitted function per task;
the last chunk is padded (with copies of the last example, dropped afterwards) so every chunk has the
same shape and nothing is traced twice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.data.batching import map_batches
from unlearn_jax.evaluation import mia

TABLE_KEYS = ("UA", "RA", "TA", "MIA-Efficacy")
_GROUPS = ("forget", "retain", "test")


# ---------------------------------------------------------------------------------------------------
# Chunked evaluation
# ---------------------------------------------------------------------------------------------------
def _as_batch(data: Any, name: str) -> dict[str, np.ndarray]:
    """The whole dataset as one host batch dict ``{"x", "y"}``."""
    if hasattr(data, "as_batch"):
        batch = data.as_batch()
    elif isinstance(data, Mapping):
        batch = data
    elif hasattr(data, "x") and hasattr(data, "y"):
        batch = {"x": data.x, "y": data.y}
    else:
        raise TypeError(
            f"{name} must be a Dataset (with .as_batch()), a dict with 'x' and 'y', or an object with "
            f"x and y attributes; got {type(data).__name__}."
        )
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"{name} must provide a batch with keys 'x' and 'y', got {keys}.")
    # Only x and y: Task.apply sees x and the loss y; extra keys (ids) would only change the pytree
    # structure between datasets and cost a re-trace.
    batch = {"x": np.asarray(batch["x"]), "y": np.asarray(batch["y"])}
    _validate.batch_size(batch, name)
    return batch


def _stats_fn(task: Any) -> Callable:
    """One jitted ``(params, batch) -> per-example stats`` per task (cached, so no re-tracing)."""
    try:
        return _cached_stats_fn(task)
    except TypeError:  # an unhashable task object: jit without the cache
        return _make_stats_fn(task)


@functools.lru_cache(maxsize=64)
def _cached_stats_fn(task: Any) -> Callable:
    return _make_stats_fn(task)


def _make_stats_fn(task: Any) -> Callable:
    classification = task.kind == "classification"

    def stats(params, batch):
        outputs = task.batch_outputs(params, batch)
        out = {"outputs": outputs, "losses": task.output_losses(outputs, batch["y"])}
        if classification:
            out["correct"] = (jnp.argmax(outputs, axis=-1) == batch["y"]).astype(jnp.float32)
        else:
            err = outputs - batch["y"].reshape(outputs.shape)
            out["sq_error"] = jnp.mean(jnp.square(err).reshape(outputs.shape[0], -1), axis=-1)
        return out

    return jax.jit(stats)


def _per_example(task: Any, params: Any, data: Any, name: str, batch_size: int) -> dict:
    """Per-example outputs, losses and correctness / squared error of a dataset, as numpy.

    A dataset (in memory or streamed) is read one padded batch at a time
    (:func:`unlearn_jax.data.map_batches`); a dict or ``x``/``y`` object is cut into chunks the same
    way."""
    if not (hasattr(data, "ids") and hasattr(data, "x")):
        data = _as_batch(data, name)
        n = _validate.batch_size(data, name)
    else:
        n = len(data)
    fn = _stats_fn(task)
    result = map_batches(
        lambda b: {**fn(params, {"x": b["x"], "y": b["y"]}), "targets": b["y"]}, data,
        min(batch_size, n),
    )  # fmt: skip
    for key in ("outputs", "losses"):
        if not np.all(np.isfinite(result[key])):
            raise ValueError(
                f"the model's {key} on {name} contain NaN or infinite values "
                f"({int(np.sum(~np.isfinite(result[key])))} entries); check the parameters."
            )
    return result


def compute_outputs(
    task: Any, params: Any, data: Any, *, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs on a whole dataset, evaluated in jitted chunks.

    Args:
      task: a :class:`unlearn_jax.Task`.
      params: the model parameters.
      data: a dataset (see the module docstring).
      batch_size: examples per chunk.

    Returns:
      ``(outputs [N, K], targets)`` as numpy arrays (logits and integer labels for a classifier),
      ready for :mod:`unlearn_jax.evaluation.mia`.
    """
    _validate.positive_int(batch_size=batch_size)
    stats = _per_example(task, params, data, "data", batch_size)
    return stats["outputs"], stats["targets"]


def _named_groups(forget: Any, retain: Any, test: Any) -> dict[str, Any]:
    groups = {"forget": forget, "retain": retain, "test": test}
    groups = {k: v for k, v in groups.items() if v is not None}
    if not groups:
        raise ValueError("pass at least one of forget, retain, test (all were None).")
    return groups


def _group_metrics(kind: str, group: str, stats: Mapping[str, np.ndarray]) -> dict[str, float]:
    out = {f"{group}/loss": float(np.mean(stats["losses"], dtype=np.float64))}
    if kind == "classification":
        acc = float(np.mean(stats["correct"], dtype=np.float64))
        out[f"{group}/acc"] = acc
        table = {"forget": ("UA", 1.0 - acc), "retain": ("RA", acc), "test": ("TA", acc)}[group]
        out[table[0]] = 100.0 * table[1]
    else:
        out[f"{group}/mse"] = float(np.mean(stats["sq_error"], dtype=np.float64))
    return out


def accuracy_metrics(
    task: Any,
    params: Any,
    *,
    forget: Any,
    retain: Any,
    test: Any,
    batch_size: int = 512,
) -> dict[str, float]:
    """Accuracies and losses of one model on the forget, retain and test sets.

    Classification::

      forget/acc, retain/acc, test/acc      fractions: mean of 1[argmax f(x) == y]
      UA = 100 (1 - forget/acc),  RA = 100 retain/acc,  TA = 100 test/acc      percentages
      forget/loss, retain/loss, test/loss   mean softmax cross-entropy

    Regression: ``<group>/mse`` (mean squared error over examples and outputs) and ``<group>/loss``
    (the task's mean loss, half the summed squared error); no UA/RA/TA.

    Args:
      task: a :class:`unlearn_jax.Task` (its ``kind`` picks the metrics).
      params: the model parameters.
      forget, retain, test: datasets (see the module docstring); ``None`` skips that group.
      batch_size: examples per jitted chunk.

    Returns:
      A flat ``dict[str, float]``.

    Raises:
      ValueError: on an empty dataset, a dataset without ``x``/``y``, a bad ``batch_size``, or
        non-finite model outputs.
    """
    _validate.positive_int(batch_size=batch_size)
    out: dict[str, float] = {}
    for group, data in _named_groups(forget, retain, test).items():
        stats = _per_example(task, params, data, group, batch_size)
        out.update(_group_metrics(task.kind, group, stats))
    return out


def evaluate_unlearning(
    task: Any,
    params: Any,
    *,
    forget: Any,
    retain: Any,
    test: Any,
    batch_size: int = 512,
    mia_features: Sequence[str] = mia.FEATURES,
    key: int | jax.Array = 0,
) -> dict[str, float]:
    """One row of an unlearning table: :func:`accuracy_metrics` plus MIA-Efficacy, in one pass.

    For a classification task the model's logits on the three sets feed
    :func:`unlearn_jax.evaluation.mia.mia_efficacy` (an attack trained on retain vs test, applied to
    forget). For regression only the accuracy-type metrics are returned.

    Args:
      task, params, forget, retain, test, batch_size: as in :func:`accuracy_metrics`; all three
        datasets are required.
      mia_features: features of the learned attack.
      key: int seed or JAX PRNG key for the attack's subsampling.

    Returns:
      Flat dict with ``UA``, ``RA``, ``TA``, ``MIA-Efficacy`` (percentages), ``*/acc``, ``*/loss``
      and ``mia/learned/*``.
    """
    _validate.positive_int(batch_size=batch_size)
    for name, data in (("forget", forget), ("retain", retain), ("test", test)):
        if data is None:
            raise ValueError(f"evaluate_unlearning needs the {name} set, got None.")
    out: dict[str, float] = {}
    stats = {}
    for group, data in (("forget", forget), ("retain", retain), ("test", test)):
        stats[group] = _per_example(task, params, data, group, batch_size)
        out.update(_group_metrics(task.kind, group, stats[group]))
    if task.kind == "classification":
        out.update(
            mia.mia_efficacy(
                stats["forget"]["outputs"],
                stats["forget"]["targets"],
                retain_logits=stats["retain"]["outputs"],
                retain_labels=stats["retain"]["targets"],
                test_logits=stats["test"]["outputs"],
                test_labels=stats["test"]["targets"],
                features=mia_features,
                key=key,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------
def _metric_value(metrics: Mapping[str, Any], key: str, which: str) -> float:
    if key not in metrics:
        raise KeyError(
            f"{which} has no key {key!r}; it has {sorted(metrics)}. Pass keys= to choose others."
        )
    value = float(metrics[key])
    if not math.isfinite(value):
        raise ValueError(f"{which}[{key!r}] is {value}; gaps need finite metrics.")
    return value


def gap_to_retrain(
    method_metrics: Mapping[str, Any],
    retrain_metrics: Mapping[str, Any],
    keys: Sequence[str] = TABLE_KEYS,
) -> dict[str, float]:
    """Absolute gaps to the retrained model and their mean (the papers' "Avg. Gap")::

      gap/<k> = |method[k] - retrain[k]|,     avg_gap = mean_k gap/<k>

    With the default keys the values are percentages, so the gaps are percentage points.

    Args:
      method_metrics: the method's metrics (e.g. from :func:`evaluate_unlearning`).
      retrain_metrics: the retrained model's metrics, same keys.
      keys: which metrics to compare (default ``("UA", "RA", "TA", "MIA-Efficacy")``).

    Returns:
      ``{"gap/UA": ..., "gap/RA": ..., "gap/TA": ..., "gap/MIA-Efficacy": ..., "avg_gap": ...}``.

    Raises:
      KeyError: a key is missing from either dict (the message lists the keys present).
      ValueError: ``keys`` is empty, or a value is NaN or infinite.

    Examples:
      >>> gap_to_retrain({"UA": 3.0, "RA": 99.0}, {"UA": 5.0, "RA": 100.0}, keys=("UA", "RA"))
      {'gap/UA': 2.0, 'gap/RA': 1.0, 'avg_gap': 1.5}
    """
    if isinstance(keys, str) or len(keys) == 0:
        raise ValueError(f"keys must be a non-empty sequence of metric names, got {keys!r}.")
    out = {}
    for key in keys:
        method = _metric_value(method_metrics, key, "method_metrics")
        retrain = _metric_value(retrain_metrics, key, "retrain_metrics")
        out[f"gap/{key}"] = abs(method - retrain)
    out["avg_gap"] = float(np.mean([out[f"gap/{k}"] for k in keys]))
    return out


def speedup(method_time: float, retrain_time: float) -> float:
    """How many times faster than retraining: ``retrain_time / method_time``.

    Raises:
      ValueError: unless both times are finite and > 0.

    Examples:
      >>> round(speedup(2.7, 43.0), 2)
      15.93
    """
    _validate.positive(method_time=method_time, retrain_time=retrain_time)
    return float(retrain_time) / float(method_time)
