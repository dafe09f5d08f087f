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

This is exact (up to floating point). The reference code builds :math:`F^{-1}` by a chain of
Sherman-Morrison updates whose recursion only ever subtracts the FIRST gradient's direction, so it
does not compute :math:`F^{-1}v` for :math:`N > 1`; here the exact solve replaces it. The reference
starts its chain from the identity, i.e. :math:`\lambda = 1`, the default below.

References:
  Jia, Liu, et al. "Model Sparsity Can Simplify Machine Unlearning" (l1-sparse), NeurIPS 2023 (IU
  baseline); Singh, Alistarh. "WoodFisher: Efficient Second-Order Approximation for Neural Network
  Compression", NeurIPS 2020; Koh & Liang, ICML 2017.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate
from unlearn_jax.core.grads import per_example_grads
from unlearn_jax.methods._streaming import mean_loss_grad
from unlearn_jax.methods.base import Unlearner

Params = Any


def woodbury_inverse_vp(grads: jax.Array, v: jax.Array, damping: float) -> jax.Array:
    r"""Exact :math:`(\lambda I + G^\top G / N)^{-1} v` via the :math:`N \times N` Woodbury identity.

    .. math:: \lambda^{-1} \bigl[v - G^\top (N\lambda I + G G^\top)^{-1} G v\bigr]

    Args:
      grads: :math:`G`, ``[N, P]``.
      v: ``[P]``.
      damping: :math:`\lambda > 0`.

    Returns:
      ``[P]``. Cost :math:`O(N^2 P + N^3)`; memory :math:`O(N^2 + NP)`. Jit-able.
    """
    n = grads.shape[0]
    gram = grads @ grads.T + n * damping * jnp.eye(n, dtype=grads.dtype)  # SPD
    chol = jnp.linalg.cholesky(gram)
    y = jax.scipy.linalg.cho_solve((chol, True), grads @ v)
    return (v - grads.T @ y) / damping


@functools.partial(jax.jit, static_argnames=("task", "chunk_size"))
def _woodbury_direction(params, sample, v, damping, *, task, chunk_size):
    grads = per_example_grads(task.loss, params, sample, chunk_size=chunk_size)
    matrix = jax.vmap(lambda g: jax.flatten_util.ravel_pytree(g)[0])(grads)  # [N, P]
    return woodbury_inverse_vp(matrix, v, damping)


class WoodFisherState(NamedTuple):
    """The direction ``F^{-1} v`` (a pytree like the params) and what went into it."""

    direction: Params
    v_norm: jax.Array
    num_grads: int


def woodfisher_direction(
    task,
    params: Params,
    forget,
    retain,
    key: jax.Array,
    *,
    damping: float = 1.0,
    num_grads: int = 1000,
    batch_size: int = 256,
    chunk_size: int | None = None,
) -> WoodFisherState:
    r"""Computes :math:`F^{-1} v` of WoodFisher IU (module docstring).

    Args:
      task: the model's :class:`~unlearn_jax.Task`.
      params: the parameters :math:`\theta`.
      forget, retain: :class:`~unlearn_jax.data.Dataset`s.
      key: picks the :math:`N` retain examples (without replacement) whose gradients form :math:`G`.
      damping: :math:`\lambda > 0`.
      num_grads: :math:`N` (capped at the retain-set size; reference 1000).
      batch_size: examples per pass when averaging gradients.
      chunk_size: per-example gradients computed this many at a time.

    Returns:
      :class:`WoodFisherState`.
    """
    n_f, n_r = len(forget), len(retain)
    n = n_f + n_r
    g_f = mean_loss_grad(task, params, forget, batch_size)
    g_r = mean_loss_grad(task, params, retain, batch_size)
    v_tree = jax.tree_util.tree_map(lambda a, b: (n_f / n) * (a - b), g_f, g_r)
    v, unravel = jax.flatten_util.ravel_pytree(v_tree)
    count = min(num_grads, n_r)
    rows = np.asarray(jax.random.choice(key, n_r, (count,), replace=False))
    sample = {k: jnp.asarray(a) for k, a in retain.take(rows).as_batch().items() if k != "id"}
    direction = _woodbury_direction(params, sample, v, damping, task=task, chunk_size=chunk_size)
    return WoodFisherState(unravel(direction), jnp.linalg.norm(v), count)


def woodfisher(
    alpha: float = 0.2,
    *,
    damping: float = 1.0,
    num_grads: int = 1000,
    batch_size: int = 256,
    chunk_size: int | None = None,
) -> Unlearner:
    r"""WoodFisher influence unlearning as a one-shot :class:`Unlearner`.

    :math:`\theta \leftarrow \theta + \alpha (\lambda I + G^\top G/N)^{-1}
    \frac{n_f}{n}(\bar g_F - \bar g_R)`, the inverse applied exactly by Woodbury
    (:func:`woodbury_inverse_vp`). ``init`` computes the direction (streaming mean gradients, ``N``
    per-example retain gradients); ``update`` applies it.

    Guarantees:
      Approximate (an influence-function step with a damped empirical-Fisher curvature). The linear
      solve itself is exact.

    Args:
      alpha: step size :math:`\alpha > 0` (reference scripts: about 0.2; tune per model).
      damping: :math:`\lambda > 0` (the reference's implied value is 1).
      num_grads: :math:`N`, retain gradients in the Fisher (reference 1000).
      batch_size: examples per pass for the mean gradients.
      chunk_size: per-example gradients computed this many at a time.

    Returns:
      An :class:`Unlearner` named ``"woodfisher"``.

    References:
      Jia et al., NeurIPS 2023; Singh & Alistarh, NeurIPS 2020.
    """
    _validate.positive(alpha=alpha, damping=damping)
    _validate.positive_int(num_grads=num_grads, batch_size=batch_size, chunk_size=chunk_size)

    def init(train_state, task, forget, retain, key):
        return woodfisher_direction(
            task,
            train_state.params,
            forget,
            retain,
            key,
            damping=damping,
            num_grads=num_grads,
            batch_size=batch_size,
            chunk_size=chunk_size,
        )

    def update(train_state, method_state, task, forget_batch, retain_batch, key):
        del retain_batch, key
        params = jax.tree_util.tree_map(
            lambda p, d: (p + alpha * d).astype(p.dtype), train_state.params, method_state.direction
        )
        metrics = {
            "loss": task.batch_loss(params, forget_batch),
            "woodfisher/step_norm": alpha * optax.tree.norm(method_state.direction),
            "woodfisher/v_norm": method_state.v_norm,
        }
        return train_state.replace(params=params), method_state, metrics

    return Unlearner(
        init=init,
        update=update,
        name="woodfisher",
        needs_retain=True,
        needs_forget_batches=True,
        one_shot=True,
        hparams={"alpha": alpha, "damping": damping, "num_grads": num_grads},
    )
