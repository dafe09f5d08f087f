"""Exact jaxpr rewrites that make per-example work fast on XLA:CPU (``strategy="rewrite"``).

What they buy. XLA's CPU backend misses three reorderings that matter for vectorised per-example
work. Measured with ``scripts/bench_core.py`` (batch 256, a shared 2-core x86 VM, medians of
interleaved runs; its header has the table): per-example gradients of a 784-512-10 MLP take 2.5x less
time with the rewrites (230 -> 92 ms), the time of writing their 400 MB once, and 0.8-0.9x the time
of ``torch.func``; those of a two-conv max-pool CNN 1.6x less all at once (121 -> 75 ms) and 2x less
in the automatic chunks (60 ms; 0.7-0.95x ``torch.func``), while plain ``vmap`` in chunks of 32 takes
10x that (610 ms: rewrite 3).

How to switch them off. Every function of :mod:`unlearn_jax.core.grads` takes ``strategy=``:
``"vmap"`` traces the computation as written, ``"rewrite"`` always rewrites, and ``"auto"`` (the
default) rewrites when JAX's default backend is the CPU only (elsewhere they have not been measured).
Nothing here is global state: the choice is per call.

The rewrites (:func:`_rewritten`) change the order and layout of the work, not the arithmetic (save
the order in which overlapping pooling windows add up):

1. ``transpose(dot_general(a, b))`` whose permutation only swaps the free dimensions of ``a`` and
   ``b`` becomes ``dot_general(b, a)``. The per-example weight gradient of a dense layer is such an
   outer product (``vmap`` of JAX's ``dot_general`` transpose rule), and XLA:CPU computes it in the
   wrong order and then copies all of it, ``B * d_in * d_out`` floats, a second time.
2. ``select_and_scatter_add`` (the backward pass of max/min pooling) becomes strided slices, an
   unrolled first-maximum selection in XLA's window order (the same element is chosen, ties and NaNs
   included), and strided pads. XLA:CPU expands the primitive into a scatter with five-dimensional
   index arrays, which costs more than the rest of a small CNN's backward pass.
3. ``conv_general_dilated`` gets explicit transposes to the ``NHWC/HWIO/NHWC`` layouts. Inside the
   loop of a chunked computation XLA:CPU otherwise leaves the transposed kernels of the backward pass
   to a generic convolution 10-30x slower than its fast (YNNPACK) path.

Measured with ``scripts/bench_core.py`` (batch 256, a shared 2-core x86 VM, medians of interleaved
runs; its header has the table): per-example gradients of a 784-512-10 MLP take 2.5x less time with
the rewrites (230 -> 92 ms), the time of writing their 400 MB once, and 0.8-0.9x the time of
``torch.func``; those of a two-conv max-pool CNN 1.6x less all at once (121 -> 75 ms) and 2x less
in the automatic chunks (60 ms; 0.7-0.95x ``torch.func``), while plain ``vmap`` in chunks of 32
takes 10x that (610 ms: rewrite 3).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from unlearn_jax import _validate

Batch = Any

STRATEGIES = ("auto", "vmap", "rewrite")

# Windows of more elements than this keep XLA's select_and_scatter: the rewrite unrolls the window.
_MAX_UNROLLED_WINDOW = 64
# Chunk size of strategy="auto" without a chunk_size, when chunks pay (see auto_chunk_size).
_AUTO_CHUNK = 32


def use_rewrite(strategy: str) -> bool:
    _validate.one_of("strategy", strategy, STRATEGIES)
    if strategy == "auto":
        return jax.default_backend() == "cpu"
    return strategy == "rewrite"


def with_strategy(fn: Callable, strategy: str) -> Callable:
    """``fn`` itself, or ``fn`` with its jaxpr rewritten (:func:`_rewritten`), per ``strategy``."""
    return _rewritten(fn) if use_rewrite(strategy) else fn


def _rewritten(fn: Callable) -> Callable:
    """``fn`` traced to a jaxpr, which is then evaluated with the exact rewrites of the module doc.

    Every other equation is bound unchanged, as :func:`jax.core.eval_jaxpr` would; the equations of
    ``jit`` calls without explicit shardings are evaluated inline so that their contents are
    rewritten too. Other higher-order primitives (``scan``, ``cond``, ``custom_jvp_call``, ...) are
    bound unchanged, contents included.
    """

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval_rewritten(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return wrapped


def _is_literal(atom) -> bool:
    return isinstance(atom, jex_core.Literal)


def _bind(primitive, invals, params):
    bind_params = primitive.get_bind_params(params)
    # Older JAX versions return (subfuns, params) here.
    subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    out = primitive.bind(*subfuns, *invals, **bind_params)
    return out if primitive.multiple_results else [out]


def _folded_transposes(jaxpr) -> dict:
    """``{id(transpose equation): (dot_general equation, swapped dimension numbers)}`` for rewrite 1.

    A ``dot_general`` read only by a ``transpose`` that swaps its free dimensions: both become one
    ``dot_general`` with swapped operands, evaluated where the transpose was.
    """
    uses: dict = {}
    for atom in itertools.chain((v for e in jaxpr.eqns for v in e.invars), jaxpr.outvars):
        if not _is_literal(atom):
            uses[atom] = uses.get(atom, 0) + 1
    single_use_dots = {
        e.outvars[0]: e
        for e in jaxpr.eqns
        if e.primitive.name == "dot_general" and uses.get(e.outvars[0]) == 1
    }
    folded = {}
    for e in jaxpr.eqns:
        if e.primitive.name == "transpose" and e.invars[0] in single_use_dots:
            dot = single_use_dots[e.invars[0]]
            swapped = _swapped_dot_dimension_numbers(dot, e.params["permutation"])
            if swapped is not None:
                folded[id(e)] = (dot, swapped)
    return folded


def _eval_rewritten(jaxpr, consts, args) -> list:
    env = {}

    def read(atom):
        return atom.val if _is_literal(atom) else env[atom]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    folded = _folded_transposes(jaxpr)
    skipped = {id(dot) for dot, _ in folded.values()}
    for eqn in jaxpr.eqns:
        if id(eqn) in skipped:
            continue
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
        with ctx if ctx is not None else contextlib.nullcontext():
            if id(eqn) in folded:
                dot, swapped = folded[id(eqn)]
                lhs, rhs = (read(v) for v in dot.invars)
                params = dict(dot.params, dimension_numbers=swapped)
                if isinstance(params.get("precision"), tuple):
                    params["precision"] = params["precision"][::-1]
                out = _bind(dot.primitive, [rhs, lhs], params)
            else:
                out = _eval_equation(eqn, [read(v) for v in eqn.invars])
        for var, value in zip(eqn.outvars, out, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _inlined(eqn) -> bool:
    """Whether ``eqn`` is a ``jit`` call whose contents are evaluated (and rewritten) inline."""
    params = eqn.params
    return eqn.primitive.name in ("pjit", "jit") and not any(
        isinstance(s, jax.sharding.Sharding)
        for s in (*params.get("in_shardings", ()), *params.get("out_shardings", ()))
    )


def _nbytes(aval) -> int:
    if not hasattr(aval, "shape"):  # tokens
        return 0
    return int(np.prod(aval.shape)) * aval.dtype.itemsize  # PRNG key dtypes have an itemsize too


def _intermediate_bytes(jaxpr) -> int:
    """Bytes of the values ``jaxpr`` computes besides its outputs, after rewrite 1 (a folded dot
    leaves no intermediate); ``jit`` calls count their contents, other higher-order primitives their
    outputs only."""
    folded = _folded_transposes(jaxpr)
    skipped = {id(dot) for dot, _ in folded.values()}
    outputs = {v for v in jaxpr.outvars if not _is_literal(v)}
    total = 0
    for eqn in jaxpr.eqns:
        if id(eqn) in skipped:
            continue
        if _inlined(eqn):
            total += _intermediate_bytes(eqn.params["jaxpr"].jaxpr)
        total += sum(_nbytes(v.aval) for v in eqn.outvars if v not in outputs)
    return total


def auto_chunk_size(fn: Callable, batch: Batch, size: int) -> int | None:
    """The chunk size ``strategy="auto"`` uses when none is given: ``_AUTO_CHUNK`` when the values
    ``fn`` computes for one example (activations, and their gradients) outweigh its output, else
    ``None``.

    Chunks keep those values in the cache, at the price of one more pass over the output (XLA
    zero-fills the ``[B, ...]`` buffer the chunks are written into). Measured on the CPU at batch
    256 (``scripts/bench_core.py``): a two-conv CNN (0.6 MB of intermediates per example, 80 kB of
    gradient) runs 1.5-2.5x faster in chunks of 8-64; a 784-512-10 MLP (13 kB of intermediates,
    1.6 MB of gradient) 10-30% slower; the gradient norms of that MLP 10x faster.
    """
    if size < 2 * _AUTO_CHUNK or jax.device_count() > 1:  # a sharded batch keeps its layout
        return None
    example = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), batch)
    jaxpr = jax.make_jaxpr(fn)(example).jaxpr
    out_bytes = sum(_nbytes(v.aval) for v in jaxpr.outvars)
    return _AUTO_CHUNK if _intermediate_bytes(jaxpr) > out_bytes else None


def _eval_equation(eqn, invals) -> list:
    name, params = eqn.primitive.name, eqn.params
    if name == "select_and_scatter_add" and _select_and_scatter_add_applies(eqn):
        return [_select_and_scatter_add(*invals, **params)]
    if name == "conv_general_dilated" and params.get("out_sharding") is None:
        return [_conv_in_canonical_layout(eqn, *invals)]
    if _inlined(eqn):
        inner = params["jaxpr"]
        return _eval_rewritten(inner.jaxpr, inner.consts, invals)
    return _bind(eqn.primitive, invals, params)


def _swapped_dot_dimension_numbers(dot, permutation):
    """Dimension numbers of ``dot_general(rhs, lhs)`` if it equals ``transpose(dot, permutation)``.

    ``dot_general`` lays its output out as (batch dims, free dims of lhs, free dims of rhs); with the
    operands swapped it is (batch, free of rhs, free of lhs), which is the transpose exactly when
    ``permutation`` keeps the batch dims first and swaps the two blocks of free dims.
    """
    if dot.params.get("out_sharding") is not None:
        return None
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dot.params["dimension_numbers"]
    lhs, rhs = dot.invars
    n_batch = len(lhs_batch)
    n_lhs = lhs.aval.ndim - n_batch - len(lhs_contract)
    n_rhs = rhs.aval.ndim - n_batch - len(rhs_contract)
    blocks = (range(n_batch), range(n_batch + n_lhs, n_batch + n_lhs + n_rhs))
    swapped = tuple(itertools.chain(*blocks, range(n_batch, n_batch + n_lhs)))
    if n_lhs == 0 or n_rhs == 0 or tuple(permutation) != swapped:
        return None
    return ((rhs_contract, lhs_contract), (rhs_batch, lhs_batch))


def _select_and_scatter_add_applies(eqn) -> bool:
    operand = eqn.invars[1].aval
    return (
        eqn.params["select_prim"] in (lax.ge_p, lax.le_p)
        and jnp.issubdtype(operand.dtype, jnp.floating)
        and int(np.prod(eqn.params["window_dimensions"])) <= _MAX_UNROLLED_WINDOW
    )


def _select_and_scatter_add(
    source, operand, *, select_prim, window_dimensions, window_strides, padding, **unused
):
    r"""XLA's ``select_and_scatter_add`` written with slices, selects and pads.

    For every window ``w`` of ``operand`` (shape ``[*S]``, ``source`` has one element per window,
    shape ``[*N]``), the element chosen by scanning the window in row-major order and keeping the
    current choice ``c`` over a candidate ``v`` while ``select_prim(c, v)`` (``ge``: the first maximum)
    receives ``source[w]``; overlapping windows add their contributions. Padding is filled with the
    identity of the selection (``-inf`` for ``ge``), as JAX's own CPU and GPU lowerings do.

    The selection makes the same comparisons in the same order as the primitive, so the chosen
    elements (ties and NaNs included) are the same; where windows overlap, the contributions are
    summed in window-offset order.
    """
    del unused
    strides, sizes = tuple(window_strides), tuple(window_dimensions)
    padded = operand
    if any(lo or hi for lo, hi in padding):
        identity = -jnp.inf if select_prim is lax.ge_p else jnp.inf
        padded = lax.pad(
            operand, jnp.asarray(identity, operand.dtype), [(lo, hi, 0) for lo, hi in padding]
        )
    counts = source.shape

    def at_offset(offset):  # [*N]: the element at `offset` of every window
        limits = [o + (n - 1) * s + 1 for o, n, s in zip(offset, counts, strides, strict=True)]
        return lax.slice(padded, offset, limits, strides)

    offsets = list(np.ndindex(*sizes))
    chosen, choice = at_offset(offsets[0]), jnp.zeros(counts, jnp.int32)
    for k, offset in enumerate(offsets[1:], start=1):
        candidate = at_offset(offset)
        keep = select_prim.bind(chosen, candidate)
        chosen = lax.select(keep, chosen, candidate)
        choice = lax.select(keep, choice, jnp.full(counts, k, jnp.int32))
    zero = jnp.zeros((), source.dtype)
    total = None
    for k, offset in enumerate(offsets):
        part = lax.select(choice == k, source, jnp.zeros_like(source))
        config = [
            (o, size - o - (n - 1) * s - 1, s - 1)
            for o, n, s, size in zip(offset, counts, strides, padded.shape, strict=True)
        ]
        placed = lax.pad(part, zero, config)
        total = placed if total is None else total + placed
    if padded is not operand:
        starts = [lo for lo, _ in padding]
        total = lax.slice(
            total, starts, [lo + n for lo, n in zip(starts, operand.shape, strict=True)]
        )
    return total


def _conv_in_canonical_layout(eqn, lhs, rhs):
    """The convolution of ``eqn`` on operands transposed to ``N...C`` / ``...IO``, result transposed back.

    Only the layout changes: the dimension numbers are permuted with the arrays, so the arithmetic is
    the same; transposes that would be identities are not emitted.
    """
    params = dict(eqn.params)
    dims = params["dimension_numbers"]
    n = lhs.ndim - 2
    identity = tuple(range(n + 2))
    lhs_perm = (dims.lhs_spec[0], *dims.lhs_spec[2:], dims.lhs_spec[1])
    rhs_perm = (*dims.rhs_spec[2:], dims.rhs_spec[1], dims.rhs_spec[0])
    activation_spec = (0, n + 1, *range(1, n + 1))
    params["dimension_numbers"] = lax.ConvDimensionNumbers(
        activation_spec, (n + 1, n, *range(n)), activation_spec
    )
    if lhs_perm != identity:
        lhs = lax.transpose(lhs, lhs_perm)
    if rhs_perm != identity:
        rhs = lax.transpose(rhs, rhs_perm)
    (out,) = _bind(eqn.primitive, [lhs, rhs], params)
    canonical_axis = {dims.out_spec[0]: 0, dims.out_spec[1]: n + 1}
    canonical_axis.update({a: 1 + i for i, a in enumerate(dims.out_spec[2:])})
    out_perm = tuple(canonical_axis[a] for a in range(n + 2))
    return out if out_perm == identity else lax.transpose(out, out_perm)


__all__ = ["STRATEGIES", "auto_chunk_size", "use_rewrite", "with_strategy"]
