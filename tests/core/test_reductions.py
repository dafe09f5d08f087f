"""Streaming reductions: equal to the all-at-once computation for uneven batches, masks respected,
one compilation per reduction and batch size, stacked models as one vmap."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._problems import loop_grads, mlp_problem
from unlearn_jax.core import reductions
from unlearn_jax.core.batch import pad_batch

RTOL = 1e-5  # the same float32 sums in another order


def _split(batch, sizes):
    starts = np.cumsum([0, *sizes])
    return [jax.tree_util.tree_map(lambda a, s=s, e=e: a[s:e], batch) for s, e in
            itertools.pairwise(starts)]  # fmt: skip


def _close(got, want):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7), got, want
    )


@pytest.fixture(scope="module")
def problem():
    params, batch, loss_fn, _logits_fn = mlp_problem(n=23)
    grads = jax.jit(lambda p: loop_grads(loss_fn, p, batch))(params)  # [23, ...] by a loop
    return params, batch, loss_fn, grads


def test_uneven_batches_equal_the_all_at_once_statistics(problem):
    params, batch, loss_fn, grads = problem
    uneven = _split(batch, [7, 13, 3])
    mean = lambda f: jax.tree_util.tree_map(lambda g: np.mean(f(np.asarray(g)), 0), grads)
    cases = {
        reductions.squared_gradient_mean(loss_fn, 4): mean(np.square),
        reductions.abs_gradient_mean(loss_fn): mean(np.abs),
        reductions.mean_gradient(loss_fn): mean(lambda g: g),
    }
    for reduction, want in cases.items():
        out = reductions.reduce(reduction, params, uneven)
        _close(out.value, want)
        assert float(out.count) == 23
    total = reductions.reduce(reductions.gradient_sum(loss_fn), params, uneven).value
    _close(total, jax.tree_util.tree_map(lambda g: np.sum(g, 0), grads))


def test_batch_mean_squares_each_batchs_mean_gradient(problem):
    params, batch, loss_fn, grads = problem
    sizes = [7, 13, 3]
    out = reductions.reduce(reductions.batch_mean_squared_gradient(loss_fn), params,
                            _split(batch, sizes))  # fmt: skip
    starts = np.cumsum([0, *sizes])
    want = jax.tree_util.tree_map(
        lambda g: np.mean([np.square(np.mean(np.asarray(g)[s:e], 0))
                           for s, e in itertools.pairwise(starts)], 0),
        grads,
    )  # fmt: skip
    _close(out.value, want)


def test_padding_rows_count_for_nothing(problem):
    params, batch, loss_fn, _grads = problem
    padded = pad_batch(dict(batch), 40)  # 17 zero rows, mask 0
    assert padded["mask"].sum() == 23 and padded["x"].shape[0] == 40
    for reduction in (reductions.squared_gradient_mean(loss_fn),
                      reductions.batch_mean_squared_gradient(loss_fn)):  # fmt: skip
        _close(reductions.reduce(reduction, params, [padded]).value,
               reductions.reduce(reduction, params, [batch]).value)  # fmt: skip


def test_one_compilation_per_reduction_and_batch_size(problem):
    params, batch, loss_fn, _ = problem
    reduction = reductions.squared_gradient_mean(loss_fn, 5)
    assert reductions.squared_gradient_mean(loss_fn, 5) is reduction  # cached factories
    traces = {"n": 0}
    counted = reduction._replace(
        accumulate=lambda *a: (traces.__setitem__("n", traces["n"] + 1), reduction.accumulate(*a))[
            1
        ]
    )
    for sizes in ([8, 8, 7], [8, 3], [5]):  # every batch padded to the first one's 8 rows
        reductions.reduce(counted, params, _split(batch, sizes), rows=8)
    assert traces["n"] == 1


def test_stacked_models_are_one_vmap(problem):
    params, batch, loss_fn, _ = problem
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), params)
    reduction = reductions.squared_gradient_mean(loss_fn)
    out = reductions.reduce(reduction, stacked, _split(batch, [10, 13]), stacked=True)
    for m in range(2):
        one = jax.tree_util.tree_map(lambda a, m=m: a[m], stacked)
        _close(jax.tree_util.tree_map(lambda a, m=m: a[m], out.value),
               reductions.reduce(reduction, one, [batch]).value)  # fmt: skip


def test_sampled_fisher_needs_a_key_and_is_deterministic(problem):
    params, batch, _, _ = problem
    _, _, _, logits_fn = mlp_problem(n=23)
    reduction = reductions.sampled_fisher(logits_fn, 2)
    with pytest.raises(ValueError, match="samples"):
        reductions.reduce(reduction, params, [batch])
    a = reductions.reduce(reduction, params, [batch], key=jax.random.key(1)).value
    b = reductions.reduce(reduction, params, [batch], key=jax.random.key(1)).value
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_bad_input_is_named(problem):
    params, batch, loss_fn, _ = problem
    reduction = reductions.mean_gradient(loss_fn)
    with pytest.raises(TypeError, match="ITERABLE"):
        reductions.reduce(reduction, params, batch)
    with pytest.raises(ValueError, match="no batches"):
        reductions.reduce(reduction, params, [])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        reductions.reduce(reduction, params, [{"x": batch["x"], "y": batch["y"][:3]}])
