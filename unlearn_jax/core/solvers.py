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
extra product, for every method), whether it met ``tol``, and whether CG broke down on a direction of
non-positive curvature (an operator that is not positive definite: reported, never divided by).
``throw=True`` raises instead (outside ``jit`` only, since it needs the values).

Everything is jittable and works on pytrees (no path ravels the parameters, save the dense solve that
exists for small models and tests); ``damping`` and LiSSA's ``scale`` may be traced arrays, so one
compiled solve serves every value; :func:`inverse_hvp_many` solves several right-hand sides together
(a leading axis on ``b``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
      breakdown: CG met a direction ``p`` with ``p^T (A + damping I) p <= 0`` (or not finite) and
        stopped before dividing by it: the damped operator is not positive definite. Always False
        for LiSSA and the dense solve.
    """

    x: Params
    iterations: jax.Array
    residual_norm: jax.Array
    relative_residual: jax.Array
    converged: jax.Array
    breakdown: jax.Array

    def metrics(self, prefix: str = "ihvp") -> dict[str, jax.Array]:
        """Flat metrics ``{prefix}/iterations``, ``{prefix}/residual_norm``, ... for logging."""
        return {
            f"{prefix}/iterations": self.iterations,
            f"{prefix}/residual_norm": self.residual_norm,
            f"{prefix}/relative_residual": self.relative_residual,
            f"{prefix}/converged": self.converged,
            f"{prefix}/breakdown": self.breakdown,
        }


class SolverDidNotConverge(RuntimeError):
    """Raised by ``inverse_hvp(..., throw=True)`` when the residual is above the tolerance."""


def _damped(matvec: MatVec, damping) -> MatVec:
    return lambda v: optax.tree.add_scale(matvec(v), damping, v)


def _cg(op: MatVec, b: Params, tol: float, maxiter: int):
    """Conjugate gradients from x0 = 0, stopping when ``||r||_2 <= tol * ||b||_2`` or on breakdown.

    Breakdown: a search direction with ``p^T op(p) <= 0`` (or NaN) means the operator is not
    positive definite; the iteration stops with the current ``x`` and reports it.
    """
    b_norm = optax.tree.norm(b)
    threshold = tol * b_norm
    x0 = optax.tree.zeros_like(b)

    def cond(state):
        _, _r, _, rr, k, broke = state
        return (k < maxiter) & (jnp.sqrt(rr) > threshold) & ~broke

    def body(state):
        x, r, p, rr, k, _ = state
        ap = op(p)
        curvature = optax.tree.vdot(p, ap)
        broke = ~(curvature > 0)  # also True for NaN
        alpha = jnp.where(broke, 0.0, rr / jnp.where(broke, 1.0, curvature))
        x = optax.tree.add_scale(x, alpha, p)
        r = optax.tree.add_scale(r, -alpha, ap)
        rr_new = jnp.where(broke, rr, optax.tree.vdot(r, r))
        p = optax.tree.add_scale(r, rr_new / jnp.where(rr > 0, rr, 1.0), p)
        return x, r, p, rr_new, k + jnp.where(broke, 0, 1), broke

    rr0 = optax.tree.vdot(b, b)
    init = (x0, b, b, rr0, jnp.asarray(0), jnp.asarray(False))
    x, *_, k, broke = jax.lax.while_loop(cond, body, init)
    return x, k, broke


def _lissa(op: MatVec, b: Params, tol: float, depth: int, scale):
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
    return optax.tree.scale(1.0 / scale, h), k, jnp.asarray(False)


def _dense(op: MatVec, b: Params):
    flat_b, unravel = ravel_pytree(b)
    flat_op = lambda v: ravel_pytree(op(unravel(v)))[0]
    eye = jnp.eye(flat_b.size, dtype=flat_b.dtype)
    # Column j of the matrix is op(e_j); vmap gives the rows op(e_j), i.e. the transpose.
    matrix = jax.vmap(flat_op)(eye).T
    return unravel(jnp.linalg.solve(matrix, flat_b)), jnp.asarray(1), jnp.asarray(False)


def _is_concrete_number(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_damping(method: str, damping) -> None:
    """Concrete dampings are checked (>= 0, and > 0 for cg/lissa); traced ones are the caller's."""
    if not _is_concrete_number(damping):
        return
    value = np.asarray(damping)
    if value.shape != ():
        raise ValueError(f"damping must be a scalar, got shape {value.shape}.")
    value = float(value)
    _validate.non_negative(damping=value)
    if method in ("cg", "lissa") and not value > 0:
        raise ValueError(
            f"damping must be > 0 for method={method!r} (got damping={value}): it needs a positive "
            "definite operator, and a Hessian is at best semi-definite. Use a small damping such as "
            "1e-3 (relative to the curvature's scale), or method='dense' for an exact undamped solve."
        )


def inverse_hvp(
    matvec: MatVec,
    b: Params,
    *,
    method: str = "cg",
    damping: float | jax.Array = 0.0,
    tol: float = 1e-5,
    maxiter: int | None = None,
    scale: float | jax.Array = 10.0,
    depth: int = 10_000,
    params_like: Params | None = None,
    throw: bool = False,
) -> InverseHVPResult:
    """Solves ``(A + damping I) x = b`` where ``A v = matvec(v)``.

    Args:
      matvec: ``matvec(v) -> A v`` for pytrees ``v`` shaped like ``b``; ``A`` should be symmetric.
      b: the right-hand side, a pytree (e.g. a gradient).
      method: ``"cg"``, ``"lissa"`` or ``"dense"``.
      damping: ``lambda >= 0`` added to the diagonal; a Python number or an array (traced values
        are allowed: one compilation then serves every damping; they are not validated). ``cg`` and
        ``lissa`` need ``lambda > 0`` unless ``A`` itself is positive definite.
      tol: convergence means ``||(A + lambda I) x - b||_2 <= tol * ||b||_2``.
      maxiter: CG iteration cap (default ``10 * size(b)``, at least 100).
      scale: LiSSA's ``s`` (may be traced); must exceed half the largest eigenvalue of
        ``A + lambda I`` (:func:`top_eigenvalue` estimates it).
      depth: LiSSA's maximum recursion depth ``T``.
      params_like: optional pytree whose structure ``b`` must match (e.g. the params), checked
        eagerly so that a mismatched right-hand side fails with a clear message.
      throw: raise :class:`SolverDidNotConverge` when the tolerance was not met (needs concrete values,
        so not inside ``jit``).

    Returns:
      An :class:`InverseHVPResult`.

    Raises:
      ValueError: unknown method, negative damping, or zero damping for ``cg``/``lissa`` (concrete
        values only), a ``b`` whose structure differs from ``params_like``, non-positive
        ``tol``/``scale``/``depth``.
    """
    _validate.one_of("inverse_hvp method", method, METHODS)
    _check_damping(method, damping)
    _validate.positive(tol=tol)
    if _is_concrete_number(scale):
        _validate.positive(scale=float(np.asarray(scale)))
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
        x, iterations, breakdown = _cg(op, b, tol, maxiter or max(100, 10 * size))
    elif method == "lissa":
        x, iterations, breakdown = _lissa(op, b, tol, depth, scale)
    else:
        x, iterations, breakdown = _dense(op, b)

    residual = optax.tree.norm(optax.tree.sub(op(x), b))
    relative = residual / jnp.maximum(optax.tree.norm(b), jnp.finfo(leaves[0].dtype).tiny)
    result = InverseHVPResult(x, iterations, residual, relative, relative <= tol, breakdown)
    if throw:
        if bool(result.breakdown):
            raise SolverDidNotConverge(
                f"inverse_hvp(method={method!r}) broke down after {int(iterations)} iterations: a "
                "direction of non-positive curvature, so A + damping I is not positive definite. "
                "Increase damping, or use a positive semi-definite curvature (GGN, Fisher)."
            )
        if not bool(result.converged):
            raise SolverDidNotConverge(
                f"inverse_hvp(method={method!r}) stopped after {int(iterations)} iterations with "
                f"relative residual {float(relative):.3e} > tol={tol}. Increase maxiter/depth, "
                "increase damping, or (LiSSA) increase scale so that (A + damping I) / scale has "
                "eigenvalues in (0, 2)."
            )
    return result


def inverse_hvp_many(matvec: MatVec, bs: Params, **kwargs: Any) -> InverseHVPResult:
    """:func:`inverse_hvp` for several right-hand sides at once: ``bs`` has a leading axis ``R``.

    The ``R`` systems share the operator and are solved together (one ``vmap``: each CG iteration
    applies ``matvec`` to ``R`` vectors at once, and the loop runs until every system has stopped).
    Every field of the result gets a leading axis ``R``. Keyword arguments as :func:`inverse_hvp`
    (``throw`` raises if any system missed its tolerance).
    """
    throw = kwargs.pop("throw", False)
    params_like = kwargs.pop("params_like", None)
    if params_like is not None:
        first = jax.tree_util.tree_map(lambda a: a[0], bs)
        _validate.same_structure(params_like, first, "params", "b[0]")
    result = jax.vmap(lambda b: inverse_hvp(matvec, b, **kwargs))(bs)
    if throw and not bool(jnp.all(result.converged & ~result.breakdown)):
        bad = np.flatnonzero(~np.asarray(result.converged & ~result.breakdown))
        raise SolverDidNotConverge(
            f"inverse_hvp_many: {bad.size} of {np.asarray(result.converged).size} systems missed "
            f"their tolerance or broke down (e.g. {bad[:5].tolist()})."
        )
    return result


def top_eigenvalue(matvec: MatVec, like: Params, key: jax.Array, *, iterations: int = 30):
    """Power-iteration estimate of the largest eigenvalue of a symmetric PSD operator.

    Works on pytrees (no raveling: sharded parameters stay sharded). Returns the Rayleigh quotient
    ``v^T A v`` of the unit vector after ``iterations`` products from a random normal start (one
    ``fold_in`` of ``key`` per leaf). Jittable; a scalar array.
    """
    _validate.positive_int(iterations=iterations)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    v0 = jax.tree_util.tree_unflatten(treedef, [
        jax.random.normal(jax.random.fold_in(key, i), jnp.shape(leaf), jnp.result_type(leaf))
        for i, leaf in enumerate(leaves)
    ])  # fmt: skip

    def normalised(v):
        norm = optax.tree.norm(v)
        tiny = jnp.finfo(jnp.result_type(leaves[0])).tiny
        return optax.tree.scale(1.0 / jnp.maximum(norm, tiny), v)

    v = jax.lax.fori_loop(0, iterations, lambda _, v: normalised(matvec(v)), normalised(v0))
    return optax.tree.vdot(v, matvec(v))


__all__ = [
    "METHODS",
    "InverseHVPResult",
    "SolverDidNotConverge",
    "inverse_hvp",
    "inverse_hvp_many",
    "top_eigenvalue",
]
