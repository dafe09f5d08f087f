r"""Gradient transforms: how a gradient method takes its gradient, and what the gradient may touch.

A gradient method computes, at every step, ``((loss, metrics), g) = value_and_grad(objective, params,
ctx, term_states)``, passes ``g`` through its transform, then through its optax optimizer. A
:class:`GradientTransform` may do any of three things:

* ``wrap``: change how the gradient is taken. :func:`sharpness_aware` re-evaluates the forget terms'
  gradient at perturbed parameters.
* ``update``: transform the gradient after it is taken, optax-style
  (``update(g, state, params) -> (g, state)``). Every optax ``GradientTransformation``
  (``optax.clip_by_global_norm(1.0)``, ``optax.masked(...)``, ``optax.apply_if_finite(...)``) is one
  (:func:`from_optax`); :func:`saliency_mask` zeroes the gradient of non-salient weights.
* ``update_mask``: restrict which parameters may move at all. The final parameters are
  ``theta' = where(mask, theta + u, theta)``, so weight decay and momentum inside the optimizer cannot
  move a masked-out weight: it stays bit-identical.

:func:`chain` composes transforms in order, as ``optax.chain`` does: the ``wrap``\ s nest (the first
wraps the plain gradient, the next wraps that), then the ``update``\ s run in order on the result, and
masks combine with a logical AND. Optax transforms may be passed to :func:`chain` directly.

A transform may need a statistic of the data before the first step (the saliency mask needs the
forget set's gradient): it declares it in ``statistics`` (see
:class:`~unlearn_jax.methods.protocol.Statistic`) and receives it in ``init``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate
from unlearn_jax.core import reductions
from unlearn_jax.methods.objectives import FORGET, PARAMS, RETAIN, Context, Metrics, Objective
from unlearn_jax.methods.protocol import Statistic

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
      name: short name (``"sam"``, ``"saliency_mask"``, ``"optax"``, ``"chain"``).
      init: ``init(params, key, stats) -> state``; pure (works on ``jax.ShapeDtypeStruct`` params);
        ``stats`` holds the transform's declared statistics by name.
      wrap: ``wrap(value_and_grad, state) -> value_and_grad`` or ``None``.
      update: ``update(grads, state, params) -> (grads, state)`` or ``None``.
      update_mask: ``update_mask(state) -> bool pytree like params`` (True: may move), or ``None``.
      statistics: ``{name: Statistic}`` the transform needs before the first step.
      hparams: the hyper-parameters, for records.
    """

    name: str
    init: Callable[[Params, jax.Array, Mapping[str, Any]], Any]
    wrap: Callable[[ValueAndGrad, Any], ValueAndGrad] | None = None
    update: Callable[[Params, Any, Params], tuple[Params, Any]] | None = None
    update_mask: Callable[[Any], Params] | None = None
    statistics: Mapping[str, Statistic] = {}
    hparams: Mapping[str, Any] = {}


def _no_state(params, key, stats):
    del params, key, stats
    return None


def _is_optax(t: Any) -> bool:
    return (
        callable(getattr(t, "init", None))
        and callable(getattr(t, "update", None))
        and not (isinstance(t, GradientTransform))
    )


def from_optax(
    transformation: optax.GradientTransformation, name: str = "optax"
) -> GradientTransform:
    """An optax ``GradientTransformation`` as a :class:`GradientTransform` (its ``update`` step).

    The gradient passes through ``transformation.update(g, state, params)`` exactly as optax defines
    it, before the method's optimizer; its state is created from the parameters at ``init``.
    """
    if not _is_optax(transformation):
        raise TypeError(
            f"from_optax takes an optax GradientTransformation, got {type(transformation).__name__}."
        )

    def init(params, key, stats):
        del key, stats
        return transformation.init(params)

    def update(grads, state, params):
        return transformation.update(grads, state, params)

    return GradientTransform(name, init, update=update, hparams={"transform": name})


def as_transform(t: Any) -> GradientTransform:
    """``t`` itself if it is a :class:`GradientTransform`, :func:`from_optax` of an optax one."""
    if isinstance(t, GradientTransform):
        return t
    if _is_optax(t):
        return from_optax(t)
    raise TypeError(
        f"expected a GradientTransform (sharpness_aware(...), saliency_mask(...)) or an optax "
        f"GradientTransformation (optax.clip_by_global_norm(1.0), ...), got {type(t).__name__}."
    )


def identity() -> GradientTransform:
    """The transform that changes nothing (the default of a gradient method)."""
    return GradientTransform("identity", _no_state)


def chain(*transforms: Any) -> GradientTransform:
    r"""Composes gradient transforms (optax transforms included) in order, like ``optax.chain``.

    The ``wrap``\ s nest in order (the first wraps the plain gradient), the ``update``\ s run in
    order on the gradient they produce, and ``update_mask``\ s are AND-ed. The chain's state is the
    tuple of the parts' states; statistics are namespaced ``"<index>/<name>"``.

    Examples:
      >>> import optax
      >>> t = chain(sharpness_aware(0.01), saliency_mask(0.5), optax.clip_by_global_norm(1.0))
      >>> t.name
      'chain(sam, saliency_mask, optax)'
    """
    parts = tuple(as_transform(t) for t in transforms)
    if len(parts) == 1:
        return parts[0]
    statistics = {
        f"{i}/{name}": stat for i, p in enumerate(parts) for name, stat in p.statistics.items()
    }

    def own_stats(i, stats):
        prefix = f"{i}/"
        return {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}

    def init(params, key, stats):
        keys = jax.random.split(key, max(len(parts), 1))
        return tuple(p.init(params, keys[i], own_stats(i, stats)) for i, p in enumerate(parts))

    def wrap(inner, states):
        for p, s in zip(parts, states, strict=True):
            if p.wrap is not None:
                inner = p.wrap(inner, s)
        return inner

    def update(grads, states, params):
        new_states = []
        for p, s in zip(parts, states, strict=True):
            if p.update is not None:
                grads, s = p.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    def update_mask(states):
        masks = [p.update_mask(s) for p, s in zip(parts, states, strict=True) if p.update_mask]
        return functools.reduce(lambda a, b: jax.tree_util.tree_map(jnp.logical_and, a, b), masks)

    has_mask = any(p.update_mask is not None for p in parts)
    return GradientTransform(
        "chain(" + ", ".join(p.name for p in parts) + ")",
        init,
        wrap=wrap if any(p.wrap is not None for p in parts) else None,
        update=update if any(p.update is not None for p in parts) else None,
        update_mask=update_mask if has_mask else None,
        statistics=statistics,
        hparams={"transforms": [{"name": p.name, **dict(p.hparams)} for p in parts]},
    )


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

    return GradientTransform("sam", _no_state, wrap=wrap, hparams={"sam_rho": rho})


# ---- saliency ------------------------------------------------------------------------------------
def _leaf_counts(tree) -> tuple[int, ...]:
    return tuple(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def kth_largest(scores: Params, k: int) -> jax.Array:
    r"""The ``k``-th largest entry over ALL leaves of ``scores`` (entries ``>= 0``), exactly.

    Bisection on the threshold's float32 bit pattern: for non-negative floats the order of the bit
    patterns (as integers) is the order of the values, so 32 halvings of ``[0, bits(max)]`` find the
    largest :math:`t` with :math:`\#\{s \ge t\} \ge k`, which is the ``k``-th largest value. Each
    count is a sum of per-leaf counts: the leaves are never raveled or concatenated, so a sharded
    leaf stays sharded (its count is all-reduced). Jittable; float32 (other float dtypes are cast).
    """
    leaves = [jnp.asarray(leaf, jnp.float32) for leaf in jax.tree_util.tree_leaves(scores)]

    def bits(x):
        return jax.lax.bitcast_convert_type(x, jnp.int32)

    def count_at_least(t_bits):
        t = jax.lax.bitcast_convert_type(t_bits, jnp.float32)
        return sum(jnp.sum(leaf >= t, dtype=jnp.int32) for leaf in leaves)

    top = bits(functools.reduce(jnp.maximum, [jnp.max(leaf) for leaf in leaves]))

    def body(_, bounds):
        lo, hi = bounds  # invariant: count(lo) >= k > count(hi + 1) once hi is tight
        mid = lo + (hi - lo + 1) // 2
        enough = count_at_least(mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros((), jnp.int32), top))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def top_fraction_mask(scores: Params, fraction: float) -> Params:
    r"""A boolean pytree keeping the ``k = max(1, round(fraction * P))`` largest scores of ALL leaves.

    The ranking is global (across tensors, not per tensor). The threshold :math:`t` is the ``k``-th
    largest score (:func:`kth_largest`: no leaf is raveled or concatenated, so sharded parameters
    stay sharded) and the mask keeps :math:`s \ge t`: exactly ``k`` entries when the scores are
    distinct, all of a tie at the threshold otherwise. A zero score is never kept (a weight with no
    forget gradient is not salient), so when more than ``P - k`` scores are 0 fewer than ``k``
    entries are kept. Jittable.

    Args:
      scores: a pytree of real arrays ``>= 0`` (e.g. absolute gradients).
      fraction: kept fraction in ``(0, 1]``.

    Raises:
      ValueError: ``fraction`` outside ``(0, 1]``.
    """
    _validate.in_interval("fraction", fraction, 0.0, 1.0, closed="right")
    total = sum(_leaf_counts(scores))
    k = max(1, min(total, round(fraction * total)))
    threshold = kth_largest(scores, k)
    return jax.tree_util.tree_map(lambda s: (s >= threshold) & (s > 0), scores)


class SaliencyState(NamedTuple):
    """State of :func:`saliency_mask`: the mask (True = may move) and its kept fraction."""

    mask: Params
    kept_fraction: jax.Array


def _forget_gradient_sum(task):
    return reductions.gradient_sum(task.loss)


def saliency_mask(fraction: float = 0.5, *, batch_size: int = 256) -> GradientTransform:
    r"""SalUn's weight-saliency mask: only the weights most salient for the forget loss move.

    Computed once, before the first step, from the parameters before unlearning:

    .. math::
        s = \Bigl|\sum_{i \in D_f} \nabla_\theta \ell(z_i; \theta_0)\Bigr|, \qquad
        m = \mathbb 1[s \ge \text{the } k\text{-th largest entry of } s], \quad k = \text{round}(
        \text{fraction}\cdot P),

    ranked across ALL tensors (see :func:`top_fraction_mask`). The summed forget gradient is a
    streaming reduction over the forget set (``batch_size`` rows at a time). Every step then uses
    :math:`m \odot g` and sets :math:`\theta \leftarrow \text{where}(m, \theta + u, \theta)` for the
    optimizer's update :math:`u`, so masked-out weights stay bit-identical even with weight decay or
    momentum (the reference code masked only the gradient, letting weight decay move them).

    Args:
      fraction: kept fraction of the weights, in ``(0, 1]`` (SalUn's default 0.5).
      batch_size: forget examples per batch of the saliency pass.

    Guarantees:
      Masked-out weights are unchanged bit for bit; the unlearning itself stays approximate.

    References:
      Fan, Liu, Zhang, Wei, Wong, Liu. SalUn: Empowering Machine Unlearning via Gradient-based Weight
      Saliency in Both Image Classification and Generation. ICLR 2024 (arXiv:2310.12508), eq. (3)-(4).

    Raises:
      ValueError: ``fraction`` outside ``(0, 1]``.
    """
    _validate.in_interval("fraction", fraction, 0.0, 1.0, closed="right")
    _validate.positive_int(batch_size=batch_size)

    def init(params, key, stats):
        del params, key
        saliency = jax.tree_util.tree_map(jnp.abs, stats["forget_gradient"].value)
        mask = top_fraction_mask(saliency, fraction)
        kept = sum(jnp.sum(m) for m in jax.tree_util.tree_leaves(mask))
        total = sum(_leaf_counts(mask))
        return SaliencyState(mask, (kept / total).astype(jnp.float32))

    def update(grads, state, params):
        del params
        return jax.tree_util.tree_map(lambda m, g: jnp.where(m, g, 0), state.mask, grads), state

    return GradientTransform(
        "saliency_mask",
        init,
        update=update,
        update_mask=lambda state: state.mask,
        statistics={"forget_gradient": Statistic(_forget_gradient_sum, "forget", batch_size)},
        hparams={"mask_fraction": fraction},
    )


__all__ = [
    "GradientTransform",
    "SaliencyState",
    "ValueAndGrad",
    "as_transform",
    "chain",
    "from_optax",
    "identity",
    "kth_largest",
    "saliency_mask",
    "sam_perturbation",
    "sharpness_aware",
    "top_fraction_mask",
    "value_and_grad",
]
