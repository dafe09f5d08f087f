"""Curvature of a training loss: diagonal Fisher estimates, Hessian- and Gauss-Newton-vector products.

Notation: ``g_i = grad_theta l(z_i; theta)`` is the gradient of the loss of example ``i``;
``L(theta) = (1/B) sum_i l(z_i; theta)`` the mean loss of a batch; ``f_i(theta)`` the outputs
(logits or predictions, ``[K]``) of example ``i``.

Which "Fisher" is which (the quantities differ, and papers rely on the difference):

* :func:`diag_fisher` -- the EMPIRICAL diagonal Fisher ``F = (1/N) sum_i g_i ** 2``: per-example
  gradients at the data labels, squared elementwise, averaged over ALL ``N`` examples of all batches.
  This is the importance that Selective Synaptic Dampening (SSD) defines.
* :func:`diag_fisher_sampled` -- the "true" (model) Fisher of a classifier,
  ``F = (1/N) sum_i E_{y ~ p_theta(.|x_i)} (grad_theta -log p_theta(y|x_i)) ** 2``, with labels
  drawn from the model's own predictive distribution (a Monte Carlo estimate with ``num_samples``
  draws per example).
* :func:`diag_fisher_batch_mean` -- the squared gradient of each mini-batch's MEAN loss, averaged
  over the batches: ``(1/M) sum_m (mean_{i in batch m} g_i) ** 2``. NOT a per-example Fisher (it
  shrinks as the batch grows); it is what SSD's reference code and ``optax.second_order.fisher_diag``
  compute, offered only for comparability with published numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from unlearn_jax import _validate
from unlearn_jax.core import reductions
from unlearn_jax.core.grads import LossFn, check_loss_fn, sum_over_chunks

Params = Any
Batch = Any


def _checked(batches: Iterable[Batch], loss_fn, params, fn_name: str):
    """The batches, the first one checked against ``loss_fn`` (a clear error before any compile)."""
    if isinstance(batches, (Mapping, jax.Array)):
        raise TypeError(
            f"{fn_name} takes an ITERABLE of batches (e.g. a list or a generator), got a single "
            f"{type(batches).__name__}; wrap one batch as [batch]."
        )
    for index, batch in enumerate(batches):
        if index == 0 and loss_fn is not None:
            check_loss_fn(loss_fn, params, {k: v for k, v in batch.items() if k != "mask"}
                          if isinstance(batch, Mapping) else batch, "batch 0")  # fmt: skip
        yield batch


def diag_fisher(
    loss_fn: LossFn,
    params: Params,
    batches: Iterable[Batch],
    *,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Params:
    """Empirical diagonal Fisher ``F = (1/N) sum_{i=1}^N g_i ** 2`` over every example of ``batches``.

    Streaming (:func:`unlearn_jax.core.reductions.squared_gradient_mean`): one batch is on the device
    at a time, so the data set never has to fit in memory, and the per-batch step is compiled once
    per loss, chunk size and batch size, for this and every later call. Within a batch,
    ``chunk_size`` bounds how many per-example gradients exist at once. A batch may carry a
    ``"mask"`` of row weights (0 on padding rows).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example at its data label.
      params: parameters, any pytree.
      batches: an iterable of batches (pytrees with a leading batch axis); batch sizes may differ.
      chunk_size: per-example gradients computed this many at a time.
      method: ``"auto"``: for ``task.loss`` of a Flax task, the per-layer statistics (one forward and
        one backward pass per batch, no per-example gradient formed:
        :mod:`unlearn_jax.core.layer_stats`); ``"generic"`` forces per-example gradients.

    Returns:
      A pytree like ``params``: the mean over all ``N`` examples of the squared per-example gradients.

    Raises:
      ValueError: no batches; TypeError: a single batch instead of an iterable, a non-scalar loss.
    """
    reduction = reductions.squared_gradient_mean(loss_fn, chunk_size, method)
    return reductions.reduce(
        reduction, params, _checked(batches, loss_fn, params, "diag_fisher")
    ).value


def diag_fisher_sampled(
    logits_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    batches: Iterable[Batch],
    key: jax.Array,
    *,
    num_samples: int = 1,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Params:
    """Model ("true") diagonal Fisher of a classifier, labels sampled from its own softmax.

    ``F = (1/N) sum_i (1/S) sum_{s=1}^S (grad_theta -log softmax(f_i(theta))[y_is]) ** 2`` with
    ``y_is ~ Categorical(softmax(f_i(theta)))`` drawn independently for every example and sample.
    As ``S -> inf`` this tends to ``(1/N) sum_i sum_c p_ic (grad -log p_ic) ** 2``
    (:func:`unlearn_jax.core.reductions.sampled_fisher`).

    Args:
      logits_fn: ``logits_fn(params, example) -> [C]`` logits of ONE example (labels are not read).
      params: parameters.
      batches: iterable of batches.
      key: PRNG key; batch ``m`` uses ``fold_in(key, m)``, so results are deterministic given ``key``.
      num_samples: label draws ``S`` per example.
      chunk_size: bounds the per-example gradients held at once.
      method: ``"auto"``: per-layer statistics for ``task.outputs`` of a Flax classification task
        (the same estimator, other draws); ``"generic"``: per-example gradients.
    """
    reduction = reductions.sampled_fisher(logits_fn, num_samples, chunk_size, method)
    batches = _checked(batches, None, params, "diag_fisher_sampled")
    return reductions.reduce(reduction, params, batches, key=key).value


def diag_fisher_batch_mean(loss_fn: LossFn, params: Params, batches: Iterable[Batch]) -> Params:
    """Squared mean-batch gradient averaged over batches: ``(1/M) sum_m (mean_{i in m} g_i) ** 2``.

    This is NOT the per-example Fisher: it depends on the batch size (for i.i.d. gradients it is
    roughly ``mean(g) ** 2 + Var(g) / B``) and on which examples share a batch. SSD's reference code
    computes its importances this way; use it only to compare with numbers published from that code,
    and record the batch size and order with the result
    (:func:`unlearn_jax.core.reductions.batch_mean_squared_gradient`).
    """
    reduction = reductions.batch_mean_squared_gradient(loss_fn)
    batches = _checked(batches, loss_fn, params, "diag_fisher_batch_mean")
    return reductions.reduce(reduction, params, batches).value


def hvp(
    loss_fn: LossFn, params: Params, batch: Batch, v: Params, *, chunk_size: int | None = None
) -> Params:
    """Hessian-vector product ``H v`` of the mean batch loss ``L(theta) = (1/B) sum_i l(z_i; theta)``.

    Forward-over-reverse: ``H v = d/dt grad L(theta + t v) |_{t=0}`` (``jax.jvp`` of ``jax.grad``),
    one forward and one backward pass, never forming ``H`` (``[P, P]``).

    Args:
      loss_fn: per-example loss.
      params: the point ``theta`` at which the Hessian is taken.
      batch: the examples of ``L``.
      v: a pytree with the structure and shapes of ``params``.
      chunk_size: if set, the product is summed over sub-batches of this size (bounds memory).

    Returns:
      ``H v``, a pytree like ``params``.
    """
    size = check_loss_fn(loss_fn, params, batch)
    _validate.same_structure(params, v, "params", "v")

    def summed_hvp(sub_batch):
        total_loss = lambda p: jnp.sum(jax.vmap(loss_fn, in_axes=(None, 0))(p, sub_batch))
        return jax.jvp(jax.grad(total_loss), (params,), (v,))[1]

    total = sum_over_chunks(summed_hvp, batch, chunk_size)
    return jax.tree_util.tree_map(lambda t: t / size, total)


OutputLoss = Callable[[jax.Array, Any], jax.Array]


def _output_hessian_product(loss: str | OutputLoss, outputs, tangents, batch):
    """``H_out u`` per example, ``H_out`` the Hessian of the loss w.r.t. the outputs ``[B, K]``."""
    if loss == "cross_entropy":
        # Softmax cross-entropy: H_out = diag(p) - p p^T, independent of the label.
        p = jax.nn.softmax(outputs, axis=-1)
        return p * tangents - p * jnp.sum(p * tangents, axis=-1, keepdims=True)
    if loss == "mse":
        # Half squared error 0.5 * ||f - y||^2: H_out = I.
        return tangents
    if callable(loss):

        def one(o, t, example):
            return jax.jvp(lambda oo: jax.grad(loss)(oo, example), (o,), (t,))[1]

        return jax.vmap(one)(outputs, tangents, batch)
    raise ValueError(
        f"unknown GGN loss {loss!r}; expected 'cross_entropy', 'mse' or a callable "
        "loss(outputs, example) -> scalar."
    )


def ggn_vp(
    outputs_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    batch: Batch,
    v: Params,
    *,
    loss: str | OutputLoss = "cross_entropy",
    chunk_size: int | None = None,
) -> Params:
    """Generalised Gauss-Newton-vector product ``G v = (1/B) sum_i J_i^T H_out,i J_i v``.

    ``J_i = d f_i / d theta`` (``[K, P]``) is the Jacobian of example ``i``'s outputs and ``H_out,i``
    (``[K, K]``) the Hessian of its loss with respect to those outputs. ``G`` is positive
    semi-definite whenever the loss is convex in the outputs (cross-entropy, squared error), which makes
    it the safe curvature for CG on non-convex models. Computed as one JVP (``J v``), a ``[B, K]``
    product with ``H_out`` and one VJP; neither ``J`` nor ``G`` is formed.

    Args:
      outputs_fn: ``outputs_fn(params, example) -> [K]``, the outputs (logits) of ONE example
        (``[T, K]`` for a sequence: ``"cross_entropy"`` then applies per position).
      params: the linearisation point.
      batch: the examples.
      v: a pytree like ``params``.
      loss: ``"cross_entropy"`` (softmax CE on logits: ``H_out = diag(p) - p p^T``), ``"mse"``
        (``0.5 ||f - y||^2``: ``H_out = I``), or a callable ``loss(outputs [K], example) -> scalar``
        whose output Hessian is taken by autodiff.
      chunk_size: if set, summed over sub-batches of this size.

    Returns:
      ``G v``, a pytree like ``params``.
    """
    size = _validate.batch_size(batch)
    _validate.same_structure(params, v, "params", "v")
    example = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), batch)
    out_shape = jax.eval_shape(outputs_fn, params, example).shape
    if len(out_shape) < 1:
        raise TypeError(
            f"outputs_fn must return outputs [K] (or [T, K] per position) for one example, got a "
            f"scalar of shape {out_shape}."
        )

    def summed_ggn(sub_batch):
        f = lambda p: jax.vmap(outputs_fn, in_axes=(None, 0))(p, sub_batch)
        outputs, jv = jax.jvp(f, (params,), (v,))
        h_jv = _output_hessian_product(loss, outputs, jv, sub_batch)
        _, vjp_fn = jax.vjp(f, params)
        return vjp_fn(h_jv)[0]

    total = sum_over_chunks(summed_ggn, batch, chunk_size)
    return jax.tree_util.tree_map(lambda t: t / size, total)
