r"""WoodFisher influence unlearning (IU), the baseline of the l1-sparse and SalUn papers, solved exactly.

The update moves the parameters along the inverse empirical Fisher times the difference of the mean
forget and retain gradients:

.. math::
    v = \frac{n_f}{n} \bigl(\bar g_F - \bar g_R\bigr), \qquad
    \theta \leftarrow \theta + \alpha\, F^{-1} v, \qquad
    F = \lambda I + \frac1N G^\top G,

where :math:`\bar g_F, \bar g_R` are the mean loss gradients over the forget and retain sets and the
rows of :math:`G \in \mathbb{R}^{N \times P}` are :math:`N` per-example retain gradients. With
:math:`N \ll P`, the Woodbury identity inverts :math:`F` through an :math:`N \times N` system:

.. math::
    F^{-1} v = \frac1\lambda \Bigl[v - G^\top \bigl(N \lambda I_N + G G^\top\bigr)^{-1} G v\Bigr].

Nothing is raveled: :math:`G G^\top = \sum_\ell G_\ell G_\ell^\top` and :math:`G v` are sums over the
parameter leaves, and :math:`G^\top y` is formed leaf by leaf, so sharded parameters stay sharded.
This is exact (up to floating point). The reference code builds :math:`F^{-1}` by a chain of
Sherman-Morrison updates whose recursion only ever subtracts the FIRST gradient's direction, so it
does not compute :math:`F^{-1}v` for :math:`N > 1`; here the exact solve replaces it. The reference
starts its chain from the identity, i.e. :math:`\lambda = 1`, the default below.

Data. The mean gradients are streaming reductions over the whole forget and retain sets; the
:math:`N` per-example gradients come from one batch of :math:`N` retain examples drawn uniformly
without replacement (all of them when the retain set is smaller). Memory is :math:`N \times P`
floats for :math:`G`: above ``max_bytes`` the method refuses, naming the size, rather than run out of
memory.

References:
  Jia, Liu, et al. "Model Sparsity Can Simplify Machine Unlearning" (l1-sparse), NeurIPS 2023 (IU
  baseline); Singh, Alistarh. "WoodFisher: Efficient Second-Order Approximation for Neural Network
  Compression", NeurIPS 2020; Koh & Liang, ICML 2017.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate
from unlearn_jax.core import reductions
from unlearn_jax.core.batch import row_mask
from unlearn_jax.core.grads import per_example_grads
from unlearn_jax.methods.protocol import FORGET, RETAIN, Feeds, Statistic, Unlearner

Params = Any
MAX_BYTES = 2 * 1024**3


def _rows(leaf: jax.Array) -> jax.Array:
    return leaf.reshape(leaf.shape[0], -1)


def woodbury_inverse_vp(grads: Params, v: Params, damping, num: jax.Array | None = None) -> Params:
    r"""Exact :math:`(\lambda I + G^\top G / N)^{-1} v` via the :math:`N \times N` Woodbury identity.

    .. math:: \lambda^{-1} \bigl[v - G^\top (N\lambda I + G G^\top)^{-1} G v\bigr]

    Args:
      grads: :math:`G`: a pytree whose leaves are ``[N, *shape]`` (one gradient per row), or an
        ``[N, P]`` array; zero rows (padding) add nothing.
      v: a pytree like one row of ``grads`` (or ``[P]``).
      damping: :math:`\lambda > 0`.
      num: :math:`N` in :math:`G^\top G / N` (default: the number of rows); pass the number of
        real rows when ``grads`` carries zero padding rows.

    Returns:
      A pytree like ``v``. Cost :math:`O(N^2 P + N^3)`; memory :math:`O(N^2 + NP)`; no leaf is
      raveled with another. Jit-able.
    """
    g_leaves = jax.tree_util.tree_leaves(grads)
    v_leaves, treedef = jax.tree_util.tree_flatten(v)
    n_rows = g_leaves[0].shape[0]
    dtype = g_leaves[0].dtype
    num = jnp.asarray(n_rows if num is None else num, dtype)
    gram = sum(_rows(g) @ _rows(g).T for g in g_leaves)
    gram = gram + num * damping * jnp.eye(n_rows, dtype=dtype)  # SPD
    gv = sum(_rows(g) @ vl.reshape(-1) for g, vl in zip(g_leaves, v_leaves, strict=True))
    chol = jnp.linalg.cholesky(gram)
    y = jax.scipy.linalg.cho_solve((chol, True), gv)
    out = [
        (vl - jnp.tensordot(y, g, axes=1)) / damping
        for g, vl in zip(g_leaves, v_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


class WoodFisherState(NamedTuple):
    r"""WoodFisher's method state.

    Attributes:
      forget_mean: :math:`\bar g_F` (a statistic).
      retain_mean: :math:`\bar g_R` (a statistic).
      plan: the run plan (:math:`n_f, n_r`).
      direction: :math:`F^{-1} v` once computed (zeros before the update).
    """

    forget_mean: Params
    retain_mean: Params
    plan: Any
    direction: Params


def _mean_gradient(task):
    return reductions.mean_gradient(task.loss)


def woodfisher(
    alpha: float = 0.2,
    *,
    damping: float = 1.0,
    num_grads: int = 1000,
    batch_size: int = 256,
    chunk_size: int | None = None,
    max_bytes: int = MAX_BYTES,
) -> Unlearner:
    r"""WoodFisher influence unlearning as a one-shot :class:`~unlearn_jax.methods.protocol.Unlearner`.

    :math:`\theta \leftarrow \theta + \alpha (\lambda I + G^\top G/N)^{-1}
    \frac{n_f}{n}(\bar g_F - \bar g_R)`, the inverse applied exactly by Woodbury
    (:func:`woodbury_inverse_vp`). The mean gradients are streaming statistics; the single update
    forms the ``N`` per-example retain gradients of its retain batch and applies the step.

    Guarantees:
      Approximate (an influence-function step with a damped empirical-Fisher curvature). The linear
      solve itself is exact.

    Args:
      alpha: step size :math:`\alpha > 0` (reference scripts: about 0.2; tune per model).
      damping: :math:`\lambda > 0` (the reference's implied value is 1).
      num_grads: :math:`N`, retain gradients in the Fisher (reference 1000; all of the retain set
        when it is smaller).
      batch_size: examples per batch of the mean-gradient passes.
      chunk_size: per-example gradients computed this many at a time.
      max_bytes: refuse models for which the ``N x P`` gradients would take more memory.

    Returns:
      An :class:`Unlearner` named ``"woodfisher"``.

    Raises:
      ValueError: bad hyper-parameters; at ``init``, a model too large for ``N x P`` gradients.

    References:
      Jia et al., NeurIPS 2023; Singh & Alistarh, NeurIPS 2020.
    """
    _validate.positive(alpha=alpha, damping=damping)
    _validate.positive_int(num_grads=num_grads, batch_size=batch_size, chunk_size=chunk_size,
                           max_bytes=max_bytes)  # fmt: skip

    def init(task, params, key, stats, plan):
        del task, key
        leaves = jax.tree_util.tree_leaves(params)
        size = sum(int(jnp.size(leaf)) for leaf in leaves)
        needed = num_grads * size * jnp.dtype(leaves[0].dtype).itemsize
        if needed > max_bytes:
            raise ValueError(
                f"woodfisher: {num_grads} per-example gradients of {size:,} parameters take "
                f"{needed / 2**30:.1f} GiB > max_bytes={max_bytes / 2**30:.1f} GiB; lower num_grads, "
                "raise max_bytes, or use influence_removal (matrix-free CG)."
            )
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return WoodFisherState(stats["forget_mean"].value, stats["retain_mean"].value, plan, zeros)

    def update(task, params, method_state, forget_batch, retain_batch, key):
        del key
        plan = method_state.plan
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        n_f, n_r = plan.forget_size.astype(dtype), plan.retain_size.astype(dtype)
        v = jax.tree_util.tree_map(
            lambda f, r: (n_f / (n_f + n_r)) * (f - r),
            method_state.forget_mean,
            method_state.retain_mean,
        )
        mask = row_mask(retain_batch, dtype)
        sample = {k: a for k, a in retain_batch.items() if k not in ("mask", "id")}
        grads = per_example_grads(task.loss, params, sample, chunk_size=chunk_size)
        grads = jax.tree_util.tree_map(
            lambda g: g * mask.reshape((-1,) + (1,) * (g.ndim - 1)), grads
        )
        direction = woodbury_inverse_vp(grads, v, damping, jnp.sum(mask))
        new_params = jax.tree_util.tree_map(
            lambda p, d: (p + alpha * d).astype(p.dtype), params, direction
        )
        metrics = {
            "loss": task.batch_loss(new_params, forget_batch),
            "woodfisher/step_norm": alpha * optax.tree.norm(direction),
            "woodfisher/v_norm": optax.tree.norm(v),
            "woodfisher/num_grads": jnp.sum(mask),
        }
        return new_params, method_state._replace(direction=direction), metrics

    return Unlearner(
        init=init,
        update=update,
        name="woodfisher",
        feeds=Feeds(
            batches=(FORGET, RETAIN),
            statistics={
                "forget_mean": Statistic(_mean_gradient, FORGET, batch_size),
                "retain_mean": Statistic(_mean_gradient, RETAIN, batch_size),
            },
            run={"steps": 1},
            batch_size=num_grads,
        ),
        guarantee="approximate",
        hparams={"alpha": alpha, "damping": damping, "num_grads": num_grads},
    )


__all__ = ["WoodFisherState", "woodbury_inverse_vp", "woodfisher"]
