r"""Influence-function (Newton) removal: one second-order step towards the model trained without D_f.

The training objective is taken to be

.. math:: J(\theta) = \frac1n \sum_{i \in D} \ell(z_i; \theta) + \frac{\mu}{2} \lVert\theta\rVert_2^2,

with :math:`\mu` the ``l2`` coefficient (0 when the model was trained without an L2 term; pass the
same value that training used, e.g. through :func:`l2_regularizer`). Write
:math:`\tilde\ell_i(\theta) = \ell(z_i; \theta) + \frac{\mu}{2}\lVert\theta\rVert^2` so that
:math:`J = \frac1n \sum_i \tilde\ell_i`. Removal takes the step

.. math::
    \theta' = \theta + \frac1n \bigl(H + \delta I\bigr)^{-1} \sum_{i \in D_f} \nabla \tilde\ell_i(\theta),
    \qquad H = \frac1n \sum_{i \in S} \nabla^2 \tilde\ell_i(\theta),

with :math:`\delta` the ``damping`` and :math:`S` the Hessian data:

* ``hessian_data="retain"`` (default), :math:`S = D_r`: then
  :math:`\frac1n H^{-1} = (\sum_{i \in D_r} \nabla^2 \tilde\ell_i)^{-1}` and, at an optimum of
  :math:`J` (where :math:`\sum_{D_r} \nabla\tilde\ell_i = -\sum_{D_f} \nabla\tilde\ell_i`), the step is
  exactly one Newton step on the retain objective
  :math:`J_r = \frac1{n_r}\sum_{D_r} \tilde\ell_i` -- the objective that retraining minimises. This
  is Guo et al.'s removal step (their :math:`H_{w^*}` is the Hessian on the remaining data).
* ``hessian_data="all"``, :math:`S = D`: Koh & Liang's influence function,
  :math:`\theta' - \theta = -\frac1n H_J^{-1} \nabla(-\sum_{D_f}\tilde\ell_i)` with :math:`H_J` the
  Hessian of :math:`J` (the first-order expansion in the example weight :math:`-1/n`).

The curvature :math:`\nabla^2 \ell` can be the exact Hessian (``"hessian"``, Hessian-vector products;
indefinite for non-convex models), the generalised Gauss-Newton (``"ggn"``, PSD, equal to the
Hessian for linear models with a convex loss), or the empirical Fisher
:math:`\frac1n\sum_{S} g_i g_i^\top` (``"fisher"``). The L2 term contributes
:math:`\mu\,|S|/n` to the diagonal, which is passed to the solver together with :math:`\delta`, so a
positive ``l2`` makes CG and LiSSA applicable without extra damping. The linear system is solved by
:func:`unlearn_jax.core.solvers.inverse_hvp` (``"cg"``, ``"lissa"``, ``"dense"``), whose convergence
information is returned in the metrics (``ihvp/*``); ``throw=True`` turns a solve that missed its
tolerance (or a CG breakdown) into a :class:`~unlearn_jax.core.solvers.SolverDidNotConverge`.

Data. The forget gradient :math:`\sum_{D_f} \nabla\ell_i` is a streaming reduction over the whole
forget set (exact, any size). The curvature is taken on one padded batch of at most
``curvature_examples`` examples of each Hessian side: the whole retain set when it is that small
(then the step is exactly the one above), otherwise a uniformly random sample of it, rescaled to the
full set (:math:`\frac{n_r}{|S|}\sum_{i \in S}`, an unbiased estimate of the retain Hessian, as
LiSSA's sampled Hessians are). Every size and the damping enter as traced values, so every request on
the same model shares one compiled solve.

References:
  Koh, Liang. "Understanding Black-box Predictions via Influence Functions", ICML 2017.
  Guo, Goldstein, Hannun, van der Maaten. "Certified Data Removal from Machine Learning Models",
  ICML 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate
from unlearn_jax.core import reductions
from unlearn_jax.core.batch import row_mask
from unlearn_jax.core.curvature import ggn_vp, hvp
from unlearn_jax.core.grads import check_loss_fn, sum_over_chunks
from unlearn_jax.core.solvers import (
    InverseHVPResult,
    SolverDidNotConverge,
    inverse_hvp,
    top_eigenvalue,
)
from unlearn_jax.core.task import Task
from unlearn_jax.methods.protocol import FORGET, RETAIN, Checks, Feeds, Statistic, Unlearner

Params = Any
CURVATURES = ("hessian", "ggn", "fisher")
HESSIAN_DATA = ("retain", "all")
SOLVERS = ("cg", "lissa", "dense")
CURVATURE_EXAMPLES = 4096


def l2_regularizer(l2: float):
    r"""``R(params, batch, mask) = (l2 / 2) ||params||^2`` as a ``training.fit`` regulariser.

    Train with it and pass the same ``l2`` to :func:`influence_removal`, so that the Hessian and
    gradients of removal are those of the objective that training minimised.
    """
    _validate.non_negative(l2=l2)

    def regularizer(params, batch, mask):
        del batch, mask
        return 0.5 * l2 * optax.tree.norm(params, squared=True)

    return regularizer


def _dot(a: Params, b: Params) -> jax.Array:
    """``[B]`` per-example inner products of a batched pytree ``a`` with an unbatched ``b``."""
    return sum(
        jnp.sum(g.reshape(g.shape[0], -1) * v.reshape(1, -1), axis=1)
        for g, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def empirical_fisher_vp(
    loss_fn, params: Params, batch, v: Params, *, weights=None, chunk_size=None
) -> Params:
    r"""Empirical Fisher-vector product :math:`F v = \frac1B \sum_i c_i\, g_i (g_i^\top v)`.

    Per-example gradients :math:`g_i` are formed ``chunk_size`` at a time and reduced at once, so
    only ``chunk_size`` of them exist in memory; ``F`` (``[P, P]``) is never formed. ``weights``
    (``[B]``, default ones) are the :math:`c_i`.
    """
    size = check_loss_fn(loss_fn, params, batch)
    _validate.same_structure(params, v, "params", "v")
    grad_fn = jax.grad(loss_fn)
    c = (
        jnp.ones((size,), jax.tree_util.tree_leaves(params)[0].dtype)
        if weights is None
        else weights
    )

    def chunk_total(pair):
        sub_batch, sub_c = pair
        grads = jax.vmap(grad_fn, in_axes=(None, 0))(params, sub_batch)
        coef = sub_c * _dot(grads, v)  # [b] = c_i g_i . v
        return jax.tree_util.tree_map(lambda g: jnp.tensordot(coef, g, axes=1), grads)

    total = sum_over_chunks(chunk_total, (batch, c), chunk_size)
    return jax.tree_util.tree_map(lambda t: t / size, total)


def curvature_vp(curvature: str, task: Task, params, batch, weights, v, *, chunk_size=None):
    r""":math:`\sum_i c_i C_i v` over a batch, ``weights`` the :math:`c_i` (``[B]``).

    ``C_i`` is example ``i``'s curvature: its Hessian (``"hessian"``), its GGN
    :math:`J_i^\top H_{\text{out},i} J_i` (``"ggn"``) or :math:`g_i g_i^\top` (``"fisher"``). A SUM,
    not a mean: padding rows have :math:`c_i = 0`.
    """
    size = _validate.batch_size(batch)
    xy = {k: val for k, val in batch.items() if k not in ("mask", "id")}
    if curvature == "hessian":
        weighted = {**xy, "w": weights}
        loss = lambda p, ex: ex["w"] * task.loss(p, {k: a for k, a in ex.items() if k != "w"})
        out = hvp(loss, params, weighted, v, chunk_size=chunk_size)
    elif curvature == "ggn":
        weighted = {**xy, "w": weights}

        def output_loss(outputs, example):
            w = example.get("weights")
            token_w = None if w is None else w[None]
            return example["w"] * task.output_losses(outputs[None], example["y"][None], token_w)[0]

        outputs_fn = lambda p, ex: task.outputs(p, {k: a for k, a in ex.items() if k != "w"})
        out = ggn_vp(outputs_fn, params, weighted, v, loss=output_loss, chunk_size=chunk_size)
    else:
        out = empirical_fisher_vp(task.loss, params, xy, v, weights=weights, chunk_size=chunk_size)
    # hvp / ggn_vp / empirical_fisher_vp return means over the batch: undo the 1/B.
    return jax.tree_util.tree_map(lambda t: t * size, out)


class InfluenceSetup(NamedTuple):
    r"""The linear system of one removal: ``(A + damping I) x = b``, ``theta' = theta + x``.

    Attributes:
      matvec: ``v -> A v`` (the data part, :math:`\frac1n \sum_{i \in S} c_i C_i v`).
      b: :math:`\frac1n \sum_{D_f} \nabla(\ell_i + \frac\mu2\lVert\theta\rVert^2)`.
      damping: :math:`\delta + \mu |S| / n` (an array).
      num_train: :math:`n`.
    """

    matvec: Any
    b: Params
    damping: jax.Array
    num_train: jax.Array


def _setup(task, params, forget_grad_sum, n_f, n_r, curvature_parts, damping, l2, *, curvature,
           chunk_size) -> InfluenceSetup:  # fmt: skip
    """The removal system from the forget gradient sum and the curvature batches.

    ``curvature_parts`` is ``[(batch, set_size), ...]``: each batch's real rows stand for the
    ``set_size`` examples of its side (weights ``set_size / rows``).
    """
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    n_f, n_r = jnp.asarray(n_f, dtype), jnp.asarray(n_r, dtype)
    n = n_f + n_r
    b = jax.tree_util.tree_map(lambda g, p: g / n + (n_f / n) * l2 * p, forget_grad_sum, params)
    weighted = []
    n_s = jnp.zeros((), dtype)
    for batch, set_size in curvature_parts:
        mask = row_mask(batch, dtype)
        rows = jnp.sum(mask)
        weighted.append((batch, mask * (set_size / jnp.where(rows > 0, rows, 1.0))))
        n_s = n_s + set_size

    def matvec(v):
        total = None
        for batch, c in weighted:
            part = curvature_vp(curvature, task, params, batch, c, v, chunk_size=chunk_size)
            total = part if total is None else optax.tree.add(total, part)
        return optax.tree.scale(1.0 / n, total)

    return InfluenceSetup(matvec, b, damping + l2 * n_s / n, n)


def removal_system(
    task: Task,
    params: Params,
    forget_batch,
    retain_batch,
    *,
    curvature: str = "hessian",
    hessian_data: str = "retain",
    damping: float = 0.0,
    l2: float = 0.0,
    chunk_size: int | None = None,
) -> InfluenceSetup:
    r"""The system of :func:`influence_removal` for a forget and a retain batch taken whole.

    ``matvec(v) = (1/n) sum_{i in S} curvature_i v`` (the data part only) and ``damping`` is
    :math:`\delta + \mu |S| / n`; ``b = (1/n) sum_{i in D_f} grad(l_i + mu/2 ||theta||^2)``.
    Batches may carry a ``"mask"``. Jit-able.
    """
    _validate.one_of("curvature", curvature, CURVATURES)
    _validate.one_of("hessian_data", hessian_data, HESSIAN_DATA)
    _validate.batch_size(forget_batch, "forget_batch")
    _validate.batch_size(retain_batch, "retain_batch")
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    n_f = jnp.sum(row_mask(forget_batch, dtype))
    n_r = jnp.sum(row_mask(retain_batch, dtype))

    def total_loss(p):
        losses = task.batch_losses(p, forget_batch)
        return jnp.sum(row_mask(forget_batch, losses.dtype) * losses)

    g_sum = jax.grad(total_loss)(params)
    parts = [(retain_batch, n_r)] + ([(forget_batch, n_f)] if hessian_data == "all" else [])
    return _setup(task, params, g_sum, n_f, n_r, parts, jnp.asarray(damping, dtype),
                  jnp.asarray(l2, dtype), curvature=curvature, chunk_size=chunk_size)  # fmt: skip


class InfluenceState(NamedTuple):
    r"""Influence removal's method state.

    Attributes:
      forget_gradient: :math:`\sum_{D_f} \nabla\ell_i` at the original parameters (a statistic).
      plan: the run plan (its ``forget_size`` and ``retain_size`` are :math:`n_f, n_r`).
      solution: the :class:`~unlearn_jax.core.solvers.InverseHVPResult` of the solve (zeros before
        the update).
      lissa_scale: the LiSSA scale used (0 for the other solvers).
    """

    forget_gradient: Params
    plan: Any
    solution: InverseHVPResult
    lissa_scale: jax.Array


def _forget_gradient(task):
    return reductions.gradient_sum(task.loss)


def influence_removal(
    *,
    solver: str = "cg",
    damping: float = 0.0,
    curvature: str = "hessian",
    hessian_data: str = "retain",
    l2: float = 0.0,
    scale: float = 1.0,
    tol: float = 1e-5,
    maxiter: int | None = None,
    lissa_scale: float | str = 10.0,
    lissa_depth: int = 10_000,
    curvature_examples: int = CURVATURE_EXAMPLES,
    chunk_size: int | None = None,
    throw: bool = False,
) -> Unlearner:
    r"""Newton / influence-function removal as a one-shot :class:`~unlearn_jax.methods.protocol.Unlearner`.

    .. math::
        \theta' = \theta + \frac{s}{n} \bigl(H + \delta I\bigr)^{-1}
                  \sum_{i \in D_f} \nabla\bigl(\ell_i + \tfrac{\mu}{2}\lVert\theta\rVert^2\bigr),
        \qquad H = \frac1n \sum_{i \in S} \nabla^2 \bigl(\ell_i + \tfrac{\mu}{2}\lVert\theta\rVert^2\bigr)

    (module docstring for the derivation and for how the data enter; :math:`s` = ``scale``, 1 for the
    textbook step).

    Guarantees:
      Approximate. For a strongly convex objective (e.g. L2-regularised logistic regression) at its
      optimum, ``hessian_data="retain"`` with every retain example in the curvature batch is one
      exact Newton step on the retain objective, whose distance to the retrained optimum is second
      order in the step (tested: at most 10% of the original model's distance, at 1%, 5% and 10%
      random forgetting on digits, with CG, LiSSA and the dense solve). Exact for least squares
      (quadratic objective). For non-convex models no guarantee; use ``curvature="ggn"`` or
      ``"fisher"`` with damping.

    Args:
      solver: ``"cg"``, ``"lissa"`` or ``"dense"`` (:func:`unlearn_jax.core.solvers.inverse_hvp`).
      damping: :math:`\delta \ge 0`, added to the diagonal (needed for CG/LiSSA when ``l2 = 0``).
      curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (empirical).
      hessian_data: ``"retain"`` (Newton step on the retain objective) or ``"all"`` (Koh & Liang).
      l2: :math:`\mu`, the L2 coefficient of the TRAINING objective (``(mu/2)||theta||^2`` added to
        the mean loss), applied to every parameter. Must match training for the step to be right.
      scale: multiplies the step (1 is the Newton/influence step).
      tol: the solver's relative-residual tolerance.
      maxiter: CG iteration cap.
      lissa_scale: LiSSA's scale ``s`` (Koh & Liang: 10); must exceed half the largest eigenvalue of
        the damped curvature. ``"auto"``: the power-iteration estimate of that eigenvalue (30
        products), which makes the recursion contract at rate ``1 - lambda_min / lambda_max``.
      lissa_depth: LiSSA's maximum recursion depth.
      curvature_examples: the most examples of each Hessian side in the curvature batch.
      chunk_size: curvature products summed over sub-batches of this size (memory bound).
      throw: raise :class:`~unlearn_jax.core.solvers.SolverDidNotConverge` after the run when the
        solve did not reach ``tol`` or broke down (otherwise reported in the metrics:
        ``ihvp/converged``, ``ihvp/breakdown``).

    Returns:
      An :class:`Unlearner` named ``"influence"``; its final method state holds the solver's
      :class:`~unlearn_jax.core.solvers.InverseHVPResult` (``.solution``).

    References:
      Koh & Liang, ICML 2017; Guo et al., ICML 2020.
    """
    _validate.one_of("solver", solver, SOLVERS)
    _validate.one_of("curvature", curvature, CURVATURES)
    _validate.one_of("hessian_data", hessian_data, HESSIAN_DATA)
    _validate.non_negative(damping=damping, l2=l2)
    _validate.positive(scale=scale, tol=tol)
    _validate.positive_int(maxiter=maxiter, lissa_depth=lissa_depth, chunk_size=chunk_size,
                           curvature_examples=curvature_examples)  # fmt: skip
    if lissa_scale != "auto":
        _validate.positive(lissa_scale=lissa_scale)
    if solver in ("cg", "lissa") and damping == 0 and l2 == 0:
        raise ValueError(
            f"solver={solver!r} needs a positive definite system: pass damping > 0, or l2 > 0 if the "
            "model was trained with an L2 term, or use solver='dense'."
        )

    def init(task, params, key, stats, plan):
        del task, key
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        scalar = jnp.zeros((), dtype)
        solution = InverseHVPResult(zeros, jnp.zeros((), jnp.int32), scalar, scalar,
                                    jnp.zeros((), bool), jnp.zeros((), bool))  # fmt: skip
        return InfluenceState(stats["forget_gradient"].value, plan, solution, scalar)

    def update(task, params, method_state, forget_batch, retain_batch, key):
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        plan = method_state.plan
        n_f, n_r = plan.forget_size.astype(dtype), plan.retain_size.astype(dtype)
        parts = [(retain_batch, n_r)] + ([(forget_batch, n_f)] if hessian_data == "all" else [])
        system = _setup(task, params, method_state.forget_gradient, n_f, n_r, parts,
                        jnp.asarray(damping, dtype), jnp.asarray(l2, dtype),
                        curvature=curvature, chunk_size=chunk_size)  # fmt: skip
        if solver == "lissa":
            if lissa_scale == "auto":
                damped = lambda v: optax.tree.add_scale(system.matvec(v), system.damping, v)
                s = top_eigenvalue(damped, params, key)
            else:
                s = jnp.asarray(lissa_scale, dtype)
            result = inverse_hvp(system.matvec, system.b, method="lissa", damping=system.damping,
                                 tol=tol, scale=s, depth=lissa_depth)  # fmt: skip
        else:
            s = jnp.zeros((), dtype)
            result = inverse_hvp(system.matvec, system.b, method=solver, damping=system.damping,
                                 tol=tol, maxiter=maxiter)  # fmt: skip
        new_params = jax.tree_util.tree_map(
            lambda p, x: (p + scale * x).astype(p.dtype), params, result.x
        )
        metrics = {
            "influence/step_norm": scale * optax.tree.norm(result.x),
            **result.metrics("ihvp"),
        }
        if solver == "lissa":
            metrics["ihvp/lissa_scale"] = s
        return new_params, method_state._replace(solution=result, lissa_scale=s), metrics

    def check_result(method_state, metrics):
        if solver == "lissa" and lissa_scale == "auto":
            s = np.asarray(metrics["ihvp/lissa_scale"])
            if not np.all(np.isfinite(s) & (s > 0)):
                raise FloatingPointError(
                    f"lissa_scale='auto' estimated the largest eigenvalue as {s.tolist()}; the "
                    "curvature is not positive definite. Use curvature='ggn' or 'fisher', or more "
                    "damping."
                )
        if not throw:
            return
        converged = np.asarray(metrics["ihvp/converged"])
        broke = np.asarray(metrics["ihvp/breakdown"])
        if np.any(broke) or not np.all(converged):
            rel = np.asarray(metrics["ihvp/relative_residual"]).max()
            its = np.asarray(metrics["ihvp/iterations"]).max()
            what = "broke down (non-positive curvature)" if np.any(broke) else "stopped"
            raise SolverDidNotConverge(
                f"influence removal: inverse_hvp(method={solver!r}) {what} after {int(its)} "
                f"iterations with relative residual {float(rel):.3e} > tol={tol}. Increase "
                "maxiter/lissa_depth or damping, or (LiSSA) use lissa_scale='auto'."
            )

    return Unlearner(
        init=init,
        update=update,
        name="influence",
        feeds=Feeds(
            # The forget set enters through its gradient (a statistic); its curvature only for the
            # all-data Hessian. Reading no forget batch otherwise keeps one compilation for every
            # request size.
            batches=(FORGET, RETAIN) if hessian_data == "all" else (RETAIN,),
            statistics={"forget_gradient": Statistic(_forget_gradient, FORGET)},
            run={"steps": 1},
            batch_size=curvature_examples,
        ),
        guarantee="approximate",
        hparams={
            "solver": solver,
            "damping": damping,
            "curvature": curvature,
            "hessian_data": hessian_data,
            "l2": l2,
            "scale": scale,
            "tol": tol,
            "maxiter": maxiter,
            "lissa_scale": lissa_scale,
            "lissa_depth": lissa_depth,
            "curvature_examples": curvature_examples,
        },
        checks=Checks(result=check_result),
    )


__all__ = [
    "CURVATURES",
    "HESSIAN_DATA",
    "InfluenceSetup",
    "InfluenceState",
    "curvature_vp",
    "empirical_fisher_vp",
    "influence_removal",
    "l2_regularizer",
    "removal_system",
]
