"""Small digits models shared by the method tests, trained once per test session (cached)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import data
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import create_train_state, fit


@functools.cache
def digits():
    return data.load("digits")


@functools.cache
def trained_mlp(hidden_sizes=(64,), epochs=10, seed=0):
    """``(splits, task, state)``: an MLP trained with Adam on the digits training set."""
    splits = digits()
    model = get_model("mlp", num_outputs=10, hidden_sizes=hidden_sizes)
    task = model_task(model)
    state = create_train_state(model, splits.train.x[:1], optax.adam(3e-3), jax.random.key(seed))
    state, _ = fit(
        state, task, splits.train, epochs=epochs, batch_size=64, key=jax.random.key(seed + 1)
    )
    return splits, task, state


@functools.cache
def _weighted_lbfgs(task, l2, max_steps, tol):
    """A jitted full-batch L-BFGS on ``sum_i w_i l_i / sum_i w_i + (l2/2)||theta||^2`` over digits train.

    The weights select the members (1) and drop the others (0), so training on all data and every
    retraining share one compilation.
    """
    batch = {k: v for k, v in digits().train.as_batch().items() if k != "id"}
    opt = optax.lbfgs()

    @jax.jit
    def run(params, weights):
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


def fit_logistic(task, params, l2, member_ids=None, *, max_steps=3000, tol=1e-10):
    """L2-regularised multinomial logistic regression on digits train (or the members) to ``tol``."""
    train = digits().train
    weights = np.ones(len(train), np.float64)
    if member_ids is not None:
        weights = np.isin(train.ids, np.asarray(member_ids)).astype(np.float64)
    run = _weighted_lbfgs(task, float(l2), max_steps, tol)
    return run(params, jnp.asarray(weights, jax.tree_util.tree_leaves(params)[0].dtype))
