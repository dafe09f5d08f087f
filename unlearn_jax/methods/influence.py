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
tolerance into a :class:`~unlearn_jax.core.solvers.SolverDidNotConverge`.

References:
  Koh, Liang. "Understanding Black-box Predictions via Influence Functions", ICML 2017.
  Guo, Goldstein, Hannun, van der Maaten. "Certified Data Removal from Machine Learning Models",
  ICML 2020.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from unlearn_jax import _validate
from unlearn_jax.core.curvature import ggn_vp, hvp
from unlearn_jax.core.grads import check_loss_fn, mean_grad, sum_over_chunks
from unlearn_jax.core.solvers import InverseHVPResult, SolverDidNotConverge, inverse_hvp
from unlearn_jax.core.task import Task
from unlearn_jax.methods.base import Unlearner

Params = Any
CURVATURES = ("hessian", "ggn", "fisher")
HESSIAN_DATA = ("retain", "all")
SOLVERS = ("cg", "lissa", "dense")


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


def empirical_fisher_vp(loss_fn, params: Params, batch, v: Params, *, chunk_size=None) -> Params:
    r"""Empirical Fisher-vector product :math:`F v = \frac1B \sum_i g_i (g_i^\top v)`.

    Per-example gradients :math:`g_i` are formed ``chunk_size`` at a time and reduced at once, so
    only ``chunk_size`` of them exist in memory; ``F`` (``[P, P]``) is never formed.
    """
    size = check_loss_fn(loss_fn, params, batch)
    _validate.same_structure(params, v, "params", "v")
    grad_fn = jax.grad(loss_fn)

    def chunk_total(sub_batch):
        grads = jax.vmap(grad_fn, in_axes=(None, 0))(params, sub_batch)
        coef = sum(
            jnp.sum(g.reshape(g.shape[0], -1) * vl.reshape(1, -1), axis=1)
            for g, vl in zip(
                jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(v), strict=True
            )
        )  # [b] = g_i . v
        return jax.tree_util.tree_map(lambda g: jnp.tensordot(coef, g, axes=1), grads)

    total = sum_over_chunks(chunk_total, batch, chunk_size)
    return jax.tree_util.tree_map(lambda t: t / size, total)


def _weighted_loss(task: Task):
    """``w * l(z)`` for an example carrying a 0/1 weight ``"w"``."""

    def loss(params, example):
        return example["w"] * task.loss(params, example)

    return loss


def _curvature_vp(curvature: str, task: Task, params, batch, v, chunk_size):
    """``(1/B) sum_i w_i C_i v`` over a batch whose examples carry 0/1 weights ``"w"``.

    ``C_i`` is example ``i``'s curvature: its Hessian, its GGN ``J^T H_out J``, or ``g_i g_i^T``
    (the weights enter squared there, hence 0/1 weights).
    """
    if curvature == "hessian":
        return hvp(_weighted_loss(task), params, batch, v, chunk_size=chunk_size)
    if curvature == "ggn":

        def output_loss(outputs, example):
            return example["w"] * task.output_losses(outputs[None], example["y"][None])[0]

        return ggn_vp(task.outputs, params, batch, v, loss=output_loss, chunk_size=chunk_size)
    return empirical_fisher_vp(_weighted_loss(task), params, batch, v, chunk_size=chunk_size)


class _WeightedSystem(NamedTuple):
    matvec: Any  # v -> (1/n) sum_i c_i C_i v (data part)
    b: Params
    damping: jax.Array  # delta + mu * sum(c) / n


def _weighted_system(
    task, params, batch, forget_w, curvature_w, damping, l2, *, curvature, chunk_size
) -> _WeightedSystem:
    """The removal system over ONE batch of all ``n`` training examples with 0/1 masks.

    ``forget_w`` marks D_f, ``curvature_w`` the Hessian data S. Every size enters through the masks
    (traced values), so one compiled program serves every forget/retain split of the same data.
    """
    n = _validate.batch_size(batch, "batch")
    xy = {"x": batch["x"], "y": batch["y"]}
    forget_grad = mean_grad(_weighted_loss(task), params, {**xy, "w": forget_w})  # (1/n) sum_f g_i
    frac_forget = jnp.sum(forget_w) / n
    b = jax.tree_util.tree_map(lambda g, p: g + (frac_forget * l2) * p, forget_grad, params)
    curvature_batch = {**xy, "w": curvature_w}

    def matvec(v):
        return _curvature_vp(curvature, task, params, curvature_batch, v, chunk_size)

    return _WeightedSystem(matvec, b, damping + l2 * jnp.sum(curvature_w) / n)


def _combine(forget_batch, retain_batch, hessian_data: str):
    """One batch of D_f then D_r (``x``, ``y`` only) and the forget and curvature masks."""
    n_f = _validate.batch_size(forget_batch, "forget_batch")
    n_r = _validate.batch_size(retain_batch, "retain_batch")
    batch = {k: jnp.concatenate([forget_batch[k], retain_batch[k]]) for k in ("x", "y")}
    forget_w = jnp.concatenate([jnp.ones(n_f), jnp.zeros(n_r)])
    curvature_w = forget_w * 0 + 1 if hessian_data == "all" else 1 - forget_w
    return batch, forget_w, curvature_w


class InfluenceSetup(NamedTuple):
    """The linear system of one removal: ``(A + damping I) x = b``, ``theta' = theta + x``."""

    matvec: Any
    b: Params
    damping: float
    num_train: int


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
    r"""Builds the system of :func:`influence_removal` (module docstring for the math).

    ``matvec(v) = (1/n) sum_{i in S} curvature_i v`` (the data part only) and ``damping`` is
    :math:`\delta + \mu |S| / n`; ``b = (1/n) sum_{i in D_f} grad(l_i + mu/2 ||theta||^2)``.
    Jit-able.
    """
    _validate.one_of("curvature", curvature, CURVATURES)
    _validate.one_of("hessian_data", hessian_data, HESSIAN_DATA)
    n_f = _validate.batch_size(forget_batch, "forget_batch")
    n_r = _validate.batch_size(retain_batch, "retain_batch")
    n, n_s = n_f + n_r, (n_r if hessian_data == "retain" else n_f + n_r)
    batch, forget_w, curvature_w = _combine(forget_batch, retain_batch, hessian_data)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    system = _weighted_system(
        task, params, batch, forget_w.astype(dtype), curvature_w.astype(dtype), damping, l2,
        curvature=curvature, chunk_size=chunk_size,
    )  # fmt: skip
    return InfluenceSetup(system.matvec, system.b, float(damping + l2 * n_s / n), n)


def estimate_top_eigenvalue(
    matvec, like: Params, key: jax.Array, *, iterations: int = 30
) -> jax.Array:
    """Power-iteration estimate of the largest eigenvalue of a symmetric PSD operator.

    Returns the Rayleigh quotient ``v^T A v`` of the unit vector after ``iterations`` products from a
    random start (jit-able; a scalar array).
    """
    flat, unravel = jax.flatten_util.ravel_pytree(like)
    apply = lambda v: jax.flatten_util.ravel_pytree(matvec(unravel(v)))[0]
    v0 = jax.random.normal(key, flat.shape, flat.dtype)

    def body(_, v):
        w = apply(v)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(flat.dtype).tiny)

    v = jax.lax.fori_loop(0, iterations, body, v0 / jnp.linalg.norm(v0))
    return jnp.vdot(v, apply(v))


# Module-level jitted pieces, configuration static and every size traced (through the masks): all
# deletion requests on the same training set share one compiled program per configuration.
_STATIC = ("task", "curvature", "chunk_size")
_TINY = 1e-30  # a normal float32 number, negligible next to any curvature


@functools.partial(jax.jit, static_argnames=_STATIC)
def _top_eigenvalue(params, batch, forget_w, curvature_w, damping, l2, key, **static):
    system = _weighted_system(task=static["task"], params=params, batch=batch, forget_w=forget_w,
                              curvature_w=curvature_w, damping=damping, l2=l2,
                              curvature=static["curvature"], chunk_size=static["chunk_size"])  # fmt: skip
    damped = lambda v: optax.tree.add_scale(system.matvec(v), system.damping, v)
    return estimate_top_eigenvalue(damped, params, key)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "solver", "tol", "maxiter", "depth"))
def _solve(
    params, batch, forget_w, curvature_w, damping, l2, lissa_scale, step_scale, *, task,
    curvature, chunk_size, solver, tol, maxiter, depth,
):  # fmt: skip
    system = _weighted_system(
        task, params, batch, forget_w, curvature_w, damping, l2, curvature=curvature,
        chunk_size=chunk_size,
    )  # fmt: skip
    total = lambda v: optax.tree.add_scale(system.matvec(v), system.damping, v)
    # inverse_hvp takes the damping as a concrete number, but here it depends on the (traced) sizes.
    # So the whole damped operator is the matvec, and the solver's own damping is a negligible
    # TINY that the matvec subtracts again (cg and lissa insist on damping > 0).
    tiny = _TINY
    if solver == "dense":
        result = inverse_hvp(total, system.b, method="dense", params_like=params)
    elif solver == "cg":
        shifted = lambda v: optax.tree.add_scale(total(v), -tiny, v)
        result = inverse_hvp(
            shifted, system.b, method="cg", damping=tiny, tol=tol, maxiter=maxiter,
            params_like=params,
        )  # fmt: skip
    else:
        # LiSSA with scale s on (A, b) is LiSSA with scale 1 on (A / s, b / s): s may be traced.
        scaled = lambda v: optax.tree.add_scale(
            optax.tree.scale(1.0 / lissa_scale, total(v)), -tiny, v
        )
        result = inverse_hvp(
            scaled, optax.tree.scale(1.0 / lissa_scale, system.b), method="lissa", damping=tiny,
            tol=tol, scale=1.0, depth=depth, params_like=params,
        )  # fmt: skip
        result = result._replace(residual_norm=result.residual_norm * lissa_scale)
    new = jax.tree_util.tree_map(
        lambda p, x: (p + step_scale * x).astype(p.dtype), params, result.x
    )
    return new, result


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
    chunk_size: int | None = None,
    throw: bool = False,
) -> Unlearner:
    r"""Newton / influence-function removal as a one-shot :class:`Unlearner`.

    .. math::
        \theta' = \theta + \frac{s}{n} \bigl(H + \delta I\bigr)^{-1}
                  \sum_{i \in D_f} \nabla\bigl(\ell_i + \tfrac{\mu}{2}\lVert\theta\rVert^2\bigr),
        \qquad H = \frac1n \sum_{i \in S} \nabla^2 \bigl(\ell_i + \tfrac{\mu}{2}\lVert\theta\rVert^2\bigr)

    (module docstring for the derivation; :math:`s` = ``scale``, 1 for the textbook step).

    Guarantees:
      Approximate. For a strongly convex objective (e.g. L2-regularised logistic regression) at its
      optimum, ``hessian_data="retain"`` is one exact Newton step on the retain objective, whose
      distance to the retrained optimum is second order in the step (tested: at most 10% of the
      original model's distance, at 1%, 5% and 10% random forgetting on digits, with CG, LiSSA and
      the dense solve). Exact for least squares (quadratic objective). For non-convex models no
      guarantee; use ``curvature="ggn"`` or ``"fisher"`` with damping.

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
      chunk_size: curvature products summed over sub-batches of this size (memory bound).
      throw: raise :class:`~unlearn_jax.core.solvers.SolverDidNotConverge` when the solve did not reach
        ``tol`` (otherwise it is reported in the metrics as ``ihvp/converged = False``).

    Returns:
      An :class:`Unlearner` named ``"influence"`` (needs the retain set: its size is ``n - n_f`` and
      it carries the Hessian). Its method state after ``update`` is the
      :class:`~unlearn_jax.core.solvers.InverseHVPResult`.

    References:
      Koh & Liang, ICML 2017; Guo et al., ICML 2020.
    """
    _validate.one_of("solver", solver, SOLVERS)
    _validate.one_of("curvature", curvature, CURVATURES)
    _validate.one_of("hessian_data", hessian_data, HESSIAN_DATA)
    _validate.non_negative(damping=damping, l2=l2)
    _validate.positive(scale=scale, tol=tol)
    _validate.positive_int(maxiter=maxiter, lissa_depth=lissa_depth, chunk_size=chunk_size)
    if lissa_scale != "auto":
        _validate.positive(lissa_scale=lissa_scale)
    if solver in ("cg", "lissa") and damping == 0 and l2 == 0:
        raise ValueError(
            f"solver={solver!r} needs a positive definite system: pass damping > 0, or l2 > 0 if the "
            "model was trained with an L2 term, or use solver='dense'."
        )

    def init(train_state, task, forget, retain, key):
        del train_state, task, forget, retain, key
        return None

    def update(train_state, method_state, task, forget_batch, retain_batch, key):
        del method_state
        params = train_state.params
        _validate.finite(params, "train_state.params")
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        batch, forget_w, curvature_w = _combine(forget_batch, retain_batch, hessian_data)
        forget_w, curvature_w = forget_w.astype(dtype), curvature_w.astype(dtype)
        static = dict(task=task, curvature=curvature, chunk_size=chunk_size)
        args = (
            params,
            batch,
            forget_w,
            curvature_w,
            jnp.asarray(damping, dtype),
            jnp.asarray(l2, dtype),
        )
        s = lissa_scale
        if solver == "lissa" and lissa_scale == "auto":
            s = float(_top_eigenvalue(*args, key, **static))
            if not (math.isfinite(s) and s > 0):
                raise FloatingPointError(
                    f"lissa_scale='auto' estimated the largest eigenvalue as {s}; the curvature is "
                    "not positive definite. Use curvature='ggn' or 'fisher', or more damping."
                )
        new_params, result = _solve(
            *args, jnp.asarray(float(s) if solver == "lissa" else 1.0, dtype), jnp.asarray(scale, dtype),
            solver=solver, tol=tol, maxiter=maxiter, depth=lissa_depth, **static,
        )  # fmt: skip
        if throw and not bool(result.converged):
            raise SolverDidNotConverge(
                f"influence removal: inverse_hvp(method={solver!r}) stopped after "
                f"{int(result.iterations)} iterations with relative residual "
                f"{float(result.relative_residual):.3e} > tol={tol}. Increase maxiter/lissa_depth or "
                "damping, or (LiSSA) use lissa_scale='auto'."
            )
        metrics = {
            "loss": task.batch_loss(new_params, forget_batch),
            "influence/step_norm": scale * optax.tree.norm(result.x),
            **result.metrics("ihvp"),
        }
        if solver == "lissa":
            metrics["ihvp/lissa_scale"] = jnp.asarray(float(s))
        return train_state.replace(params=new_params), result, metrics

    return Unlearner(
        init=init,
        update=update,
        name="influence",
        needs_retain=True,
        needs_forget_batches=True,
        one_shot=True,
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
        },
    )


__all__ = [
    "CURVATURES",
    "HESSIAN_DATA",
    "InverseHVPResult",
    "empirical_fisher_vp",
    "estimate_top_eigenvalue",
    "influence_removal",
    "l2_regularizer",
    "removal_system",
]
