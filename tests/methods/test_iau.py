"""IAU: the one-step update and the gradient-restriction penalty (differentiated through, not constant)."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests._problems import mlp_problem
from tests.methods._digits import digits, trained_mlp
from unlearn_jax import data
from unlearn_jax.core.task import Task
from unlearn_jax.methods.driver import unlearn
from unlearn_jax.methods.iau import gradient_restriction, iau
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import create_train_state, fit


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def small():
    """A plain-JAX tanh MLP wrapped in a Task (float64 inside the test functions)."""
    params, batch, _, logits_fn = mlp_problem(n=10, d=4, hidden=5, classes=3, dtype=np.float64)
    task = Task(apply=lambda p, x: jax.vmap(lambda xi: logits_fn(p, {"x": xi}))(x))
    return params, batch, task


def test_penalty_value_is_alpha_times_sum_of_tensor_norms(small):
    params, batch, task = small
    params = jax.tree_util.tree_map(jnp.asarray, params)
    mask = jnp.asarray([1.0] * 8 + [0.0] * 2)  # the last two rows are padding
    reg = gradient_restriction(task, alpha=0.005)
    # Reference: the gradient of the masked mean loss, then per-tensor L2 norms, by hand.
    real = jax.tree_util.tree_map(lambda a: a[:8], batch)
    g = jax.jit(jax.grad(lambda p: jnp.mean(task.batch_losses(p, real))))(params)
    want = 0.005 * sum(
        float(np.linalg.norm(np.asarray(t).ravel())) for t in jax.tree_util.tree_leaves(g)
    )
    assert float(jax.jit(reg)(params, batch, mask)) == pytest.approx(want, rel=1e-12)
    assert len(jax.tree_util.tree_leaves(g)) == 4  # four tensors, four norms


def test_penalty_is_differentiated_through_double_backprop(small):
    """d R / d theta matches central finite differences; a stop_gradient'ed inner gradient would give 0."""
    params, batch, task = small
    params = jax.tree_util.tree_map(jnp.asarray, params)
    mask = jnp.ones(10)
    reg = gradient_restriction(task, alpha=1.0)
    grad = jax.jit(jax.grad(lambda p: reg(p, batch, mask)))(params)
    flat_grad, unravel = jax.flatten_util.ravel_pytree(grad)
    value = jax.jit(lambda fp: reg(unravel(fp), batch, mask))
    assert float(jnp.linalg.norm(flat_grad)) > 1e-3
    flat_params = jax.flatten_util.ravel_pytree(params)[0]
    direction = jax.random.normal(jax.random.key(0), flat_params.shape, jnp.float64)
    f = lambda t: float(value(flat_params + t * direction))
    h = 1e-5
    finite_difference = (f(h) - f(-h)) / (2 * h)
    assert float(flat_grad @ direction) == pytest.approx(finite_difference, rel=1e-6)

    def frozen(p):  # what a constant (non-differentiated) penalty would contribute
        g = jax.lax.stop_gradient(jax.grad(lambda q: jnp.mean(task.batch_losses(q, batch)))(p))
        return sum(jnp.linalg.norm(t) for t in jax.tree_util.tree_leaves(g))

    frozen_grad = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(frozen))(params))[0]
    assert float(jnp.linalg.norm(frozen_grad)) == 0.0


def test_penalty_gradient_is_finite_at_a_zero_tensor_gradient():
    """A tensor whose gradient is exactly zero (a dead ReLU layer) must not produce NaN."""
    task = Task(apply=lambda p, x: jnp.maximum(x @ p["w1"], 0.0) @ p["w2"] + p["b"][None])
    params = {"w1": -jnp.ones((3, 4)), "w2": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    batch = {
        "x": jnp.ones((5, 3)),
        "y": jnp.zeros(5, jnp.int32),
    }  # relu is dead: grads of w1, w2 = 0
    reg = gradient_restriction(task, alpha=0.005)
    grad = jax.jit(jax.grad(lambda p: reg(p, batch, jnp.ones(5))))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grad))


def test_penalty_trains_with_fit():
    splits = digits()
    model = get_model("mlp", num_outputs=10, hidden_sizes=(16,))
    task = model_task(model)
    state = create_train_state(model, splits.train.x[:1], optax.adam(3e-3), jax.random.key(0))
    state, history = fit(
        state,
        task,
        splits.train,
        epochs=2,
        batch_size=512,
        key=jax.random.key(1),
        regularizer=gradient_restriction(task, alpha=0.005),
    )
    assert len(history["regularizer"]) == 2 and all(np.isfinite(history["regularizer"]))
    assert history["regularizer"][0] > 0


def test_iau_is_one_adam_step_on_retain_minus_forget_gradient():
    splits, task, state = trained_mlp()
    split = data.random_forget(splits.train, 0.05, seed=0)
    result = unlearn(iau(), state, task, split.forget, split.retain, key=jax.random.key(0))
    # Reference: full-batch gradients by jax.grad and Adam's first step written out:
    # m = (1 - b1) g, v = (1 - b2) g^2, m_hat = g, v_hat = g^2, step = -lr g / (|g| + eps).
    loss = lambda p, ds: task.batch_loss(p, {"x": jnp.asarray(ds.x), "y": jnp.asarray(ds.y)})
    g = jax.jit(jax.grad(lambda p: loss(p, split.retain) - loss(p, split.forget)))(state.params)
    want = jax.tree_util.tree_map(
        lambda p, gi: p - 1e-3 * gi / (jnp.abs(gi) + 1e-8), state.params, g
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6),
        result.state.params,
        want,
    )
    # The paper's plain gradient step: theta - lr g.
    sgd = unlearn(
        iau(optimizer=optax.sgd(0.5)),
        state,
        task,
        split.forget,
        split.retain,
        key=jax.random.key(0),
    )
    want = jax.tree_util.tree_map(lambda p, gi: p - 0.5 * gi, state.params, g)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sgd.state.params, want
    )
    assert sgd.hparams["optimizer"] == "custom" and result.hparams["learning_rate"] == 1e-3
