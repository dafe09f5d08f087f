r"""Full-batch fits of convex objectives to a tight optimum (L-BFGS), written once.

For convex models (L2-regularised logistic or least-squares regression) the exact optimum on a subset
is the reference that influence / Newton removal and certified removal are compared with; every such
fit in the library and its tests goes through :func:`fit_full_batch`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate
from unlearn_jax.core.task import Task
from unlearn_jax.training.minibatch import _check_dataset


@functools.cache
def _lbfgs_runner(task: Task, l2: float, max_steps: int, tol: float):
    """One jitted L-BFGS loop per (task, l2, max_steps, tol); data and weights are arguments, so
    training on all data and every retraining on a subset share one compilation."""
    opt = optax.lbfgs()

    @jax.jit
    def run(params, weights, batch):
        def objective(p):
            losses = task.batch_losses(p, batch)
            reg = 0.5 * l2 * optax.tree.norm(p, squared=True)
            return jnp.sum(weights * losses) / jnp.sum(weights) + reg

        value_and_grad = optax.value_and_grad_from_state(objective)

        def step(carry):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
            return optax.apply_updates(p, updates), state

        def cond(carry):
            _, state = carry
            k = optax.tree.get(state, "count")
            g = optax.tree.get(state, "grad")
            return (k == 0) | ((k < max_steps) & (optax.tree.norm(g) > tol))

        return jax.lax.while_loop(cond, step, (params, opt.init(params)))[0]

    return run


def fit_full_batch(
    task: Task,
    params: Any,
    train: Any,
    *,
    l2: float,
    member_ids: Any = None,
    max_steps: int = 3000,
    tol: float = 1e-10,
) -> Any:
    r"""Minimises a convex full-batch objective to a tight optimum with L-BFGS.

    .. math:: L(\theta) = \frac{\sum_i w_i \ell_i(\theta)}{\sum_i w_i}
              + \frac{\lambda}{2} \lVert\theta\rVert^2, \qquad w_i = [\text{id}_i \in \text{members}]

    For convex models (L2-regularised logistic regression), where influence / Newton removal is
    compared with the exact retrained optimum. Stops when ``||grad L|| <= tol`` or after
    ``max_steps`` L-BFGS steps. ``member_ids=None`` uses every example.

    Returns:
      The parameters at the optimum, like ``params``.
    """
    _validate.non_negative(l2=l2)
    _validate.positive_int(max_steps=max_steps)
    _validate.positive(tol=tol)
    _check_dataset(train, "train")
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    weights = np.ones(len(train.ids))
    if member_ids is not None:
        weights = np.isin(train.ids, np.asarray(member_ids)).astype(np.float64)
        if not weights.any():
            raise ValueError("fit_full_batch: none of member_ids is in the training set.")
    batch = {k: v for k, v in train.as_batch().items() if k != "id"}
    run = _lbfgs_runner(task, float(l2), int(max_steps), float(tol))
    return run(params, jnp.asarray(weights, dtype), batch)


__all__ = ["fit_full_batch"]
