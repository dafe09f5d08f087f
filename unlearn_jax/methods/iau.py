r"""IAU, influence approximation unlearning: forgetting as incremental learning with negated gradients.

The paper's argument: by the influence function, removing an example :math:`z` changes the model as
adding an example whose gradient is :math:`-\nabla\ell(z)` would, so unlearning can be done by an
incremental-learning step. IAU combines

1. **incremental approximation**: a step along :math:`+\nabla \ell(z)` for the forget examples
   (i.e. descending :math:`-\ell` on :math:`D_f`);
2. **gradient correction**: a descent step on the retained data, which compensates the drift;
3. **gradient restriction** at training time: a penalty that keeps per-batch gradients small, so the
   model is near a flat point where the one-step influence approximation is accurate.

Steps 1 and 2 form a single update on

.. math:: g = \nabla_\theta \Bigl[\frac{1}{n_r}\sum_{i \in D_r} \ell(z_i;\theta)
          - \frac{1}{n_f} \sum_{j \in D_f} \ell(z_j;\theta)\Bigr]

taken over the full sets. The authors' code takes ONE Adam step with learning rate
:math:`10^{-3}` on :math:`g` (from a fresh Adam state; its first step is about
:math:`-\eta\, \mathrm{sign}(g)`), which is the default here so that published numbers can be
compared; the plain-gradient reading of the paper is ``optimizer=optax.sgd(lr)``,
:math:`\theta \leftarrow \theta - \eta g`.

Step 3 is :func:`gradient_restriction`, a regulariser for :func:`unlearn_jax.training.fit`:
:math:`R(\theta) = \alpha \sum_{\text{tensors } t} \lVert \nabla_{\theta_t} L_{\text{batch}}(\theta)
\rVert_2` (:math:`\alpha = 0.005` in the authors' code), whose gradient needs double
backpropagation.

References:
  "Efficient Machine Unlearning via Influence Approximation" (IAU), 2025, and the authors' code
  (github.com/Lolo1222/IAU; the one-Adam-step update and alpha = 0.005 come from it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate
from unlearn_jax.core import reductions
from unlearn_jax.methods.protocol import FORGET, RETAIN, Feeds, Statistic, Unlearner

Params = Any


def gradient_restriction(task, alpha: float = 0.005):
    r"""IAU's training-time penalty as a ``training.fit`` regulariser ``R(params, batch, mask)``.

    .. math:: R(\theta) = \alpha \sum_{t} \bigl\lVert \nabla_{\theta_t} L_B(\theta) \bigr\rVert_2,
              \qquad L_B(\theta) = \frac{\sum_i m_i \ell(z_i; \theta)}{\max(\sum_i m_i, 1)},

    the sum running over the parameter tensors :math:`\theta_t` (every leaf of the params) and
    :math:`m` the batch mask that ``fit`` passes (0 on padding rows). ``fit`` differentiates the
    training loss plus :math:`R`, so the inner gradient is differentiated again (double
    backpropagation; no ``stop_gradient`` anywhere). The norm is the "safe" norm whose gradient at a
    zero tensor is 0 instead of NaN (e.g. a ReLU layer with no active unit in the batch).

    Args:
      task: the model's :class:`~unlearn_jax.Task`.
      alpha: the penalty weight :math:`\alpha \ge 0` (authors' code: 0.005).

    Returns:
      ``regularizer(params, batch, mask) -> scalar`` for ``fit(..., regularizer=...)``.
    """
    _validate.non_negative(alpha=alpha)

    def regularizer(params, batch, mask):
        def batch_loss(p):
            losses = task.batch_losses(p, batch)
            m = jnp.asarray(mask, losses.dtype)
            return jnp.sum(m * losses) / jnp.maximum(jnp.sum(m), 1.0)

        grads = jax.grad(batch_loss)(params)
        norms = [optax.safe_norm(g, 0.0) for g in jax.tree_util.tree_leaves(grads)]
        return alpha * sum(norms)

    return regularizer


class IAUState(NamedTuple):
    """The full-batch gradient ``g`` of ``mean_r l - w_f mean_f l`` at the original parameters."""

    grad: Params


def _mean_gradient(task):
    return reductions.mean_gradient(task.loss)


def iau(
    learning_rate: float = 1e-3,
    *,
    optimizer: optax.GradientTransformation | None = None,
    forget_weight: float = 1.0,
    batch_size: int = 256,
) -> Unlearner:
    r"""IAU's unlearning update as a one-shot :class:`~unlearn_jax.methods.protocol.Unlearner`.

    .. math:: \theta \leftarrow \theta + \mathrm{opt}\bigl(g\bigr), \qquad
              g = \nabla\bigl[\bar\ell_{D_r}(\theta) - w_f\, \bar\ell_{D_f}(\theta)\bigr],

    one step of ``optimizer`` (default ``optax.adam(learning_rate)``, the authors' code) from a fresh
    optimizer state, with the full-set mean gradients as streaming statistics (``batch_size``
    examples at a time).

    Guarantees:
      Approximate. Best on models trained with :func:`gradient_restriction`, which keeps the
      training loss near a flat point where the one-step influence approximation is accurate.

    Args:
      learning_rate: the step size (authors' code: 1e-3 with Adam).
      optimizer: any optax transformation for the single step; ``optax.sgd(lr)`` gives the paper's
        plain gradient step. Overrides ``learning_rate``.
      forget_weight: :math:`w_f`, the weight of the forget term (1 in the paper and code).
      batch_size: examples per batch of the mean-gradient passes.

    Returns:
      An :class:`Unlearner` named ``"iau"``.
    """
    _validate.positive(learning_rate=learning_rate)
    _validate.non_negative(forget_weight=forget_weight)
    _validate.positive_int(batch_size=batch_size)
    tx = optimizer if optimizer is not None else optax.adam(learning_rate)

    def init(task, params, key, stats, plan):
        del task, params, key, plan
        g_r, g_f = stats["retain_mean"].value, stats["forget_mean"].value
        return IAUState(jax.tree_util.tree_map(lambda r, f: r - forget_weight * f, g_r, g_f))

    def update(task, params, method_state, forget_batch, retain_batch, key):
        del retain_batch, key
        updates, _ = tx.update(method_state.grad, tx.init(params), params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": task.batch_loss(new_params, forget_batch),
            "iau/grad_norm": optax.tree.norm(method_state.grad),
            "iau/step_norm": optax.tree.norm(updates),
        }
        return new_params, method_state, metrics

    return Unlearner(
        init=init,
        update=update,
        name="iau",
        feeds=Feeds(
            batches=(FORGET,),
            statistics={
                "retain_mean": Statistic(_mean_gradient, RETAIN, batch_size),
                "forget_mean": Statistic(_mean_gradient, FORGET, batch_size),
            },
            run={"steps": 1},
        ),
        guarantee="approximate",
        hparams={
            "learning_rate": learning_rate,
            "optimizer": "adam" if optimizer is None else "custom",
            "forget_weight": forget_weight,
        },
    )


__all__ = ["IAUState", "gradient_restriction", "iau"]
