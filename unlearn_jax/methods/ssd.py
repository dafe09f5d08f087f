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

Importance estimators (``importance=``):

* ``"fisher"`` (default): the per-example empirical diagonal Fisher
  :math:`I = \frac1N \sum_i g_i \odot g_i`, the quantity the paper defines. It does not depend on the
  batch size, and the training-set importance of the union of two sets is the count-weighted mean of
  theirs, :math:`I_D = (n_r I_r + n_f I_f) / n`.
* ``"batch_mean"``: the reference code's estimator, the squared gradient of each mini-batch's MEAN
  loss averaged over the batches, :math:`\frac1M \sum_m (\bar g_m)^2`. It depends on the batch size
  (for i.i.d. gradients about :math:`\bar g^2 + \mathrm{Var}(g)/B`), so the batch size is a
  recorded parameter: 128 on the forget set and 64 on the training set, as in the reference.

Label-free SSD (``label_free=True``, :func:`lfssd`) replaces the loss by the squared norm of the
outputs, :math:`\ell(x) = \lVert f(x) \rVert_2^2`, and the squared gradients by absolute values
(:math:`\frac1N \sum_i |g_i|`, or :math:`\frac1M \sum_m |\bar g_m|` with ``"batch_mean"``), so no
labels are needed at all.

Choosing alpha. With a per-example estimator the training-set importance contains the forget set,
:math:`I_D = (n_r I_r + n_f I_f)/n \ge (n_f/n) I_f`, so :math:`[I_f]_j > \alpha [I_D]_j` is
impossible once :math:`\alpha \ge n / n_f`: the paper's :math:`\alpha = 10` selects nothing when
one class of ten is forgotten (:func:`ssd` warns). The reference code's batch-mean estimator escapes
this bound because a forget batch's mean gradient is coherent while the forget examples are diluted
in the mixed training batches; the paper's published settings come from it. With the per-example
Fisher, :math:`\alpha = 5, \lambda = 0.1` forgets a digits class (tests and
``experiments/digits_curvature_methods.py``).

Edge cases, by construction of the strict inequality:

* a parameter with zero forget importance (:math:`[I_f]_j = 0`) is never selected, so it never
  changes, whatever :math:`I_D`; all-zero forget importances leave the model unchanged;
* a selected parameter has :math:`[I_f]_j > \alpha [I_D]_j \ge 0`, so the division is always by a
  positive number; a parameter with :math:`[I_D]_j = 0 < [I_f]_j` gets :math:`\beta_j = 0` (it is
  used only by the forget set, and is zeroed);
* NaN or infinite importances raise a ``ValueError`` naming the leaf (a silent NaN would compare
  False and hide the problem); negative importances raise too.

The training-set importances can be computed once, at training time, with
:func:`full_data_importances`, stored next to the checkpoint (:func:`save_importances`,
:func:`load_importances`, or :meth:`Importances.metadata` plus the arrays), and passed as
``ssd(full_importances=...)``: every later deletion request then costs one pass over its forget set
only.

References:
  Foster, Schoepf, Brintrup. "Fast Machine Unlearning Without Retraining Through Selective Synaptic
  Dampening", AAAI 2024. Foster, Schoepf, Brintrup. "Loss-Free Machine Unlearning" (LFSSD), ICLR
  2024 Tiny Papers.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.core.curvature import diag_fisher, diag_fisher_batch_mean
from unlearn_jax.core.grads import chunked_sum, mean_grad
from unlearn_jax.core.task import Task
from unlearn_jax.methods.base import Unlearner

Params = Any
ESTIMATORS = ("fisher", "batch_mean")

# The reference implementation's batch sizes for the "batch_mean" estimator.
REFERENCE_FORGET_BATCH_SIZE = 128
REFERENCE_FULL_BATCH_SIZE = 64


class Importances(NamedTuple):
    """Per-parameter importances and how they were computed.

    Attributes:
      values: a pytree like the params, every entry ``>= 0``.
      estimator: ``"fisher"`` or ``"batch_mean"``.
      label_free: True for LFSSD's ``|grad ||f(x)||^2|`` importances.
      batch_size: the batch size of the pass (part of the definition of ``"batch_mean"``; only the
        streaming size for ``"fisher"``).
      num_examples: the number of examples averaged over.
    """

    values: Params
    estimator: str
    label_free: bool
    batch_size: int
    num_examples: int

    def metadata(self) -> dict:
        """JSON-serialisable description (everything but the arrays), e.g. for checkpoint metadata."""
        return {
            "estimator": self.estimator,
            "label_free": self.label_free,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
        }


# ---- importance estimation ------------------------------------------------------------------------
def _label_free_loss(task: Task):
    def loss(params, example):
        return jnp.sum(jnp.square(task.outputs(params, example)))

    return loss


def _as_batches(data: Any, batch_size: int, name: str) -> tuple[Iterator, int]:
    """Batches of ``batch_size`` examples in data order, from a Dataset, a batch dict or a list."""
    if hasattr(data, "as_batch"):
        full = data.as_batch()
    elif isinstance(data, dict):
        full = data
    else:
        batches = list(data)
        if not batches:
            raise ValueError(f"{name} holds no batches.")
        return iter(batches), sum(_validate.batch_size(b, name) for b in batches)
    size = _validate.batch_size(full, name)
    full = {k: v for k, v in full.items() if k != "id"}
    return (
        (jax.tree_util.tree_map(lambda a, s=s: a[s : s + batch_size], full))
        for s in range(0, size, batch_size)
    ), size


def _mean_abs_grad(loss_fn, params, batches: Iterable, chunk_size):
    """``(1/N) sum_i |g_i|`` over every example of ``batches``."""

    @jax.jit
    def step(p, batch):
        return chunked_sum(
            lambda ex: jax.tree_util.tree_map(jnp.abs, jax.grad(loss_fn)(p, ex)), batch, chunk_size
        )

    total, count = None, 0
    for batch in batches:
        part = step(params, batch)
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
        count += _validate.batch_size(batch)
    return jax.tree_util.tree_map(lambda t: t / count, total)


def _batch_mean_abs_grad(loss_fn, params, batches: Iterable):
    """``(1/M) sum_m |mean_{i in m} g_i|`` over the batches."""
    step = jax.jit(lambda p, b: jax.tree_util.tree_map(jnp.abs, mean_grad(loss_fn, p, b)))
    total, num = None, 0
    for batch in batches:
        part = step(params, batch)
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
        num += 1
    return jax.tree_util.tree_map(lambda t: t / num, total)


def importances(
    task: Task,
    params: Params,
    data: Any,
    *,
    estimator: str = "fisher",
    label_free: bool = False,
    batch_size: int = 128,
    chunk_size: int | None = None,
) -> Importances:
    r"""Per-parameter importances of ``data`` for SSD (see the module docstring for the formulas).

    Args:
      task: how to read the model's loss and outputs.
      params: the model parameters.
      data: an :class:`unlearn_jax.data.Dataset`, a batch dict ``{"x", "y", ...}``, or an iterable of
        such batches.
      estimator: ``"fisher"`` (per-example, :math:`\frac1N\sum_i g_i^2`) or ``"batch_mean"``
        (:math:`\frac1M\sum_m \bar g_m^2`, depends on ``batch_size``).
      label_free: LFSSD importances, ``|grad ||f(x)||^2|`` instead of squared loss gradients.
      batch_size: examples per batch of the pass (a Dataset or dict is cut into batches of this
        size, in data order).
      chunk_size: per-example gradients computed this many at a time (memory bound).

    Returns:
      :class:`Importances`.

    Raises:
      ValueError: unknown estimator, empty data, non-finite importances.
    """
    _validate.one_of("importance estimator", estimator, ESTIMATORS)
    _validate.positive_int(batch_size=batch_size, chunk_size=chunk_size)
    batches, count = _as_batches(data, batch_size, "data")
    if label_free:
        loss_fn = _label_free_loss(task)
        if estimator == "fisher":
            values = _mean_abs_grad(loss_fn, params, batches, chunk_size)
        else:
            values = _batch_mean_abs_grad(loss_fn, params, batches)
    elif estimator == "fisher":
        values = diag_fisher(task.loss, params, batches, chunk_size=chunk_size)
    else:
        values = diag_fisher_batch_mean(task.loss, params, batches)
    imp = Importances(values, estimator, bool(label_free), int(batch_size), int(count))
    check_importances(imp.values, "importances")
    return imp


def full_data_importances(
    task: Task,
    params: Params,
    train: Any,
    *,
    estimator: str = "fisher",
    label_free: bool = False,
    batch_size: int = REFERENCE_FULL_BATCH_SIZE,
    chunk_size: int | None = None,
) -> Importances:
    """Importances :math:`I_D` of the whole training set, to compute once and cache.

    Same as :func:`importances` with the reference's full-data batch size (64) as the default.
    Store the result with the checkpoint (:func:`save_importances`) and pass it to
    ``ssd(full_importances=...)``: deletions then need a pass over their forget set only.
    """
    return importances(
        task,
        params,
        train,
        estimator=estimator,
        label_free=label_free,
        batch_size=batch_size,
        chunk_size=chunk_size,
    )


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
    n = n_r + n_f
    values = jax.tree_util.tree_map(
        lambda r, f: (n_r / n) * r + (n_f / n) * f, retain.values, forget.values
    )
    return Importances(values, retain.estimator, retain.label_free, retain.batch_size, n)


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


_dampen_jit = jax.jit(dampen)


# ---- the Unlearner ----------------------------------------------------------------------------
class SSDState(NamedTuple):
    """SSD's method state: the importances it used (kept for inspection and reuse)."""

    forget: Importances
    full: Importances


def ssd(
    alpha: float = 10.0,
    lam: float = 1.0,
    *,
    importance: str = "fisher",
    label_free: bool = False,
    full_importances: Importances | None = None,
    forget_batch_size: int = REFERENCE_FORGET_BATCH_SIZE,
    full_batch_size: int = REFERENCE_FULL_BATCH_SIZE,
    chunk_size: int | None = None,
) -> Unlearner:
    r"""Selective Synaptic Dampening as a one-shot :class:`Unlearner`.

    ``init`` computes :math:`I_f` on the forget set and, unless ``full_importances`` is given,
    :math:`I_D` on retain + forget (for ``"fisher"``: from the retain pass and the forget pass,
    :func:`combine_importances`; for ``"batch_mean"``: a pass over retain followed by forget in
    batches of ``full_batch_size``). ``update`` dampens the parameters (module docstring).

    Guarantees:
      Approximate: no equivalence to retraining is claimed. Deterministic given the importances;
      parameters with zero forget importance never change. Retain data are needed only through
      :math:`I_D`, which can be cached at training time.

    Args:
      alpha: selection weighting :math:`\alpha > 0` (paper: 10 for CIFAR ResNet-18, with the
        batch-mean estimator; with the per-example Fisher it must be below :math:`n/n_f`, see the
        module docstring).
      lam: dampening constant :math:`\lambda > 0` (paper: 1).
      importance: ``"fisher"`` (per-example, the paper's definition) or ``"batch_mean"`` (the
        reference code's).
      label_free: LFSSD (see :func:`lfssd`).
      full_importances: cached :math:`I_D` from :func:`full_data_importances` (or the ``full`` field
        of a previous run's method state, :class:`SSDState`); must be of the same estimator and
        label-freeness. When given, no retain data is read.
      forget_batch_size: batch size of the forget pass (reference: 128).
      full_batch_size: batch size of the training-set pass (reference: 64).
      chunk_size: per-example gradients computed this many at a time.

    Returns:
      An :class:`Unlearner` named ``"ssd"`` (``"lfssd"`` when label-free).

    Raises:
      ValueError: non-positive ``alpha``/``lam``, unknown estimator, cached importances of another
        kind or with NaN/inf/negative entries.

    References:
      Foster, Schoepf, Brintrup, AAAI 2024 (SSD); Foster, Schoepf, Brintrup, 2024 (LFSSD).
    """
    _validate.positive(alpha=alpha, lam=lam)
    _validate.one_of("importance estimator", importance, ESTIMATORS)
    _validate.positive_int(
        forget_batch_size=forget_batch_size, full_batch_size=full_batch_size, chunk_size=chunk_size
    )
    if full_importances is not None:
        if not isinstance(full_importances, Importances):
            raise TypeError(
                "full_importances must be an Importances (from full_data_importances), got "
                f"{type(full_importances).__name__}."
            )
        if full_importances.estimator != importance or full_importances.label_free != label_free:
            raise ValueError(
                f"full_importances were computed with estimator={full_importances.estimator!r}, "
                f"label_free={full_importances.label_free}, but this SSD uses "
                f"importance={importance!r}, label_free={label_free}; recompute them or match the "
                "arguments."
            )
        check_importances(full_importances.values, "full_importances")
        full_batch_size = full_importances.batch_size
    name = "lfssd" if label_free else "ssd"

    def _warn_if_nothing_selectable(forget_imp, full):
        if importance != "fisher" or full.num_examples <= 0:
            return
        bound = full.num_examples / forget_imp.num_examples
        if alpha >= bound:
            warnings.warn(
                f"{name}: alpha={alpha} >= n / n_f = {full.num_examples} / "
                f"{forget_imp.num_examples} = {bound:.3g}; with per-example importances I_D >= "
                "(n_f / n) I_f, so no parameter can be selected and the model will not change. Use "
                f"alpha < {bound:.3g} (e.g. alpha=5, lam=0.1 for one class of ten) or "
                "importance='batch_mean' (the reference code's estimator).",
                stacklevel=2,
            )

    estimate = dict(estimator=importance, label_free=label_free, chunk_size=chunk_size)

    def init(train_state, task, forget, retain, key):
        del key
        params = train_state.params
        forget_imp = importances(task, params, forget, batch_size=forget_batch_size, **estimate)
        if full_importances is not None:
            _validate.same_structure(params, full_importances.values, "params", "full_importances")
            _warn_if_nothing_selectable(forget_imp, full_importances)
            return SSDState(forget_imp, full_importances)
        if retain is None:
            raise ValueError(
                f"{name} needs the training-set importances: pass retain data, or compute them once "
                "with full_data_importances(...) and pass ssd(full_importances=...)."
            )
        if importance == "fisher":
            retain_imp = importances(task, params, retain, batch_size=full_batch_size, **estimate)
            full = combine_importances(retain_imp, forget_imp)
            full = full._replace(batch_size=full_batch_size)
        else:
            both = list(_as_batches(retain, full_batch_size, "retain")[0]) + list(
                _as_batches(forget, full_batch_size, "forget")[0]
            )
            full = importances(task, params, both, batch_size=full_batch_size, **estimate)
        _warn_if_nothing_selectable(forget_imp, full)
        return SSDState(forget_imp, full)

    def update(train_state, method_state, task, forget_batch, retain_batch, key):
        del retain_batch, key
        params, stats = _dampen_jit(
            train_state.params,
            method_state.forget.values,
            method_state.full.values,
            alpha=alpha,
            lam=lam,
        )
        metrics = {"loss": task.batch_loss(params, forget_batch), **stats}
        return train_state.replace(params=params), method_state, metrics

    return Unlearner(
        init=init,
        update=update,
        name=name,
        needs_retain=full_importances is None,
        needs_forget_batches=True,
        one_shot=True,
        hparams={
            "alpha": alpha,
            "lam": lam,
            "importance": importance,
            "label_free": label_free,
            "cached_full_importances": full_importances is not None,
            "forget_batch_size": forget_batch_size,
            "full_batch_size": full_batch_size,
        },
    )


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
