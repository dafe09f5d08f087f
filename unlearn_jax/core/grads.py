"""Per-example gradients and their norms, vectorised with ``vmap`` and chunked to bound memory.

Conventions (shared by the whole numerical core):

* ``loss_fn(params, example) -> scalar`` is the loss of ONE example. An example is any pytree of
  arrays without a batch axis; a batch is the same pytree with a leading batch axis ``B`` on every leaf.
* ``params`` is any pytree of inexact arrays.
* ``chunk_size=k`` processes the batch ``k`` examples at a time, so peak memory holds ``k``
  per-example gradients and activations instead of ``B``. Results are the same as unchunked up to
  floating-point summation order.
* ``strategy`` says how the vectorised computation is handed to XLA: ``"vmap"`` traces it as
  written; ``"rewrite"`` first applies three exact rewrites to its jaxpr (below) that XLA's CPU
  backend does not find itself; ``"auto"`` (the default) is ``"rewrite"`` when JAX's default backend
  is the CPU and ``"vmap"`` elsewhere, where the rewrites have not been measured. On the CPU,
  ``"auto"`` without a ``chunk_size`` also processes the batch in chunks of 32 when one example's
  intermediate values outweigh its output (conv nets; never when it would raise peak memory), since
  chunks that stay in the cache run up to 2x faster (:func:`auto_chunk_size`).

The rewrites, what they buy and how to switch them off: :mod:`unlearn_jax.core.cpu_rewrites`.

Everything here is pure and jit-able, and works on params and batches that carry shardings
(``jax.sharding.NamedSharding``): the batch axis of ``vmap`` follows the sharding of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from unlearn_jax import _validate
from unlearn_jax.core.cpu_rewrites import auto_chunk_size, use_rewrite, with_strategy
from unlearn_jax.core.task import flax_task_of

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


def chunked_map(
    fn: Callable[[Batch], Any], batch: Batch, chunk_size: int | None, *, strategy: str = "auto"
) -> Any:
    """``vmap(fn)(batch)`` computed ``chunk_size`` examples at a time (``None``: all at once).

    When ``chunk_size`` divides ``B``, chunk ``j`` holds the examples ``j, j + n, j + 2n, ...``
    (``n = B / chunk_size``; :func:`optax.microbatching.reshape_batch_axis`'s column-major split), so
    a batch sharded over a mesh's data axis keeps every chunk spread over all of its devices; the
    chunks run in a ``lax.map``. Otherwise the chunks are contiguous and run in a ``fori_loop`` that
    writes each chunk's results in place into the output ``[B, ...]``, the last chunk being the last
    ``chunk_size`` examples, overlapping the previous one, so every chunk has the same shape (one
    trace, and no concatenation, which would copy the whole output).

    Args:
      fn: maps one example to a pytree of arrays.
      batch: a pytree of arrays with a leading batch axis ``B``.
      chunk_size: examples per vectorised call, or ``None`` for all ``B`` at once; except that
        ``strategy="auto"`` on the CPU may then pick chunks of 32 for speed (only where they also
        lower peak memory: when the intermediate values of one example outweigh its output).
      strategy: ``"auto"``, ``"vmap"`` or ``"rewrite"``; see the module docstring.

    Returns:
      ``fn``'s output with a leading axis ``B`` on every leaf.
    """
    _validate.positive_int(chunk_size=chunk_size)
    size = _validate.batch_size(batch)
    vectorised = with_strategy(jax.vmap(fn), strategy)
    if chunk_size is None and strategy == "auto" and use_rewrite(strategy):
        chunk_size = auto_chunk_size(fn, batch, size)
    if chunk_size is None or chunk_size >= size:
        return vectorised(batch)
    if size % chunk_size == 0:
        chunks = optax.microbatching.reshape_batch_axis(batch, chunk_size)  # [n, chunk, ...]
        outs = lax.map(vectorised, chunks)
        # Undo the column-major split: example j + n * i sits at [j, i].
        return jax.tree_util.tree_map(
            lambda o: jnp.swapaxes(o, 0, 1).reshape((size, *o.shape[2:])), outs
        )
    n_chunks = -(-size // chunk_size)

    def chunk_at(start):
        return jax.tree_util.tree_map(
            lambda a: lax.dynamic_slice_in_dim(a, start, chunk_size), batch
        )

    out_shape = jax.eval_shape(vectorised, chunk_at(0))
    out = jax.tree_util.tree_map(lambda s: jnp.zeros((size, *s.shape[1:]), s.dtype), out_shape)

    def write_chunk(i, out):
        start = jnp.minimum(i * chunk_size, size - chunk_size)
        values = vectorised(chunk_at(start))
        return jax.tree_util.tree_map(
            lambda o, v: lax.dynamic_update_slice_in_dim(o, v, start, 0), out, values
        )

    return lax.fori_loop(0, n_chunks, write_chunk, out)


def sum_over_chunks(
    batch_total: Callable[[Batch], Any],
    batch: Batch,
    chunk_size: int | None,
    *,
    strategy: str = "auto",
) -> Any:
    """``batch_total(batch)`` for a function that SUMS over its batch, taken ``chunk_size`` at a time.

    ``batch_total(sub_batch)`` must return the sum over the examples of ``sub_batch`` of some pytree
    (e.g. summed squared gradients, or the Hessian-vector product of a summed loss), so that the sum
    over the chunks equals the sum over the whole batch. Chunks are accumulated in a ``lax.scan``.
    When ``chunk_size`` divides ``B`` they are strided (chunk ``j`` holds examples ``j, j + n, ...``,
    :func:`optax.microbatching.reshape_batch_axis`), so a sharded batch keeps every chunk spread over
    its devices; otherwise contiguous, the final partial chunk (``B mod chunk_size`` examples) added
    after the scan, so no padding example ever enters the sum. ``strategy`` (``"auto"``, ``"vmap"``,
    ``"rewrite"``; see the module docstring) applies to ``batch_total``.
    """
    _validate.positive_int(chunk_size=chunk_size)
    size = _validate.batch_size(batch)
    batch_total = with_strategy(batch_total, strategy)
    chunk = size if chunk_size is None else min(chunk_size, size)
    if chunk < size and size % chunk == 0:
        chunks = optax.microbatching.reshape_batch_axis(batch, chunk)
        first = batch_total(jax.tree_util.tree_map(lambda a: a[0], chunks))
        rest = jax.tree_util.tree_map(lambda a: a[1:], chunks)
        total, _ = jax.lax.scan(
            lambda acc, b: (jax.tree_util.tree_map(jnp.add, acc, batch_total(b)), None), first, rest
        )
        return total
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


def chunked_sum(
    fn: Callable[[Any], Any], batch: Batch, chunk_size: int | None, *, strategy: str = "auto"
) -> Any:
    """``sum_i fn(batch_i)`` over the examples of a batch, vectorising ``chunk_size`` at a time.

    Returns:
      A pytree shaped like ``fn``'s output for one example.
    """

    def chunk_total(b):
        return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), jax.vmap(fn)(b))

    return sum_over_chunks(chunk_total, batch, chunk_size, strategy=strategy)


def per_example_grads(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> Params:
    """Gradients of the loss of every example of a batch, ``g_i = d loss_fn(params, z_i) / d params``.

    Computed as ``vmap(grad(loss_fn))`` over the batch, optionally in chunks, with the exact jaxpr
    rewrites of the module docstring under ``strategy="rewrite"`` (the default on the CPU).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example.
      params: a pytree of parameters with leaves ``[*shape]``.
      batch: a pytree of arrays with a leading batch axis ``B``.
      chunk_size: if set, computes ``chunk_size`` examples at a time (bounds peak memory: the output
        ``[B, *shape]`` plus one chunk's activations and gradients).
      strategy: ``"auto"`` (default), ``"vmap"`` or ``"rewrite"``; see the module docstring.

    Returns:
      A pytree like ``params`` whose leaves have shape ``[B, *shape]``.

    Raises:
      ValueError: an empty batch, leaves that disagree on the batch size, or an unknown strategy.
      TypeError: ``loss_fn`` returns a non-scalar.

    Guarantees:
      Exact: every strategy and chunk size computes each ``g_i`` by the same operations on the same
      values as ``jax.grad(loss_fn)(params, z_i)``, up to floating-point summation order inside
      XLA's kernels (and, for overlapping pooling windows, the order in which they add up).
    """
    check_loss_fn(loss_fn, params, batch)
    grad_fn = jax.grad(loss_fn)
    return chunked_map(
        lambda example: grad_fn(params, example), batch, chunk_size, strategy=strategy
    )


def per_example_grad_norms(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    strategy: str = "auto",
    method: str = "auto",
) -> jax.Array:
    """L2 norms ``||g_i||_2`` of the per-example gradients over ALL parameters, shape ``[B]``.

    With ``method="auto"`` and ``loss_fn`` the ``loss`` of a Flax task, the norms come from per-layer
    captures without forming any per-example gradient (the "ghost norm" ``||a_i|| ||d_i||`` of a
    dense layer, Gram forms for sequences and convolutions:
    :func:`unlearn_jax.core.layer_stats.per_example_norms`). Otherwise (``method="generic"``) with
    ``chunk_size`` set, only ``chunk_size`` gradients exist at any time: each chunk's gradients are
    reduced to norms before the next chunk is formed. ``strategy`` is as in
    :func:`per_example_grads`.
    """
    _validate.one_of("method", method, ("auto", "generic"))
    check_loss_fn(loss_fn, params, batch)
    model = flax_task_of(loss_fn) if method == "auto" else None
    if model is not None:
        from unlearn_jax.core import layer_stats  # local: layer_stats builds on this module

        return layer_stats.per_example_norms(
            model, params, batch, chunk_size=chunk_size, strategy=strategy
        )
    grad_fn = jax.grad(loss_fn)
    return chunked_map(
        lambda example: optax.tree.norm(grad_fn(params, example)),
        batch,
        chunk_size,
        strategy=strategy,
    )


def mean_grad(loss_fn: LossFn, params: Params, batch: Batch, *, strategy: str = "auto") -> Params:
    """The gradient of the mean batch loss ``(1/B) sum_i g_i`` (one ordinary backward pass).

    ``strategy`` is as in :func:`per_example_grads` (the max-pooling rewrite also speeds up this
    ordinary backward pass on the CPU).
    """
    check_loss_fn(loss_fn, params, batch)

    def mean_loss_grad(p, b):
        return jax.grad(lambda q: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(q, b)))(p)

    return with_strategy(mean_loss_grad, strategy)(params, batch)
