"""Small digits models shared by the method tests, trained once per test session (cached)."""

import functools

import jax
import optax

from unlearn_jax import data
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import create_train_state, fit, fit_full_batch


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


def fit_logistic(task, params, l2, member_ids=None, *, max_steps=3000, tol=1e-10):
    """L2-regularised multinomial logistic regression on digits train (or the members) to ``tol``."""
    return fit_full_batch(
        task, params, digits().train, l2=l2, member_ids=member_ids, max_steps=max_steps, tol=tol
    )
