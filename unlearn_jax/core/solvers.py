"""Inverse Hessian-vector products: solve ``(A + damping I) x = b`` for a matrix-free operator ``A``.

``A`` is given only through ``matvec(v) -> A v`` on pytrees shaped like ``b`` (for example
``lambda v: hvp(loss_fn, params, batch, v)``, or a GGN / Fisher product). Three methods:

* ``"cg"`` -- conjugate gradients on the damped operator. Needs ``A + damping I`` symmetric
  positive definite: use the GGN or Fisher for non-convex models, or enough damping.
* ``"lissa"`` -- the LiSSA recursion of Agarwal et al. as used by Koh & Liang,
  ``h_0 = b``, ``h_{t+1} = b + h_t - (A + damping I) h_t / scale``, ``x = h_T / scale``.
  Its fixed point solves the damped system; it converges when the eigenvalues of
  ``(A + damping I) / scale`` lie in ``(0, 2)``, i.e. ``scale > lambda_max(A + damping I) / 2``.
* ``"dense"`` -- materialises the ``[P, P]`` matrix with ``P`` matrix-vector products and calls
  ``jnp.linalg.solve``. Exact; for small models and for tests.

Failure is data, not an exception: every solve returns an :class:`InverseHVPResult` holding the
solution, the number of iterations, the residual norm ``||(A + damping I) x - b||_2`` (computed with one
extra product, for every method) and whether it met ``tol``. ``throw=True`` raises instead (outside
``jit`` only, since it needs the values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from unlearn_jax import _validate

Params = Any
MatVec = Callable[[Params], Params]

METHODS = ("cg", "lissa", "dense")


class InverseHVPResult(NamedTuple):
    """The outcome of :func:`inverse_hvp`.

    Attributes:
      x: the solution, a pytree like ``b``.
      iterations: iterations run (CG steps, LiSSA recursion steps; 1 for ``dense``).
      residual_norm: ``||(A + damping I) x - b||_2``.
      relative_residual: ``residual_norm / ||b||_2``.
      converged: ``relative_residual <= tol``.
    """

    x: Params
    iterations: jax.Array
    residual_norm: jax.Array
    relative_residual: jax.Array
    converged: jax.Array

    def metrics(self, prefix: str = "ihvp") -> dict[str, jax.Array]:
        """Flat metrics ``{prefix}/iterations``, ``{prefix}/residual_norm``, ... for logging."""
        return {
            f"{prefix}/iterations": self.iterations,
            f"{prefix}/residual_norm": self.residual_norm,
            f"{prefix}/relative_residual": self.relative_residual,
            f"{prefix}/converged": self.converged,
        }


class SolverDidNotConverge(RuntimeError):
    """Raised by ``inverse_hvp(..., throw=True)`` when the residual is above the tolerance."""


def _damped(matvec: MatVec, damping: float) -> MatVec:
    return lambda v: optax.tree.add_scale(matvec(v), damping, v)


def _cg(op: MatVec, b: Params, tol: float, maxiter: int):
    """Conjugate gradients from x0 = 0, stopping when ||r||_2 <= tol * ||b||_2."""
    b_norm = optax.tree.norm(b)
    threshold = tol * b_norm
    x0 = optax.tree.zeros_like(b)

    def cond(state):
        _, _r, _, rr, k = state
        return (k < maxiter) & (jnp.sqrt(rr) > threshold)

    def body(state):
        x, r, p, rr, k = state
        ap = op(p)
        alpha = rr / optax.tree.vdot(p, ap)
        x = optax.tree.add_scale(x, alpha, p)
        r = optax.tree.add_scale(r, -alpha, ap)
        rr_new = optax.tree.vdot(r, r)
        p = optax.tree.add_scale(r, rr_new / rr, p)
        return x, r, p, rr_new, k + 1

    rr0 = optax.tree.vdot(b, b)
    x, *_, k = jax.lax.while_loop(cond, body, (x0, b, b, rr0, jnp.asarray(0)))
    return x, k


def _lissa(op: MatVec, b: Params, tol: float, depth: int, scale: float):
    """LiSSA recursion; stops early when the update ||h_{t+1} - h_t|| / scale <= tol ||b|| / 10."""
    b_norm = optax.tree.norm(b)

    def cond(state):
        _, k, step = state
        return (k < depth) & (step > 0.1 * tol * b_norm)

    def body(state):
        h, k, _ = state
        update = optax.tree.add_scale(b, -1.0 / scale, op(h))
        # h_{t+1} - h_t = b - op(h_t) / scale
        return optax.tree.add(h, update), k + 1, optax.tree.norm(update) / scale

    h, k, _ = jax.lax.while_loop(
        cond, body, (b, jnp.asarray(0), jnp.asarray(jnp.inf, b_norm.dtype))
    )
    return optax.tree.scale(1.0 / scale, h), k


def _dense(op: MatVec, b: Params):
    flat_b, unravel = ravel_pytree(b)
    flat_op = lambda v: ravel_pytree(op(unravel(v)))[0]
    eye = jnp.eye(flat_b.size, dtype=flat_b.dtype)
    # Column j of the matrix is op(e_j); vmap gives the rows op(e_j), i.e. the transpose.
    matrix = jax.vmap(flat_op)(eye).T
    return unravel(jnp.linalg.solve(matrix, flat_b)), jnp.asarray(1)


def inverse_hvp(
    matvec: MatVec,
    b: Params,
    *,
    method: str = "cg",
    damping: float = 0.0,
    tol: float = 1e-5,
    maxiter: int | None = None,
    scale: float = 10.0,
    depth: int = 10_000,
    params_like: Params | None = None,
    throw: bool = False,
) -> InverseHVPResult:
    """Solves ``(A + damping I) x = b`` where ``A v = matvec(v)``.

    Args:
      matvec: ``matvec(v) -> A v`` for pytrees ``v`` shaped like ``b``; ``A`` should be symmetric.
      b: the right-hand side, a pytree (e.g. a gradient).
      method: ``"cg"``, ``"lissa"`` or ``"dense"``.
      damping: ``lambda >= 0`` added to the diagonal. ``cg`` and ``lissa`` need ``lambda > 0``:
        it makes ``A + lambda I`` positive definite for any positive semi-definite ``A``.
      tol: convergence means ``||(A + lambda I) x - b||_2 <= tol * ||b||_2``.
      maxiter: CG iteration cap (default ``10 * size(b)``, at least 100).
      scale: LiSSA's ``s``; must exceed half the largest eigenvalue of ``A + lambda I``.
      depth: LiSSA's maximum recursion depth ``T``.
      params_like: optional pytree whose structure ``b`` must match (e.g. the params), checked
        eagerly so that a mismatched right-hand side fails with a clear message.
      throw: raise :class:`SolverDidNotConverge` when the tolerance was not met (needs concrete values,
        so not inside ``jit``).

    Returns:
      An :class:`InverseHVPResult`.

    Raises:
      ValueError: unknown method, negative damping, or zero damping for ``cg``/``lissa``, a ``b``
        whose structure differs from ``params_like``, non-positive ``tol``/``scale``/``depth``.
    """
    _validate.one_of("inverse_hvp method", method, METHODS)
    _validate.non_negative(damping=damping)
    if method in ("cg", "lissa") and not damping > 0:
        raise ValueError(
            f"damping must be > 0 for method={method!r} (got damping={damping}): it needs a positive "
            "definite operator, and a Hessian is at best semi-definite. Use a small damping such as "
            "1e-3 (relative to the curvature's scale), or method='dense' for an exact undamped solve."
        )
    _validate.positive(tol=tol, scale=scale)
    _validate.positive_int(depth=depth, maxiter=maxiter)
    if params_like is not None:
        _validate.same_structure(params_like, b, "params", "b")
    leaves = jax.tree_util.tree_leaves(b)
    if not leaves:
        raise ValueError("b has no array leaves.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"b must hold floating-point arrays, got dtype {jnp.result_type(leaf)}."
            )
    out = jax.eval_shape(matvec, b)
    _validate.same_structure(jax.eval_shape(lambda: b), out, "b", "matvec(b)")

    op = _damped(matvec, damping)
    if method == "cg":
        size = sum(leaf.size for leaf in leaves)
        x, iterations = _cg(op, b, tol, maxiter or max(100, 10 * size))
    elif method == "lissa":
        x, iterations = _lissa(op, b, tol, depth, scale)
    else:
        x, iterations = _dense(op, b)

    residual = optax.tree.norm(optax.tree.sub(op(x), b))
    relative = residual / jnp.maximum(optax.tree.norm(b), jnp.finfo(leaves[0].dtype).tiny)
    result = InverseHVPResult(x, iterations, residual, relative, relative <= tol)
    if throw and not bool(result.converged):
        raise SolverDidNotConverge(
            f"inverse_hvp(method={method!r}) stopped after {int(iterations)} iterations with relative "
            f"residual {float(relative):.3e} > tol={tol}. Increase maxiter/depth, increase damping, "
            "or (LiSSA) increase scale so that (A + damping I) / scale has eigenvalues in (0, 2)."
        )
    return result
