r"""Streaming reductions: statistics of a whole data set, one batch on the device at a time.

What one-shot unlearning methods need from whole data sets (a diagonal Fisher, a mean gradient, a
saliency score, ridge sufficient statistics) is a *reduction* over batches, written as three pure
functions like an optax transform::

    acc   = reduction.init(params)                          # works on jax.ShapeDtypeStructs too
    acc   = reduction.accumulate(acc, params, batch, key)   # once per batch, compiled once
    stat  = reduction.finalize(acc)                         # a Reduced(value, count)

:func:`reduce` runs one over any iterable of batches. Every batch is padded to a fixed number of rows
(:func:`~unlearn_jax.core.batch.pad_batch`, real rows marked in ``"mask"``), so a data set of any size
compiles the accumulate step once per batch size; the step is a module-level ``jit`` keyed on the
reduction's functions, so later calls with the same reduction compile nothing. ``stacked=True`` runs
the same reduction for ``M`` models at once (params with a leading model axis, one ``vmap``).

The reductions here are the one implementation of these statistics in the library: the core's
:func:`~unlearn_jax.core.curvature.diag_fisher` & co., SSD's importances, SalUn's saliency, influence
removal's gradients and the analytic head's sufficient statistics all stream through them.

Conventions: ``loss_fn(params, example) -> scalar`` is the loss of ONE example (the core's
convention); row weights :math:`m_i` (``batch["mask"]``, 0 on padding rows, 1 otherwise) weight every
sum, and ``count`` is :math:`\sum_i m_i`. Factories are cached (equal arguments give the same
:class:`Reduction` object), which is what lets compiled steps be reused across calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from unlearn_jax import _validate
from unlearn_jax.core.batch import MASK, batch_rows, pad_batch, row_mask
from unlearn_jax.core.grads import chunked_sum
from unlearn_jax.core.task import flax_task_of
from unlearn_jax.sharding.placement import Frozen, Placement

Params = Any
Batch = dict[str, Any]
LossFn = Callable[[Params, Any], jax.Array]


class Reduced(NamedTuple):
    """A finalized statistic.

    Attributes:
      value: the statistic (a pytree, usually shaped like the params).
      count: float32 scalar, :math:`\\sum_i m_i`, the number of (real) examples it was taken over.
    """

    value: Any
    count: jax.Array


class Reduction(NamedTuple):
    """A streaming statistic: three pure functions (see the module docstring).

    Attributes:
      init: ``init(params) -> acc``; must work on ``jax.ShapeDtypeStruct`` params (``eval_shape``).
      accumulate: ``accumulate(acc, params, batch, key) -> acc`` for one padded batch with
        ``"mask"``; pure and jittable.
      finalize: ``finalize(acc) -> Reduced``.
      name: a short description for records and messages.
      uses_key: whether ``accumulate`` reads its key (then :func:`reduce` requires one).
    """

    init: Callable[[Params], Any]
    accumulate: Callable[[Any, Params, Batch, jax.Array], Any]
    finalize: Callable[[Any], Reduced]
    name: str
    uses_key: bool = False


# ---- the runner -----------------------------------------------------------------------------------
@functools.cache
def _compiled(reduction: Reduction, stacked: bool, shardings: Frozen | None):
    """``(init, accumulate, finalize)`` jitted once per reduction, model axis and placement.

    ``shardings`` (a frozen ``(params, acc, batch, out)`` tuple) pins the accumulator to the
    parameters' layout and the batch to the mesh's batch axes; the accumulator is donated.
    """

    def init(params):
        return jax.vmap(reduction.init)(params) if stacked else reduction.init(params)

    def accumulate(acc, params, batch, key):
        if stacked:
            return jax.vmap(reduction.accumulate, in_axes=(0, 0, None, None))(
                acc, params, batch, key
            )
        return reduction.accumulate(acc, params, batch, key)

    def finalize(acc):
        return jax.vmap(reduction.finalize)(acc) if stacked else reduction.finalize(acc)

    if shardings is None:
        return jax.jit(init), jax.jit(accumulate, donate_argnums=(0,)), jax.jit(finalize)
    params_sh, acc_sh, batch_sh, out_sh = shardings.tree
    return (
        jax.jit(init, in_shardings=(params_sh,), out_shardings=acc_sh),
        jax.jit(
            accumulate,
            in_shardings=(acc_sh, params_sh, batch_sh, None),
            out_shardings=acc_sh,
            donate_argnums=(0,),
        ),
        jax.jit(finalize, in_shardings=(acc_sh,), out_shardings=out_sh),
    )


def _shardings(reduction, params, stacked, placement: Placement | None, batch) -> Frozen | None:
    if placement is None:
        return None
    init = jax.vmap(reduction.init) if stacked else reduction.init
    finalize = jax.vmap(reduction.finalize) if stacked else reduction.finalize
    acc_shapes = jax.eval_shape(init, params)
    out_shapes = jax.eval_shape(finalize, acc_shapes)
    batch_sh = jax.tree_util.tree_map(lambda _: placement.batch(), batch)
    return Frozen((placement.of(params), placement.of(acc_shapes), batch_sh,
                   placement.of(out_shapes)))  # fmt: skip


def _bucket(rows: int) -> int:
    """A batch larger than the first one is padded to the next power of two (one more compile)."""
    return 1 << (rows - 1).bit_length()


def _iter(batches: Iterable[Batch], where: str):
    if isinstance(batches, Mapping) or hasattr(batches, "shape"):
        raise TypeError(
            f"{where} takes an ITERABLE of batches (e.g. a list or a generator), got a single "
            f"{type(batches).__name__}; wrap one batch as [batch]."
        )
    yield from batches


def reduce(
    reduction: Reduction,
    params: Params,
    batches: Iterable[Batch],
    *,
    key: jax.Array | None = None,
    rows: int | None = None,
    stacked: bool = False,
    placement: Placement | None = None,
) -> Reduced:
    """Runs ``reduction`` over ``batches`` and returns its finalized :class:`Reduced`.

    Args:
      reduction: a :class:`Reduction`.
      params: the parameters (with a leading model axis ``M`` on every leaf if ``stacked``).
      batches: an iterable of batch dicts (leaves ``[B_m, ...]``; sizes may differ; a ``"mask"``
        of row weights is respected). One batch is on the device at a time.
      key: PRNG key for reductions that sample (``reduction.uses_key``); batch ``m`` gets
        ``fold_in(key, m)``, so results do not depend on how the data were cut... only on the key
        and the batch index.
      rows: pad every batch to this many rows (default: the first batch's size; a larger batch
        later is padded to the next power of two). Padding never changes the statistic.
      stacked: ``params`` hold ``M`` models; every leaf of the result then has a leading ``M``.
      placement: a :class:`~unlearn_jax.sharding.Placement`: the parameters keep their sharding,
        each batch is split over the mesh's batch axes (``rows`` a multiple of their devices), the
        accumulator and the result get shardings from their shapes; ``None``: plain ``jit``.

    Returns:
      ``Reduced(value, count)``.

    Raises:
      ValueError: no batches, or all of them empty (count 0); an invalid batch.
      TypeError: a single batch instead of an iterable.
    """
    if not isinstance(reduction, Reduction):
        raise TypeError(f"reduction must be a Reduction, got {type(reduction).__name__}.")
    _validate.positive_int(rows=rows)
    if reduction.uses_key and key is None:
        raise ValueError(f"the reduction {reduction.name!r} samples: pass key=jax.random.key(...).")
    base_key = jax.random.key(0) if key is None else key
    multiple = 1 if placement is None else placement.batch_size_multiple
    acc = compiled = None
    for index, batch in enumerate(_iter(batches, "reduce")):
        n = batch_rows(batch, f"batch {index}")
        if rows is None:
            rows = n
        elif n > rows:
            rows = _bucket(n)
        rows = -(-rows // multiple) * multiple
        padded = pad_batch(dict(batch), rows)
        if compiled is None:
            compiled = _compiled(
                reduction, stacked, _shardings(reduction, params, stacked, placement, padded)
            )
            acc = compiled[0](params)
        acc = compiled[1](acc, params, padded, jax.random.fold_in(base_key, index))
    if acc is None:
        raise ValueError(f"{reduction.name}: got no batches; the data must hold an example.")
    return compiled[2](acc)


def reduce_shapes(reduction: Reduction, params: Params) -> Reduced:
    """The shapes and dtypes of ``reduction``'s result for ``params`` (arrays or ShapeDtypeStructs)."""
    return jax.eval_shape(lambda p: reduction.finalize(reduction.init(p)), params)


# ---- helpers shared by the reductions -------------------------------------------------------------
def _zeros(params: Params, dtype=None) -> Params:
    return jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, dtype or p.dtype), params)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _without_mask(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != MASK}


def _sum_acc(params: Params) -> dict:
    return {"sum": _zeros(params), "count": jnp.zeros((), jnp.float32)}


def _divide(tree, count):
    """``tree / count`` leaf by leaf, the division in each leaf's dtype (``1/count`` rounded to
    float32 would cost float64 statistics their precision)."""
    safe = jnp.where(count > 0, count, 1)
    return jax.tree_util.tree_map(lambda t: t / safe.astype(t.dtype), tree)


def _mean_finalize(acc) -> Reduced:
    return Reduced(_divide(acc["sum"], acc["count"]), acc["count"])


def _sum_finalize(acc) -> Reduced:
    return Reduced(acc["sum"], acc["count"])


def _weighted_loss_sum(loss_fn: LossFn, params: Params, batch: Batch) -> jax.Array:
    mask = row_mask(batch)
    losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, _without_mask(batch))
    return jnp.sum(mask.astype(losses.dtype) * losses)


def _per_example_sum(transform, loss_fn, params, batch, chunk_size):
    """``sum_i m_i transform(g_i)`` with per-example gradients ``chunk_size`` at a time."""
    mask = row_mask(batch)
    grad_fn = jax.grad(loss_fn)

    def one(pair):
        example, m = pair
        return jax.tree_util.tree_map(
            lambda g: m.astype(g.dtype) * transform(g), grad_fn(params, example)
        )

    return chunked_sum(one, (_without_mask(batch), mask), chunk_size)


# ---- gradients ------------------------------------------------------------------------------------
@functools.cache
def gradient_sum(loss_fn: LossFn) -> Reduction:
    r""":math:`\sum_i m_i \nabla\ell(z_i;\theta)`, one ordinary backward pass per batch (value NOT divided)."""

    def accumulate(acc, params, batch, key):
        del key
        g = jax.grad(lambda p: _weighted_loss_sum(loss_fn, p, batch))(params)
        return {"sum": _add(acc["sum"], g), "count": acc["count"] + jnp.sum(row_mask(batch))}

    return Reduction(_sum_acc, accumulate, _sum_finalize, "gradient_sum")


@functools.cache
def mean_gradient(loss_fn: LossFn) -> Reduction:
    r""":math:`\frac1n \sum_i m_i \nabla\ell(z_i;\theta)` with :math:`n = \sum_i m_i`."""
    base = gradient_sum(loss_fn)
    return base._replace(finalize=_mean_finalize, name="mean_gradient")


# ---- diagonal Fisher and importances ---------------------------------------------------------------
METHODS = ("auto", "generic")


@functools.cache
def squared_gradient_mean(
    loss_fn: LossFn, chunk_size: int | None = None, method: str = "auto"
) -> Reduction:
    r"""The empirical diagonal Fisher :math:`F = \frac1n \sum_i m_i\, g_i \odot g_i` (per example).

    With ``method="auto"`` and ``loss_fn`` the ``loss`` of a Flax task (``task.loss`` of
    :func:`~unlearn_jax.core.task.flax_task` / ``models.model_task``), the sum of squares comes from
    per-layer captures, one forward and one backward pass per batch, never forming a per-example
    gradient (:func:`unlearn_jax.core.layer_stats.diag_fisher_sum`; layers it does not know fall back
    per leaf). Otherwise (``method="generic"``, or any other loss) per-example gradients are formed
    ``chunk_size`` at a time and squared at once. Both are exact; neither depends on how the data
    are cut into batches.
    """
    _validate.positive_int(chunk_size=chunk_size)
    _validate.one_of("Fisher method", method, METHODS)
    model = flax_task_of(loss_fn) if method == "auto" else None

    def accumulate(acc, params, batch, key):
        del key
        if model is not None:
            from unlearn_jax.core import (
                layer_stats,
            )  # local: layer_stats imports this module's deps

            part = layer_stats.diag_fisher_sum(model, params, batch, chunk_size=chunk_size)
        else:
            part = _per_example_sum(jnp.square, loss_fn, params, batch, chunk_size)
        return {"sum": _add(acc["sum"], part), "count": acc["count"] + jnp.sum(row_mask(batch))}

    return Reduction(_sum_acc, accumulate, _mean_finalize, "squared_gradient_mean")


@functools.cache
def abs_gradient_mean(loss_fn: LossFn, chunk_size: int | None = None) -> Reduction:
    r""":math:`\frac1n \sum_i m_i\, |g_i|` (label-free SSD's per-example importance)."""
    _validate.positive_int(chunk_size=chunk_size)

    def accumulate(acc, params, batch, key):
        del key
        part = _per_example_sum(jnp.abs, loss_fn, params, batch, chunk_size)
        return {"sum": _add(acc["sum"], part), "count": acc["count"] + jnp.sum(row_mask(batch))}

    return Reduction(_sum_acc, accumulate, _mean_finalize, "abs_gradient_mean")


def _batch_mean_reduction(loss_fn: LossFn, transform, name: str) -> Reduction:
    def init(params):
        return {"sum": _zeros(params), "count": jnp.zeros((), jnp.float32),
                "batches": jnp.zeros((), jnp.float32)}  # fmt: skip

    def accumulate(acc, params, batch, key):
        del key
        mask = row_mask(batch)
        count = jnp.sum(mask)
        # The gradient of the batch's MEAN loss over its real rows; an all-padding batch adds 0.
        g = jax.grad(lambda p: _weighted_loss_sum(loss_fn, p, batch))(params)
        part = jax.tree_util.tree_map(transform, _divide(g, count))
        return {
            "sum": _add(acc["sum"], part),
            "count": acc["count"] + count,
            "batches": acc["batches"] + (count > 0).astype(jnp.float32),
        }

    def finalize(acc):
        return Reduced(_divide(acc["sum"], acc["batches"]), acc["count"])

    return Reduction(init, accumulate, finalize, name)


@functools.cache
def batch_mean_squared_gradient(loss_fn: LossFn) -> Reduction:
    r"""The squared gradient of each batch's MEAN loss, averaged over batches,
    :math:`\frac1M \sum_m \bigl(\frac{1}{|m|}\sum_{i \in m} g_i\bigr)^{\odot 2}`.

    NOT a per-example Fisher: it depends on the batch size and on which examples share a batch
    (SSD's reference code computes its importances this way). A partial last batch counts as one
    batch, averaged over its real rows.
    """
    return _batch_mean_reduction(loss_fn, jnp.square, "batch_mean_squared_gradient")


@functools.cache
def batch_mean_abs_gradient(loss_fn: LossFn) -> Reduction:
    r""":math:`\frac1M \sum_m |\bar g_m|`: label-free SSD's batch-mean importance."""
    return _batch_mean_reduction(loss_fn, jnp.abs, "batch_mean_abs_gradient")


@functools.cache
def sampled_fisher(
    logits_fn: Callable[[Params, Any], jax.Array],
    num_samples: int = 1,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Reduction:
    r"""The model ("true") diagonal Fisher of a classifier, labels drawn from its own softmax.

    .. math:: F = \frac1n \sum_i m_i \frac1S \sum_{s=1}^S
              \bigl(\nabla_\theta -\log\operatorname{softmax}(f_i(\theta))_{y_{is}}\bigr)^{\odot 2},
              \qquad y_{is} \sim \operatorname{Categorical}(\operatorname{softmax}(f_i(\theta)))

    ``logits_fn(params, example) -> [C]``; labels are never read. Generic path: example ``i`` of a
    batch draws with ``fold_in(batch_key, i)`` split ``S`` ways. With ``method="auto"`` and
    ``logits_fn`` the ``outputs`` of a Flax classification task, per-layer captures give the sum
    (:func:`unlearn_jax.core.layer_stats.diag_fisher_sampled_sum`: one forward pass, ``S`` backward
    passes, draw ``s`` of a batch from ``fold_in(batch_key, s)``): the same estimator, other draws.
    """
    _validate.positive_int(num_samples=num_samples, chunk_size=chunk_size)
    _validate.one_of("Fisher method", method, METHODS)
    model = flax_task_of(logits_fn) if method == "auto" else None
    if model is not None and model.kind != "classification":
        model = None  # the generic path below samples class labels of [C] logits

    def sq_grad(params, example, key):
        logits = logits_fn(params, example)
        if logits.ndim != 1:
            raise TypeError(
                f"logits_fn must return [C] logits for one example, got {logits.shape}."
            )
        labels = jax.random.categorical(key, jax.lax.stop_gradient(logits), shape=(num_samples,))

        def nll(p, label):
            return -jax.nn.log_softmax(logits_fn(p, example))[label]

        grads = jax.vmap(jax.grad(nll), in_axes=(None, 0))(params, labels)
        return jax.tree_util.tree_map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)

    def accumulate(acc, params, batch, key):
        mask = row_mask(batch)
        if model is not None:
            from unlearn_jax.core import layer_stats

            part = layer_stats.diag_fisher_sampled_sum(
                model, params, batch, key, num_samples=num_samples, chunk_size=chunk_size
            )
            return {"sum": _add(acc["sum"], part), "count": acc["count"] + jnp.sum(mask)}
        keys = jax.random.split(key, mask.shape[0])

        def one(triple):
            example, m, k = triple
            return jax.tree_util.tree_map(
                lambda g: m.astype(g.dtype) * g, sq_grad(params, example, k)
            )

        part = chunked_sum(one, (_without_mask(batch), mask, keys), chunk_size)
        return {"sum": _add(acc["sum"], part), "count": acc["count"] + jnp.sum(mask)}

    return Reduction(_sum_acc, accumulate, _mean_finalize, "sampled_fisher", uses_key=True)


# ---- counts and features ----------------------------------------------------------------------------
@functools.cache
def example_count() -> Reduction:
    """:math:`\\sum_i m_i`: the number of real examples (value and count alike)."""

    def init(params):
        del params
        return jnp.zeros((), jnp.float32)

    def accumulate(acc, params, batch, key):
        del params, key
        return acc + jnp.sum(row_mask(batch))

    return Reduction(init, accumulate, lambda acc: Reduced(acc, acc), "example_count")


__all__ = [
    "Reduced",
    "Reduction",
    "abs_gradient_mean",
    "batch_mean_abs_gradient",
    "batch_mean_squared_gradient",
    "example_count",
    "gradient_sum",
    "mean_gradient",
    "reduce",
    "reduce_shapes",
    "sampled_fisher",
    "squared_gradient_mean",
]
