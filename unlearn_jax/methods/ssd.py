r"""Selective Synaptic Dampening (SSD) and its label-free variant (LFSSD).

SSD compares how important each parameter is to the forget set with how important it is to the
whole training set, and shrinks the parameters that matter disproportionately to the forget set:

.. math::
    \theta_j \leftarrow \beta_j \theta_j, \qquad
    \beta_j = \begin{cases}
        \min\!\left(\lambda \dfrac{[I_D]_j}{[I_f]_j},\ 1\right) & \text{if } [I_f]_j > \alpha [I_D]_j, \\
        1 & \text{otherwise,}
    \end{cases}

with :math:`I_D` the importance on the training set :math:`D` (retain + forget), :math:`I_f` on the
forget set, :math:`\alpha` the selection weighting and :math:`\lambda` the dampening constant.

Importance estimators (``importance=``), both streaming reductions
(:mod:`unlearn_jax.core.reductions`):

* ``"fisher"`` (default): the per-example empirical diagonal Fisher
  :math:`I = \frac1N \sum_i g_i \odot g_i`, the quantity the paper defines. It does not depend on
  the batch size or order, and the training-set importance of the union of two sets is the
  count-weighted mean of theirs, :math:`I_D = (n_r I_r + n_f I_f) / n`, so the forget set is
  streamed once.
* ``"batch_mean"``: the reference code's estimator, the squared gradient of each mini-batch's MEAN
  loss averaged over the batches, :math:`\frac1M \sum_m (\bar g_m)^2` (a partial last batch counts as
  one batch). It depends on the batch size AND on which examples share a batch, so reproducing
  published numbers means reproducing the reference scripts' loaders: ``protocol=`` names one
  (:data:`PROTOCOLS`, from the authors' scripts, repository if-loops/selective-synaptic-dampening at
  commit cdfdc0e):

  - ``"full_class"`` (``forget_full_class_main.py``): batch 64 for the forget pass and the
    training-set pass; the retain set is built class by class (stably grouped by label), and the
    training-set pass runs over the retain set THEN the forget set, unshuffled, so its batches are
    mostly of one class;
  - ``"sub_class"`` (``forget_subclass_main.py``): the same loaders (batch 64 and 64, grouped by the
    label the loss reads);
  - ``"random"`` (``forget_random_main.py``): batch 128 for both passes, the retain set then the
    forget set, each in its own (data) order.

  On digits class 3 at alpha 10, the class-grouped order selects 27 parameters and the data set's own
  order 302: the order is part of the estimator.

Label-free SSD (``label_free=True``, :func:`lfssd`) replaces the loss by the squared norm of the
outputs, :math:`\ell(x) = \lVert f(x) \rVert_2^2`, and the squared gradients by absolute values
(:math:`\frac1N \sum_i |g_i|`, or :math:`\frac1M \sum_m |\bar g_m|` with ``"batch_mean"``), so no
labels are needed at all.

Choosing alpha. With the per-example estimator the training-set importance contains the forget set,
:math:`I_D = (n_r I_r + n_f I_f)/n \ge (n_f/n) I_f`, so :math:`[I_f]_j > \alpha [I_D]_j` is
impossible once :math:`\alpha \ge n / n_f`: the paper's :math:`\alpha = 10` selects nothing when one
class of ten is forgotten (:func:`ssd` warns). With the batch-mean estimator the same argument holds
with batch counts in place of example counts (the forget batches of the training-set pass are, but
for the one that straddles the retain/forget boundary, the batches of the forget pass), so alpha must
stay below roughly :math:`M / M_f`. With the per-example Fisher, :math:`\alpha = 5, \lambda = 0.1`
forgets a digits class (tests and ``experiments/digits_curvature_methods.py``).

Edge cases, by construction of the strict inequality:

* a parameter with zero forget importance (:math:`[I_f]_j = 0`) is never selected, so it never
  changes, whatever :math:`I_D`; all-zero forget importances leave the model unchanged;
* a selected parameter has :math:`[I_f]_j > \alpha [I_D]_j \ge 0`, so the division is always by a
  positive number; a parameter with :math:`[I_D]_j = 0 < [I_f]_j` gets :math:`\beta_j = 0` (it is
  used only by the forget set, and is zeroed);
* NaN or infinite importances raise a ``ValueError`` naming the leaf (a silent NaN would compare
  False and hide the problem); negative importances raise too.

The training-set importances can be computed once, with :func:`full_data_importances` (for
``"fisher"`` at training time, from the training set alone; for ``"batch_mean"`` from the split,
since the protocol's order puts the forget set last), stored next to the checkpoint
(:func:`save_importances`, :func:`load_importances`), and passed as ``ssd(full_importances=...)``:
every later deletion request then costs one pass over its forget set only, and compiles nothing
new (the passes and the dampening are cached compiled programs).

References:
  Foster, Schoepf, Brintrup. "Fast Machine Unlearning Without Retraining Through Selective Synaptic
  Dampening", AAAI 2024. Foster, Schoepf, Brintrup. "Loss-Free Machine Unlearning" (LFSSD), ICLR
  2024 Tiny Papers.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.core import reductions
from unlearn_jax.core.reductions import Reduced
from unlearn_jax.core.task import Task
from unlearn_jax.methods.driver import statistic_data
from unlearn_jax.methods.protocol import (
    FORGET,
    RETAIN,
    TRAIN,
    Checks,
    Feeds,
    Statistic,
    Unlearner,
)

Params = Any
ESTIMATORS = ("fisher", "batch_mean")


class Protocol(NamedTuple):
    """The loaders of one of SSD's reference scripts (module docstring).

    Attributes:
      forget_batch_size: batch size of the forget pass.
      full_batch_size: batch size of the training-set pass (retain, then forget).
      order: ``"by_class"`` (each set stably grouped by label) or ``"data"`` (each set in its order).
    """

    forget_batch_size: int
    full_batch_size: int
    order: str


PROTOCOLS = {
    "full_class": Protocol(64, 64, "by_class"),
    "sub_class": Protocol(64, 64, "by_class"),
    "random": Protocol(128, 128, "data"),
}
# Streaming batch size of the per-example estimator (its value does not depend on it).
FISHER_BATCH_SIZE = 128


class Importances(NamedTuple):
    """Per-parameter importances and how they were computed.

    Attributes:
      values: a pytree like the params, every entry ``>= 0``.
      estimator: ``"fisher"`` or ``"batch_mean"``.
      label_free: True for LFSSD's ``|grad ||f(x)||^2|`` importances.
      batch_size: the batch size of the pass (part of the definition of ``"batch_mean"``; only the
        streaming size for ``"fisher"``).
      num_examples: the number of examples averaged over.
      protocol: the reference protocol of a ``"batch_mean"`` pass (``None`` for ``"fisher"``).
    """

    values: Params
    estimator: str
    label_free: bool
    batch_size: int
    num_examples: int
    protocol: str | None = None

    def metadata(self) -> dict:
        """JSON-serialisable description (everything but the arrays), e.g. for checkpoint metadata."""
        return {
            "estimator": self.estimator,
            "label_free": self.label_free,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
            "protocol": self.protocol,
        }


# ---- importance estimation ------------------------------------------------------------------------
@functools.cache
def _label_free_loss(task: Task):
    def loss(params, example):
        return jnp.sum(jnp.square(task.outputs(params, example)))

    return loss


def _reduction(task: Task, estimator: str, label_free: bool, chunk_size: int | None):
    loss = _label_free_loss(task) if label_free else task.loss
    if estimator == "fisher":
        if label_free:
            return reductions.abs_gradient_mean(loss, chunk_size)
        return reductions.squared_gradient_mean(loss, chunk_size)
    if label_free:
        return reductions.batch_mean_abs_gradient(loss)
    return reductions.batch_mean_squared_gradient(loss)


def _reduction_factory(estimator: str, label_free: bool, chunk_size: int | None):
    """``task -> Reduction`` for a :class:`~unlearn_jax.methods.protocol.Statistic` (cached, so that
    equal SSD configurations share compiled passes)."""
    return functools.partial(_cached_reduction, estimator=estimator, label_free=label_free,
                             chunk_size=chunk_size)  # fmt: skip


@functools.cache
def _cached_reduction(task, *, estimator, label_free, chunk_size):
    return _reduction(task, estimator, label_free, chunk_size)


def _batches(data: Any, batch_size: int, name: str):
    """Batches of ``batch_size`` in data order, from a Dataset, a batch dict or a list of batches."""
    from unlearn_jax.data.batching import batches as dataset_batches

    if hasattr(data, "ids") and hasattr(data, "x"):
        if len(data) == 0:
            raise ValueError(f"{name} is empty; importances need at least one example.")
        return dataset_batches(data, min(batch_size, len(data)))
    if isinstance(data, dict):
        size = _validate.batch_size(data, name)
        full = {k: v for k, v in data.items() if k != "id"}
        return [
            jax.tree_util.tree_map(lambda a, s=s: a[s : s + batch_size], full)
            for s in range(0, size, batch_size)
        ]
    batches = list(data)
    if not batches:
        raise ValueError(f"{name} holds no batches.")
    return batches


def importances(
    task: Task,
    params: Params,
    data: Any,
    *,
    estimator: str = "fisher",
    label_free: bool = False,
    batch_size: int = FISHER_BATCH_SIZE,
    chunk_size: int | None = None,
    protocol: str | None = None,
) -> Importances:
    r"""Per-parameter importances of ``data`` for SSD (see the module docstring for the formulas).

    Args:
      task: how to read the model's loss and outputs.
      params: the model parameters.
      data: an :class:`unlearn_jax.data.Dataset`, a batch dict ``{"x", "y", ...}``, or an iterable of
        such batches (passed as they are: their sizes and order define ``"batch_mean"``).
      estimator: ``"fisher"`` (per-example, :math:`\frac1N\sum_i g_i^2`) or ``"batch_mean"``
        (:math:`\frac1M\sum_m \bar g_m^2`, depends on the batches).
      label_free: LFSSD importances, ``|grad ||f(x)||^2|`` instead of squared loss gradients.
      batch_size: examples per batch of the pass (a Dataset or dict is cut into batches of this
        size, in data order).
      chunk_size: per-example gradients computed this many at a time (memory bound).
      protocol: recorded with the result (the protocol the caller ordered the data by).

    Returns:
      :class:`Importances`.

    Raises:
      ValueError: unknown estimator, empty data, non-finite importances.
    """
    _validate.one_of("importance estimator", estimator, ESTIMATORS)
    _validate.positive_int(batch_size=batch_size, chunk_size=chunk_size)
    reduction = _cached_reduction(
        task, estimator=estimator, label_free=bool(label_free), chunk_size=chunk_size
    )
    out = reductions.reduce(reduction, params, _batches(data, batch_size, "data"))
    imp = Importances(out.value, estimator, bool(label_free), int(batch_size),
                      round(float(out.count)), protocol)  # fmt: skip
    check_importances(imp.values, "importances")
    return imp


def full_data_importances(
    task: Task,
    params: Params,
    train: Any = None,
    *,
    retain: Any = None,
    forget: Any = None,
    estimator: str = "fisher",
    label_free: bool = False,
    protocol: str = "full_class",
    chunk_size: int | None = None,
) -> Importances:
    """Importances :math:`I_D` of the whole training set, to compute once and cache.

    ``"fisher"`` depends on the training set only: pass ``train`` (compute it at training time).
    ``"batch_mean"`` follows ``protocol``'s loaders (module docstring): the pass runs over the retain
    set then the forget set in the protocol's order and batch size, so it needs the split: pass
    ``retain`` and ``forget``. Either way the result equals what ``ssd(...)`` computes in one call
    for the same request, and can be passed back as ``ssd(full_importances=...)``.

    Raises:
      ValueError: missing data for the estimator, an unknown protocol, non-finite importances.
    """
    _validate.one_of("importance estimator", estimator, ESTIMATORS)
    if estimator == "fisher":
        if train is None:
            if retain is None or forget is None:
                raise ValueError("full_data_importances needs train= (or retain= and forget=).")
            train = statistic_data(TRAIN, "data", forget, retain)
        return importances(task, params, train, estimator="fisher", label_free=label_free,
                           batch_size=FISHER_BATCH_SIZE, chunk_size=chunk_size)  # fmt: skip
    _validate.one_of("SSD protocol", protocol, PROTOCOLS)
    if retain is None or forget is None:
        raise ValueError(
            "batch_mean importances follow the reference protocol's loaders, whose training-set pass "
            "is the retain set then the forget set: pass retain= and forget= (not train=)."
        )
    spec = PROTOCOLS[protocol]
    data = statistic_data(TRAIN, spec.order, forget, retain)
    return importances(task, params, data, estimator="batch_mean", label_free=label_free,
                       batch_size=spec.full_batch_size, protocol=protocol)  # fmt: skip


def check_importances(values: Params, name: str) -> None:
    """Raises ``ValueError`` naming the leaf if ``values`` hold NaN, infinities or negative entries."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(values)[0]:
        arr = np.asarray(leaf)
        where = jax.tree_util.keystr(path) or "<root>"
        if not np.all(np.isfinite(arr)):
            bad = int(np.sum(~np.isfinite(arr)))
            raise ValueError(
                f"{name}{where} holds {bad} NaN or infinite values; SSD cannot rank parameters by "
                "them. Check the model and data for NaNs, or lower the loss scale (overflowing "
                "squared gradients)."
            )
        if np.any(arr < 0):
            raise ValueError(
                f"{name}{where} holds negative values (min {arr.min():.3g}); importances are squared "
                "or absolute gradients and must be >= 0."
            )


def combine_importances(retain: Importances, forget: Importances) -> Importances:
    """Training-set importances from the retain and forget sets: ``(n_r I_r + n_f I_f) / n``.

    Exact for per-example estimators (``"fisher"``, and label-free ``"fisher"``); ``"batch_mean"``
    depends on which examples share a batch, so it cannot be combined this way.

    Raises:
      ValueError: for ``"batch_mean"`` importances or importances of different kinds.
    """
    if retain.estimator != forget.estimator or retain.label_free != forget.label_free:
        raise ValueError(
            f"cannot combine importances of different kinds: {retain.metadata()} and "
            f"{forget.metadata()}."
        )
    if retain.estimator != "fisher":
        raise ValueError(
            "batch_mean importances depend on which examples share a batch; compute them on the "
            "training set directly (full_data_importances) instead of combining."
        )
    n_r, n_f = retain.num_examples, forget.num_examples
    values = _combined(retain.values, forget.values, n_r, n_f)
    return Importances(values, retain.estimator, retain.label_free, retain.batch_size, n_r + n_f)


def _combined(retain_values, forget_values, n_r, n_f):
    n = n_r + n_f
    return jax.tree_util.tree_map(
        lambda r, f: (n_r / n) * r + (n_f / n) * f, retain_values, forget_values
    )


# ---- storage --------------------------------------------------------------------------------------
def _key_name(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(parts)


def save_importances(path: str | os.PathLike, imp: Importances) -> None:
    """Writes importances to ``path`` (a ``.npz`` file): one array per leaf plus JSON metadata.

    Keep the file next to the model checkpoint (or put :meth:`Importances.metadata` into the
    checkpoint's metadata and the arrays into its directory); :func:`load_importances` reads it.
    """
    arrays = {
        _key_name(p): np.asarray(leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(imp.values)[0]
    }
    if "__metadata__" in arrays:
        raise ValueError("a parameter is named '__metadata__'; rename it to save importances.")
    arrays["__metadata__"] = np.asarray(json.dumps(imp.metadata()))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_importances(path: str | os.PathLike, params_like: Params | None = None) -> Importances:
    """Reads importances written by :func:`save_importances`.

    Args:
      path: the ``.npz`` file.
      params_like: optional params (or importances) whose tree structure and shapes the result must
        have; without it, nested dicts are rebuilt from the stored ``a/b/c`` names (Flax params).

    Raises:
      ValueError: a file without metadata, or leaves that do not match ``params_like``.
    """
    with np.load(path, allow_pickle=False) as f:
        stored = {k: f[k] for k in f.files}
    if "__metadata__" not in stored:
        raise ValueError(f"{path} holds no '__metadata__'; it was not written by save_importances.")
    meta = json.loads(str(stored.pop("__metadata__")))
    if params_like is not None:
        leaves = []
        for p, like in jax.tree_util.tree_flatten_with_path(params_like)[0]:
            name = _key_name(p)
            if name not in stored:
                raise ValueError(f"{path} has no importances for parameter {name!r}.")
            if stored[name].shape != np.shape(like):
                raise ValueError(
                    f"importances for {name!r} have shape {stored[name].shape}, the parameter "
                    f"{np.shape(like)}."
                )
            leaves.append(jnp.asarray(stored[name]))
        values = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params_like), leaves)
    else:
        values: dict = {}
        for name, arr in stored.items():
            node = values
            *parents, last = name.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = jnp.asarray(arr)
    return Importances(
        values,
        meta["estimator"],
        bool(meta["label_free"]),
        int(meta["batch_size"]),
        int(meta["num_examples"]),
        meta.get("protocol"),
    )


# ---- the dampening step ---------------------------------------------------------------------------
def dampening_factors(
    forget_importance: Params, full_importance: Params, *, alpha: float, lam: float
):
    r"""Per-parameter factors :math:`\beta` and the selection mask of SSD.

    .. math:: \beta_j = \min(\lambda [I_D]_j / [I_f]_j, 1) \text{ if } [I_f]_j > \alpha [I_D]_j
              \text{ else } 1.

    Args:
      forget_importance: :math:`I_f`, a pytree like the params (entries ``>= 0``).
      full_importance: :math:`I_D`, the same structure.
      alpha: selection weighting :math:`\alpha > 0`.
      lam: dampening constant :math:`\lambda > 0`.

    Returns:
      ``(beta, selected)``: pytrees like the params, ``beta`` in ``[0, 1]`` and ``selected`` bool.
      Jit-able; a selected entry always has :math:`[I_f]_j > 0`, so no division by zero occurs.
    """

    def leaf(f, d):
        selected = f > alpha * d
        safe_f = jnp.where(selected, f, jnp.ones_like(f))
        beta = jnp.where(selected, jnp.minimum(lam * d / safe_f, 1.0), jnp.ones_like(f))
        return beta, selected

    pairs = jax.tree_util.tree_map(leaf, forget_importance, full_importance)
    outer = jax.tree_util.tree_structure(forget_importance)
    inner = jax.tree_util.tree_structure((0, 0))
    beta, selected = jax.tree_util.tree_transpose(outer, inner, pairs)
    return beta, selected


def dampen(
    params: Params, forget_importance: Params, full_importance: Params, *, alpha: float, lam: float
) -> tuple[Params, dict[str, jax.Array]]:
    """Applies SSD's dampening ``theta <- beta * theta`` (see :func:`dampening_factors`).

    Returns:
      ``(new_params, stats)`` with ``stats`` holding ``ssd/num_selected``, ``ssd/selected_fraction``
      and ``ssd/mean_beta_selected`` (1 when nothing is selected).
    """
    beta, selected = dampening_factors(forget_importance, full_importance, alpha=alpha, lam=lam)
    new_params = jax.tree_util.tree_map(lambda p, b: (p * b).astype(p.dtype), params, beta)
    sel = jax.tree_util.tree_leaves(selected)
    betas = jax.tree_util.tree_leaves(beta)
    num_selected = sum(jnp.sum(s) for s in sel)
    total = sum(s.size for s in sel)
    beta_sum = sum(jnp.sum(jnp.where(s, b, 0.0)) for s, b in zip(sel, betas, strict=True))
    stats = {
        "ssd/num_selected": num_selected,
        "ssd/selected_fraction": num_selected / total,
        "ssd/mean_beta_selected": jnp.where(
            num_selected > 0, beta_sum / jnp.maximum(num_selected, 1), 1.0
        ),
    }
    return new_params, stats


# ---- the Unlearner ----------------------------------------------------------------------------
class SSDState(NamedTuple):
    """SSD's method state: the importances it used (kept for inspection and reuse).

    Attributes:
      forget: :math:`I_f`, a pytree like the params.
      full: :math:`I_D`, a pytree like the params.
    """

    forget: Params
    full: Params


@functools.cache
def _ssd_functions(alpha: float, lam: float, importance: str, name: str):
    """SSD's ``(init, update, check_stats)`` for one configuration, built once: every ``ssd(...)``
    of the same hyper-parameters shares them, and so the driver's compiled steps (cached on these
    functions): a new request, even through a new ``ssd(...)`` object, compiles nothing."""

    def full_values(stats):
        if "full_importance" in stats:
            return stats["full_importance"].value
        f, r = stats["forget_importance"], stats["retain_importance"]
        n_f, n_r = f.count, r.count
        # (n_r I_r + n_f I_f) / n: the training set's per-example Fisher.
        return jax.tree_util.tree_map(
            lambda a, b: (n_r * a + n_f * b) / (n_r + n_f), r.value, f.value
        )

    def check_stats(stats):
        for key, stat in stats.items():
            check_importances(stat.value, f"{name} {key}")
        if importance != "fisher":
            return
        n_f = float(np.max(np.asarray(stats["forget_importance"].count)))
        full = stats.get("full_importance") or stats["retain_importance"]
        n = float(np.max(np.asarray(full.count))) + (0.0 if "full_importance" in stats else n_f)
        bound = n / n_f
        if alpha >= bound:
            warnings.warn(
                f"{name}: alpha={alpha} >= n / n_f = {n:.0f} / {n_f:.0f} = {bound:.3g}; with "
                "per-example importances I_D >= (n_f / n) I_f, so no parameter can be selected and "
                f"the model will not change. Use alpha < {bound:.3g} (e.g. alpha=5, lam=0.1 for one "
                "class of ten) or importance='batch_mean' (the reference code's estimator).",
                stacklevel=3,
            )

    def init(task, params, key, stats, plan):
        del task, key, plan
        _validate.same_structure(params, stats["forget_importance"].value, "params", "importances")
        return SSDState(stats["forget_importance"].value, full_values(stats))

    def update(task, params, method_state, forget_batch, retain_batch, key):
        del task, forget_batch, retain_batch, key
        new_params, stats = dampen(
            params, method_state.forget, method_state.full, alpha=alpha, lam=lam
        )
        return new_params, method_state, stats

    return init, update, check_stats


def ssd(
    alpha: float = 10.0,
    lam: float = 1.0,
    *,
    importance: str = "fisher",
    label_free: bool = False,
    protocol: str | None = None,
    full_importances: Importances | None = None,
    batch_size: int = FISHER_BATCH_SIZE,
    chunk_size: int | None = None,
) -> Unlearner:
    r"""Selective Synaptic Dampening as a one-shot :class:`~unlearn_jax.methods.protocol.Unlearner`.

    Its statistics (streaming reductions, computed before the single update): :math:`I_f` over the
    forget set and, unless ``full_importances`` is given, :math:`I_D`: for ``"fisher"`` from a pass
    over the retain set combined with :math:`I_f` (:math:`(n_r I_r + n_f I_f)/n`), for
    ``"batch_mean"`` from the protocol's training-set pass (retain then forget). ``update`` dampens
    the parameters (module docstring); it reads no batches, so a request of any size reuses the
    compiled passes and the compiled dampening.

    Guarantees:
      Approximate: no equivalence to retraining is claimed. Deterministic given the importances;
      parameters with zero forget importance never change. Retain data are needed only through
      :math:`I_D`, which can be cached.

    Args:
      alpha: selection weighting :math:`\alpha > 0` (paper: 10 for CIFAR ResNet-18, with the
        batch-mean estimator; with the per-example Fisher it must be below :math:`n/n_f`).
      lam: dampening constant :math:`\lambda > 0` (paper: 1).
      importance: ``"fisher"`` (per-example, the paper's definition) or ``"batch_mean"`` (the
        reference code's).
      label_free: LFSSD (see :func:`lfssd`).
      protocol: for ``"batch_mean"``, the reference loaders to reproduce: ``"full_class"``
        (default; batch 64/64, class-grouped), ``"sub_class"`` (64/64) or ``"random"`` (128/128);
        they fix both batch sizes and the order of the training-set pass. Not used by ``"fisher"``.
      full_importances: cached :math:`I_D` from :func:`full_data_importances` (or the ``full`` field
        of a previous run's :class:`SSDState`); must be of the same estimator, label-freeness and
        protocol. When given, no retain data is read.
      batch_size: for ``"fisher"``, rows per batch of the streaming passes (the value does not
        depend on it).
      chunk_size: per-example gradients computed this many at a time.

    Returns:
      An :class:`Unlearner` named ``"ssd"`` (``"lfssd"`` when label-free); its metrics are
      ``ssd/num_selected``, ``ssd/selected_fraction`` and ``ssd/mean_beta_selected``.

    Raises:
      ValueError: non-positive ``alpha``/``lam``, unknown estimator or protocol, cached importances
        of another kind or with NaN/inf/negative entries (those computed in the run are checked
        too, before the dampening).

    References:
      Foster, Schoepf, Brintrup, AAAI 2024 (SSD); Foster, Schoepf, Brintrup, 2024 (LFSSD).
    """
    _validate.positive(alpha=alpha, lam=lam)
    _validate.one_of("importance estimator", importance, ESTIMATORS)
    _validate.positive_int(batch_size=batch_size, chunk_size=chunk_size)
    if importance == "batch_mean":
        protocol = "full_class" if protocol is None else protocol
        _validate.one_of("SSD protocol", protocol, PROTOCOLS)
        spec = PROTOCOLS[protocol]
    else:
        if protocol is not None:
            raise ValueError(
                f"protocol={protocol!r} applies to importance='batch_mean' only: the per-example "
                "Fisher does not depend on batch sizes or order."
            )
        spec = Protocol(batch_size, batch_size, "data")
    name = "lfssd" if label_free else "ssd"
    reduction = _reduction_factory(importance, bool(label_free), chunk_size)
    statistics = {
        "forget_importance": Statistic(reduction, FORGET, spec.forget_batch_size, spec.order)
    }
    if full_importances is not None:
        _check_cached(full_importances, importance, label_free, protocol)
        statistics["full_importance"] = Statistic(
            reduction, TRAIN, spec.full_batch_size, spec.order,
            value=Reduced(full_importances.values, jnp.asarray(
                float(full_importances.num_examples), jnp.float32)),
        )  # fmt: skip
    elif importance == "fisher":
        statistics["retain_importance"] = Statistic(reduction, RETAIN, spec.full_batch_size)
    else:
        statistics["full_importance"] = Statistic(
            reduction, TRAIN, spec.full_batch_size, spec.order
        )

    init, update, check_stats = _ssd_functions(float(alpha), float(lam), importance, name)

    return Unlearner(
        init=init,
        update=update,
        name=name,
        feeds=Feeds(batches=(), statistics=statistics, run={"steps": 1}),
        guarantee="approximate",
        hparams={
            "alpha": alpha,
            "lam": lam,
            "importance": importance,
            "label_free": bool(label_free),
            "protocol": protocol,
            "cached_full_importances": full_importances is not None,
            "forget_batch_size": spec.forget_batch_size,
            "full_batch_size": spec.full_batch_size,
            "order": spec.order,
        },
        checks=Checks(stats=check_stats),
    )


def _check_cached(imp: Importances, importance: str, label_free: bool, protocol) -> None:
    if not isinstance(imp, Importances):
        raise TypeError(
            "full_importances must be an Importances (from full_data_importances), got "
            f"{type(imp).__name__}."
        )
    if imp.estimator != importance or imp.label_free != bool(label_free):
        raise ValueError(
            f"full_importances were computed with estimator={imp.estimator!r}, "
            f"label_free={imp.label_free}, but this SSD uses importance={importance!r}, "
            f"label_free={bool(label_free)}; recompute them or match the arguments."
        )
    if importance == "batch_mean" and imp.protocol != protocol:
        raise ValueError(
            f"full_importances follow protocol {imp.protocol!r} but this SSD uses {protocol!r}: "
            "batch-mean importances depend on the protocol's batch sizes and order."
        )
    check_importances(imp.values, "full_importances")


def lfssd(alpha: float = 10.0, lam: float = 1.0, **kwargs: Any) -> Unlearner:
    r"""Label-free SSD: :func:`ssd` with ``label_free=True``.

    The importance of a parameter is the mean absolute gradient of :math:`\lVert f(x) \rVert_2^2`
    (the squared norm of the model's outputs), so neither the forget nor the training labels are
    used. Keyword arguments as for :func:`ssd`.

    Guarantees:
      Approximate, as SSD.

    References:
      Foster, Schoepf, Brintrup. "Loss-Free Machine Unlearning", ICLR 2024 Tiny Papers.
    """
    return ssd(alpha, lam, label_free=True, **kwargs)


__all__ = [
    "ESTIMATORS",
    "PROTOCOLS",
    "Importances",
    "Protocol",
    "SSDState",
    "check_importances",
    "combine_importances",
    "dampen",
    "dampening_factors",
    "full_data_importances",
    "importances",
    "lfssd",
    "load_importances",
    "save_importances",
    "ssd",
]
