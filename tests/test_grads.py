import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._problems import logistic_problem, loop_grads, mlp_problem
from unlearn_jax import grads

RTOL_F32 = 1e-5  # vmap and the loop run the same float32 ops; differences are summation order
ATOL_F32 = 1e-6

PROBLEMS = {"logistic": logistic_problem, "mlp": mlp_problem}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_per_example_grads_match_python_loop(problem, chunk_size):
    params, batch, loss_fn, _ = PROBLEMS[problem]()
    got = grads.per_example_grads(loss_fn, params, batch, chunk_size=chunk_size)
    want = loop_grads(loss_fn, params, batch)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL_F32, atol=ATOL_F32), got, want
    )


@pytest.mark.parametrize("chunk_size", [None, 3, 5])
def test_per_example_grad_norms_match_loop(chunk_size):
    params, batch, loss_fn, _ = mlp_problem()
    want = loop_grads(loss_fn, params, batch)
    want_norms = np.sqrt(
        sum(
            np.sum(np.asarray(g).reshape(g.shape[0], -1) ** 2, axis=1)
            for g in jax.tree_util.tree_leaves(want)
        )
    )
    got = grads.per_example_grad_norms(loss_fn, params, batch, chunk_size=chunk_size)
    assert got.shape == (batch["x"].shape[0],)
    np.testing.assert_allclose(got, want_norms, rtol=RTOL_F32, atol=ATOL_F32)


def test_chunked_equals_unchunked_under_jit():
    params, batch, loss_fn, _ = mlp_problem(n=23)
    f = jax.jit(lambda p, b: grads.per_example_grads(loss_fn, p, b, chunk_size=4))
    g = jax.jit(lambda p, b: grads.per_example_grads(loss_fn, p, b))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL_F32, atol=ATOL_F32),
        f(params, batch),
        g(params, batch),
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 6, 50])
def test_chunked_sum_counts_every_example_once(chunk_size):
    batch = {"v": jnp.arange(23.0)}
    total = grads.chunked_sum(lambda ex: {"s": ex["v"], "n": jnp.ones(())}, batch, chunk_size)
    assert float(total["s"]) == pytest.approx(sum(range(23)))
    assert float(total["n"]) == 23


def test_mean_grad_is_mean_of_per_example_grads():
    params, batch, loss_fn, _ = logistic_problem()
    per_ex = loop_grads(loss_fn, params, batch)
    got = grads.mean_grad(loss_fn, params, batch)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, np.mean(w, axis=0), rtol=1e-5, atol=1e-6),
        got,
        per_ex,
    )


def test_empty_batch_is_rejected():
    params, batch, loss_fn, _ = logistic_problem()
    empty = jax.tree_util.tree_map(lambda a: a[:0], batch)
    with pytest.raises(ValueError, match="empty"):
        grads.per_example_grads(loss_fn, params, empty)


def test_disagreeing_batch_sizes_are_rejected():
    params, batch, loss_fn, _ = logistic_problem()
    bad = {"x": batch["x"], "y": batch["y"][:-1]}
    with pytest.raises(ValueError, match="disagree on the batch size"):
        grads.per_example_grads(loss_fn, params, bad)


def test_non_scalar_loss_is_rejected():
    params, batch, _, logits_fn = logistic_problem()
    with pytest.raises(TypeError, match="must return a scalar"):
        grads.per_example_grads(logits_fn, params, batch)


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5])
def test_bad_chunk_size_is_rejected(chunk_size):
    params, batch, loss_fn, _ = logistic_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        grads.per_example_grads(loss_fn, params, batch, chunk_size=chunk_size)
