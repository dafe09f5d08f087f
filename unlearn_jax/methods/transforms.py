r"""Gradient transforms: how the gradient of an objective is taken, and which weights it may move.

A gradient method computes, at every step, ``((loss, metrics), grads) = value_and_grad(objective,
params, ctx, term_states)``. A :class:`GradientTransform` may

* replace how that gradient is taken (``wrap``): :func:`sharpness_aware` re-evaluates the forget
  terms' gradient at perturbed parameters;
* restrict which parameters move (``update_mask``): :func:`saliency_mask` lets only the most salient
  weights change. The mask is applied to the gradient AND to the final parameters
  (``theta' = where(mask, theta + update, theta)``), so weight decay and momentum inside the optimizer
  cannot move a masked-out weight: it stays bit-identical.

Transforms are applied in order: the first wraps the plain gradient, the next wraps that, and so on;
masks are combined with a logical AND.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate
from unlearn_jax.core import grads
from unlearn_jax.core.task import Task
from unlearn_jax.methods.objectives import FORGET, PARAMS, RETAIN, Context, Metrics, Objective

Params = Any
TermStates = dict[str, Any]
ValueAndGrad = Callable[
    [Objective, Params, Context, TermStates], tuple[tuple[jax.Array, Metrics], Params]
]
"""``value_and_grad(objective, params, ctx, term_states) -> ((loss, metrics), grads)``."""


def value_and_grad(
    objective: Objective, params: Params, ctx: Context, term_states: TermStates
) -> tuple[tuple[jax.Array, Metrics], Params]:
    """The plain gradient of ``objective`` at ``params``: one forward and one backward pass.

    Returns:
      ``((loss, {term label: value}), grads)`` with ``grads`` shaped like ``params``.
    """
    if len(objective) == 0:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return (jnp.zeros((), jnp.float32), {}), zeros
    return jax.value_and_grad(objective.value, has_aux=True)(params, ctx, term_states)


class GradientTransform(NamedTuple):
    """A change to how a gradient method takes its gradient or what the gradient may touch.

    Attributes:
      name: short name (``"sam"``, ``"saliency_mask"``).
      init: ``init(train_state, task, objective, forget, retain, key) -> state``, run once before the
        first step (e.g. the saliency mask is computed here).
      wrap: ``wrap(value_and_grad, state) -> value_and_grad``: the new way to take the gradient.
      update_mask: ``update_mask(state) -> bool pytree like params`` (True: may move), or ``None``.
      hparams: the hyper-parameters, for records.
    """

    name: str
    init: Callable[[Any, Task, Objective, Any, Any, jax.Array], Any]
    wrap: Callable[[ValueAndGrad, Any], ValueAndGrad]
    update_mask: Callable[[Any], Params] | None = None
    hparams: dict = {}  # noqa: RUF012 -- NamedTuple default, never mutated


def _no_state(train_state, task, objective, forget, retain, key):
    del train_state, task, objective, forget, retain, key


def _add(a: Params, b: Params) -> Params:
    return jax.tree_util.tree_map(jnp.add, a, b)


def sam_perturbation(forget_grads: Params, rho: float | jax.Array) -> tuple[Params, jax.Array]:
    r"""SAM's worst-case perturbation to first order: :math:`\delta = \rho\, g_f / \lVert g_f\rVert_2`.

    The norm is the global l2 norm over all leaves, computed on the traced gradient (never converted
    to a Python number, which would freeze it at trace time). A zero gradient gives
    :math:`\delta = 0`. The perturbation is a constant for differentiation (``stop_gradient``), as in
    SAM: the update uses :math:`\nabla L_f(\theta + \delta)`, not the gradient through
    :math:`\delta(\theta)`.

    Returns:
      ``(delta, ||g_f||)`` with ``delta`` shaped like ``forget_grads``.
    """
    norm = optax.tree.norm(forget_grads)
    scale = jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1.0), 0.0)
    delta = jax.tree_util.tree_map(lambda g: jax.lax.stop_gradient(scale * g), forget_grads)
    return delta, norm


def sharpness_aware(rho: float = 0.01) -> GradientTransform:
    r"""Sharpness-aware unlearning: the forget terms' gradient at adversarially perturbed parameters.

    With :math:`L = L_f + L_r` split by the terms' sides (forget terms vs. retain and parameter terms),

    .. math::
        g_f = \nabla L_f(\theta), \quad \delta = \rho\, \frac{g_f}{\lVert g_f\rVert_2}, \quad
        g = \nabla L_f(\theta + \delta) + \nabla L_r(\theta),

    the first-order solution of :math:`\min_\theta \max_{\lVert\delta\rVert\le\rho} L_f(\theta+\delta)
    + L_r(\theta)`: the retain gradient is taken at the UNperturbed parameters, as in the paper. Works
    with any objective; a step costs two gradient evaluations of the forget terms and one of the rest.
    The reported loss is the objective at the unperturbed parameters. Metrics add
    ``sam/forget_grad_norm`` (:math:`\lVert g_f\rVert`).

    Args:
      rho: perturbation radius >= 0 (0 recovers the plain gradient). The paper uses 0.01 (MUSE)
        to 0.1 (WMDP).

    Guarantees:
      None beyond the underlying objective's (approximate); SAM aims at robustness to relearning.

    References:
      Fan, Jia, Zhang, Ramakrishna, Hong, Liu. Towards LLM Unlearning Resilient to
      Relearning Attacks: A Sharpness-Aware Minimization Perspective and Beyond. ICML 2025
      (arXiv:2502.05374). Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
      Efficiently Improving Generalization. ICLR 2021.

    Raises:
      ValueError: if ``rho`` is negative or not finite.
    """
    _validate.non_negative(rho=rho)

    def wrap(inner: ValueAndGrad, state) -> ValueAndGrad:
        del state

        def sam_value_and_grad(objective, params, ctx, term_states):
            forget_part = objective.select((FORGET,))
            rest = objective.select((RETAIN, PARAMS))
            if len(forget_part) == 0:
                return inner(objective, params, ctx, term_states)
            (loss_f, metrics_f), g_f = inner(forget_part, params, ctx, term_states)
            delta, norm = sam_perturbation(g_f, rho)
            _, g_f_perturbed = inner(forget_part, _add(params, delta), ctx, term_states)
            (loss_r, metrics_r), g_r = inner(rest, params, ctx, term_states)
            metrics = {**metrics_f, **metrics_r, "sam/forget_grad_norm": norm}
            return (loss_f + loss_r, metrics), _add(g_f_perturbed, g_r)

        return sam_value_and_grad

    return GradientTransform("sam", _no_state, wrap, None, {"sam_rho": rho})


def top_fraction_mask(scores: Params, fraction: float) -> Params:
    r"""A boolean pytree keeping the ``k = max(1, round(fraction * P))`` largest scores of ALL leaves.

    The ranking is global (across tensors, not per tensor), so exactly ``k`` of the ``P`` entries are
    True; ties are broken by position in the flattened tree (``jax.flatten_util.ravel_pytree`` order).

    Args:
      scores: a pytree of real arrays (e.g. absolute gradients).
      fraction: kept fraction in ``(0, 1]``.

    Raises:
      ValueError: ``fraction`` outside ``(0, 1]``.
    """
    _validate.in_interval("fraction", fraction, 0.0, 1.0, closed="right")
    flat, unravel = jax.flatten_util.ravel_pytree(scores)
    total = flat.size
    k = max(1, min(total, round(fraction * total)))
    order = jnp.argsort(-flat, stable=True)
    keep = jnp.zeros(total, bool).at[order[:k]].set(True)
    # ravel_pytree casts bools to the common dtype; unravel then map back to bool.
    return jax.tree_util.tree_map(lambda a: a > 0.5, unravel(keep.astype(flat.dtype)))


class SaliencyState(NamedTuple):
    """State of :func:`saliency_mask`: the mask (True = may move) and its kept fraction."""

    mask: Params
    kept_fraction: jax.Array


def forget_gradient_sum(task: Task, params: Params, forget, chunk_size: int = 256) -> Params:
    r"""The summed gradient of the task loss over the whole forget set, :math:`\sum_{i\in D_f}\nabla
    \ell(z_i;\theta)`, computed ``chunk_size`` examples at a time (bounded memory)."""
    batch = forget.as_batch() if hasattr(forget, "as_batch") else forget

    @jax.jit
    def total(params, batch):
        def chunk_total(b):
            return jax.grad(lambda p: jnp.sum(task.batch_losses(p, b)))(params)

        return grads.sum_over_chunks(chunk_total, batch, chunk_size)

    return total(params, batch)


def saliency_mask(fraction: float = 0.5, *, chunk_size: int = 256) -> GradientTransform:
    r"""SalUn's weight-saliency mask: only the weights most salient for the forget loss move.

    Computed once, at ``init``, from the parameters before unlearning:

    .. math::
        s = \Bigl|\sum_{i \in D_f} \nabla_\theta \ell(z_i; \theta_0)\Bigr|, \qquad
        m = \mathbb 1[s \ge \text{the } k\text{-th largest entry of } s], \quad k = \text{round}(
        \text{fraction}\cdot P),

    ranked across ALL tensors (see :func:`top_fraction_mask`). Every step then uses
    :math:`m \odot g` and sets :math:`\theta \leftarrow \text{where}(m, \theta + u, \theta)` for the
    optimizer's update :math:`u`, so masked-out weights stay bit-identical even with weight decay or
    momentum (the reference code masked only the gradient, letting weight decay move them).

    Args:
      fraction: kept fraction of the weights, in ``(0, 1]`` (SalUn's default 0.5).
      chunk_size: forget examples per chunk of the saliency gradient.

    Guarantees:
      Masked-out weights are unchanged bit for bit; the unlearning itself stays approximate.

    References:
      Fan, Liu, Zhang, Wei, Wong, Liu. SalUn: Empowering Machine Unlearning via Gradient-based Weight
      Saliency in Both Image Classification and Generation. ICLR 2024 (arXiv:2310.12508), eq. (3)-(4).

    Raises:
      ValueError: ``fraction`` outside ``(0, 1]``.
    """
    _validate.in_interval("fraction", fraction, 0.0, 1.0, closed="right")
    _validate.positive_int(chunk_size=chunk_size)

    def init(train_state, task, objective, forget, retain, key):
        del objective, retain, key
        saliency = jax.tree_util.tree_map(
            jnp.abs, forget_gradient_sum(task, train_state.params, forget, chunk_size)
        )
        mask = top_fraction_mask(saliency, fraction)
        kept = sum(int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(mask))
        total = sum(int(np.size(m)) for m in jax.tree_util.tree_leaves(mask))
        return SaliencyState(mask, jnp.asarray(kept / total, jnp.float32))

    def wrap(inner: ValueAndGrad, state: SaliencyState) -> ValueAndGrad:
        def masked_value_and_grad(objective, params, ctx, term_states):
            out, g = inner(objective, params, ctx, term_states)
            return out, jax.tree_util.tree_map(lambda m, x: jnp.where(m, x, 0), state.mask, g)

        return masked_value_and_grad

    return GradientTransform(
        "saliency_mask", init, wrap, lambda state: state.mask, {"mask_fraction": fraction}
    )


__all__ = [
    "GradientTransform",
    "SaliencyState",
    "ValueAndGrad",
    "forget_gradient_sum",
    "saliency_mask",
    "sam_perturbation",
    "sharpness_aware",
    "top_fraction_mask",
    "value_and_grad",
]
