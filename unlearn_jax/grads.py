"""Per-example gradients and their norms, vectorised with ``vmap`` and chunked to bound memory.

Conventions (shared by the whole numerical core):

* ``loss_fn(params, example) -> scalar`` is the loss of ONE example. An example is any pytree of
  arrays without a batch axis; a batch is the same pytree with a leading batch axis ``B`` on every leaf.
* ``params`` is any pytree of inexact arrays.
* ``chunk_size=k`` processes the batch ``k`` examples at a time (the last chunk may be smaller), so
  peak memory holds ``k`` per-example gradients and activations instead of ``B``. Results are the same
  as unchunked up to floating-point summation order.

Everything here is pure and jit-able, and works on params and batches that carry shardings
(``jax.sharding.NamedSharding``): the batch axis of ``vmap`` follows the sharding of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate

Params = Any
Batch = Any
LossFn = Callable[[Params, Any], jax.Array]


def check_loss_fn(loss_fn: LossFn, params: Params, batch: Batch, name: str = "batch") -> int:
    """Validates a per-example loss against ``params`` and a batch; returns the batch size ``B``.

    Raises:
      ValueError: if the batch is empty or its leaves disagree on the batch size.
      TypeError: if ``loss_fn`` does not return a scalar for one example.
    """
    size = _validate.batch_size(batch, name)
    example = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), batch)
    out = jax.eval_shape(loss_fn, params, example)
    _validate.scalar_output(out, getattr(loss_fn, "__name__", "loss_fn"))
    return size


def chunked_map(fn: Callable[[Batch], Any], batch: Batch, chunk_size: int | None) -> Any:
    """``vmap(fn)(batch)`` computed ``chunk_size`` examples at a time (``None``: all at once).

    A thin wrapper over ``jax.lax.map(..., batch_size=chunk_size)``, which runs full chunks in a
    sequential loop and the remainder as one more vectorised call.
    """
    _validate.positive_int(chunk_size=chunk_size)
    size = _validate.batch_size(batch)
    if chunk_size is None or chunk_size >= size:
        return jax.vmap(fn)(batch)
    return jax.lax.map(fn, batch, batch_size=chunk_size)


def sum_over_chunks(
    batch_total: Callable[[Batch], Any], batch: Batch, chunk_size: int | None
) -> Any:
    """``batch_total(batch)`` for a function that SUMS over its batch, taken ``chunk_size`` at a time.

    ``batch_total(sub_batch)`` must return the sum over the examples of ``sub_batch`` of some pytree
    (e.g. summed squared gradients, or the Hessian-vector product of a summed loss), so that the sum
    over the chunks equals the sum over the whole batch. Full chunks are accumulated in a
    ``lax.scan``; the final partial chunk (``B mod chunk_size`` examples) is added after it, so no
    padding example ever enters the sum.
    """
    _validate.positive_int(chunk_size=chunk_size)
    size = _validate.batch_size(batch)
    chunk = size if chunk_size is None else min(chunk_size, size)
    n_full, remainder = divmod(size, chunk)
    head = jax.tree_util.tree_map(
        lambda a: a[: n_full * chunk].reshape((n_full, chunk, *a.shape[1:])), batch
    )
    total = batch_total(jax.tree_util.tree_map(lambda a: a[0], head))
    if n_full > 1:
        rest = jax.tree_util.tree_map(lambda a: a[1:], head)
        total, _ = jax.lax.scan(
            lambda acc, b: (jax.tree_util.tree_map(jnp.add, acc, batch_total(b)), None), total, rest
        )
    if remainder:
        tail = jax.tree_util.tree_map(lambda a: a[n_full * chunk :], batch)
        total = jax.tree_util.tree_map(jnp.add, total, batch_total(tail))
    return total


def chunked_sum(fn: Callable[[Any], Any], batch: Batch, chunk_size: int | None) -> Any:
    """``sum_i fn(batch_i)`` over the examples of a batch, vectorising ``chunk_size`` at a time.

    Returns:
      A pytree shaped like ``fn``'s output for one example.
    """

    def chunk_total(b):
        return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), jax.vmap(fn)(b))

    return sum_over_chunks(chunk_total, batch, chunk_size)


def per_example_grads(
    loss_fn: LossFn, params: Params, batch: Batch, *, chunk_size: int | None = None
) -> Params:
    """Gradients of the loss of every example of a batch, ``g_i = d loss_fn(params, z_i) / d params``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example.
      params: a pytree of parameters with leaves ``[*shape]``.
      batch: a pytree of arrays with a leading batch axis ``B``.
      chunk_size: if set, computes ``chunk_size`` examples at a time (bounds peak memory).

    Returns:
      A pytree like ``params`` whose leaves have shape ``[B, *shape]``.

    Raises:
      ValueError: an empty batch, or leaves that disagree on the batch size.
      TypeError: ``loss_fn`` returns a non-scalar.
    """
    check_loss_fn(loss_fn, params, batch)
    grad_fn = jax.grad(loss_fn)
    return chunked_map(lambda example: grad_fn(params, example), batch, chunk_size)


def per_example_grad_norms(
    loss_fn: LossFn, params: Params, batch: Batch, *, chunk_size: int | None = None
) -> jax.Array:
    """L2 norms ``||g_i||_2`` of the per-example gradients over ALL parameters, shape ``[B]``.

    With ``chunk_size`` set, only ``chunk_size`` gradients exist at any time: each chunk's gradients
    are reduced to norms before the next chunk is formed.
    """
    check_loss_fn(loss_fn, params, batch)
    grad_fn = jax.grad(loss_fn)
    return chunked_map(lambda example: optax.tree.norm(grad_fn(params, example)), batch, chunk_size)


def mean_grad(loss_fn: LossFn, params: Params, batch: Batch) -> Params:
    """The gradient of the mean batch loss ``(1/B) sum_i g_i`` (one ordinary backward pass)."""
    check_loss_fn(loss_fn, params, batch)
    return jax.grad(lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)))(params)
