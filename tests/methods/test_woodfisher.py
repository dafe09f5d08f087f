"""WoodFisher IU: the N x N Woodbury solve equals a dense solve; the reference Sherman-Morrison chain does not."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from tests.methods._digits import trained_mlp
from unlearn_jax import data
from unlearn_jax.methods.driver import unlearn
from unlearn_jax.methods.woodfisher import woodbury_inverse_vp, woodfisher

RTOL_F64 = 1e-10


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def dense_solve(g, v, damping):
    n, p = g.shape
    return np.linalg.solve(damping * np.eye(p) + g.T @ g / n, v)


def reference_sherman_morrison_chain(g, v):
    """The reference code's recursion (implied damping 1), o_0 = g_0, for i >= 1:
    k <- k - (k . g_i) / (N + o . g_i) * o,  o <- o - (o . g_i) / (N + o . g_i) * o."""
    n = g.shape[0]
    k = v.copy()
    o = g[0].copy()
    for i in range(1, n):
        tmp = o @ g[i]
        k = k - (k @ g[i]) / (n + tmp) * o
        o = o - tmp / (n + tmp) * o
    return k


@pytest.mark.parametrize(("n", "p", "damping"), [(30, 50, 1.0), (80, 20, 0.1), (5, 200, 1e-3)])
def test_woodbury_equals_dense_solve(n, p, damping):
    rng = np.random.default_rng(n)
    g = rng.normal(size=(n, p)) * rng.exponential(size=(n, 1))
    v = rng.normal(size=p)
    got = woodbury_inverse_vp(jnp.asarray(g), jnp.asarray(v), damping)
    want = dense_solve(g, v, damping)
    np.testing.assert_allclose(got, want, rtol=RTOL_F64 * 1e3, atol=1e-12 * np.abs(want).max())
    # The residual of the defining system is at round-off level.
    residual = damping * np.asarray(got) + g.T @ (g @ np.asarray(got)) / n - v
    assert np.linalg.norm(residual) <= 1e-10 * np.linalg.norm(v)


def test_reference_chain_is_not_the_inverse():
    """Why the exact solve: the reference chain only subtracts the first gradient's direction."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(20, 30))
    v = rng.normal(size=30)
    chain = reference_sherman_morrison_chain(g, v)
    exact = dense_solve(g, v, 1.0)
    assert np.linalg.norm(chain - exact) > 0.05 * np.linalg.norm(exact)
    # Its correction lies in span(g_0) only.
    delta = chain - v
    cos = abs(delta @ g[0]) / (np.linalg.norm(delta) * np.linalg.norm(g[0]))
    assert cos == pytest.approx(1.0, abs=1e-9)


def test_direction_on_a_model_matches_dense_fisher():
    splits, task, state = trained_mlp()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state.params)
    split = data.random_forget(splits.train, 0.05, seed=0)
    # A retain set of 64 with num_grads=64: G holds every retain gradient (in some order).
    retain = split.retain.take(np.arange(64))
    result = unlearn(
        woodfisher(alpha=1.0, damping=0.5, num_grads=64),
        state.replace(params=params),
        task,
        split.forget,
        retain,
        key=jax.random.key(0),
    )
    assert int(result.metrics["woodfisher/num_grads"][0]) == 64
    # Rebuild G and v independently: per-example gradients by a loop of jax.grad.
    flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])
    one_grad = jax.jit(
        lambda p, x, y: jax.flatten_util.ravel_pytree(jax.grad(task.loss)(p, {"x": x, "y": y}))[0]
    )
    g = np.stack([np.asarray(one_grad(params, retain.x[i], retain.y[i])) for i in range(64)])
    mean_grad = jax.jit(jax.grad(lambda p, b: task.batch_loss(p, b)))
    mean = lambda ds: flat(mean_grad(params, {"x": jnp.asarray(ds.x), "y": jnp.asarray(ds.y)}))
    n_f, n = len(split.forget), len(split.forget) + 64
    v = (n_f / n) * (mean(split.forget) - mean(retain))
    np.testing.assert_allclose(result.metrics["woodfisher/v_norm"][0], np.linalg.norm(v), rtol=1e-8)
    # x = F^-1 v solves (0.5 I + G^T G / N) x = v, checked without forming the [P, P] matrix.
    x = flat(result.method_state.direction)
    residual = 0.5 * x + g.T @ (g @ x) / 64 - v
    assert np.linalg.norm(residual) <= 1e-9 * np.linalg.norm(v)
    # The pytree Woodbury with zero padding rows equals the dense solve on the real rows.
    padded = np.concatenate([g, np.zeros((16, g.shape[1]))])
    got = woodbury_inverse_vp(jnp.asarray(padded), jnp.asarray(v), 0.5, 64)
    np.testing.assert_allclose(got, x, rtol=1e-8, atol=1e-12)


def test_models_too_large_for_n_gradients_are_refused():
    splits, task, state = trained_mlp()
    split = data.random_forget(splits.train, 0.05, seed=0)
    with pytest.raises(ValueError, match=r"max_bytes"):
        unlearn(woodfisher(num_grads=1000, max_bytes=10_000), state, task, split.forget,
                split.retain, key=jax.random.key(0))  # fmt: skip


def test_unlearner_applies_alpha_times_direction():
    splits, task, state = trained_mlp()
    split = data.random_forget(splits.train, 0.05, seed=0)
    result = unlearn(
        woodfisher(alpha=0.2, num_grads=50),
        state,
        task,
        split.forget,
        split.retain,
        key=jax.random.key(1),
    )
    direction = result.method_state.direction
    jax.tree_util.tree_map(
        lambda new, old, d: np.testing.assert_allclose(new, old + 0.2 * d, rtol=1e-6, atol=1e-7),
        result.state.params,
        state.params,
        direction,
    )
    assert np.isfinite(result.metrics["loss"][0])
    with pytest.raises(ValueError, match="damping"):
        woodfisher(damping=0.0)
