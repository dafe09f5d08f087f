"""SSD: the dampening formula against NumPy, its edge cases, importance caching, digits class forgetting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.methods._digits import trained_mlp
from unlearn_jax import data
from unlearn_jax.methods.base import unlearn
from unlearn_jax.methods.ssd import (
    Importances,
    check_importances,
    dampen,
    full_data_importances,
    importances,
    lfssd,
    load_importances,
    save_importances,
    ssd,
)
from unlearn_jax.training import evaluate_accuracy

RTOL_F32 = 1e-6
# Hyper-parameters for digits class forgetting with the per-example Fisher (see test below).
DIGITS_ALPHA, DIGITS_LAM = 5.0, 0.1


def numpy_ssd(theta, i_f, i_d, alpha, lam):
    """SSD written directly from the paper's formula, elementwise, in float64 NumPy."""
    theta, i_f, i_d = (np.asarray(a, np.float64) for a in (theta, i_f, i_d))
    out = theta.copy()
    for j in np.ndindex(theta.shape):
        if i_f[j] > alpha * i_d[j]:
            out[j] = theta[j] * min(lam * i_d[j] / i_f[j], 1.0)
    return out


def random_tree(rng, zeros_frac=0.0):
    shapes = {"a": {"kernel": (7, 5), "bias": (5,)}, "b": (11,)}

    def make(shape):
        x = rng.exponential(size=shape)
        x[rng.random(shape) < zeros_frac] = 0.0
        return x.astype(np.float32)

    return jax.tree_util.tree_map(make, shapes, is_leaf=lambda s: isinstance(s, tuple))


@pytest.mark.parametrize(("alpha", "lam"), [(10.0, 1.0), (1.0, 1.0), (0.5, 3.0), (2.0, 0.1)])
def test_dampening_matches_numpy_formula(alpha, lam):
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda x: (x - 1.0).astype(np.float32), random_tree(rng)
    )  # signed values
    i_f = random_tree(rng, zeros_frac=0.2)
    i_d = random_tree(rng, zeros_frac=0.2)
    # Some exact ties at the threshold (not selected: the inequality is strict) and some forget
    # importances far above it (beta well below 1), plus some I_D = 0 < I_f (beta = 0).
    i_d["b"][:3] = [0.5, 0.25, 1.0]  # exactly representable ties in float32 and float64
    i_f["b"][:3] = alpha * i_d["b"][:3]
    i_f["a"]["bias"][:2] = 100 * alpha * i_d["a"]["bias"][:2] + 1.0
    i_d["a"]["kernel"][0, :] = 0.0
    new, stats = dampen(params, i_f, i_d, alpha=alpha, lam=lam)
    expected = jax.tree_util.tree_map(
        lambda p, f, d: numpy_ssd(p, f, d, alpha, lam), params, i_f, i_d
    )
    jax.tree_util.tree_map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=0),
        new,
        expected,
    )
    selected = sum(
        int(np.sum(f > alpha * d))
        for f, d in zip(jax.tree_util.tree_leaves(i_f), jax.tree_util.tree_leaves(i_d), strict=True)
    )
    assert int(stats["ssd/num_selected"]) == selected > 0
    np.testing.assert_array_equal(new["b"][:3], params["b"][:3])  # ties: unchanged


def test_zero_forget_importance_never_changes_a_parameter():
    rng = np.random.default_rng(1)
    params = random_tree(rng)
    i_f = random_tree(rng, zeros_frac=0.5)
    # I_D zero too on some of them: 0 > alpha * 0 is False, so still untouched (and no 0/0).
    i_d = jax.tree_util.tree_map(
        lambda d, f: np.where(rng.random(d.shape) < 0.5, 0.0, d), random_tree(rng), i_f
    )
    i_d = jax.tree_util.tree_map(lambda d: d.astype(np.float32), i_d)
    for alpha, lam in [(1e-6, 1.0), (0.5, 0.0 + 1e-3), (10.0, 100.0)]:
        new, _ = dampen(params, i_f, i_d, alpha=alpha, lam=lam)
        for p, n, f in zip(
            jax.tree_util.tree_leaves(params),
            jax.tree_util.tree_leaves(new),
            jax.tree_util.tree_leaves(i_f),
            strict=True,
        ):
            assert np.all(np.isfinite(n))
            np.testing.assert_array_equal(np.asarray(n)[f == 0], p[f == 0])
    # All-zero importances: the model is returned unchanged, bit for bit.
    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    new, stats = dampen(params, zeros, zeros, alpha=10.0, lam=1.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, params)
    assert int(stats["ssd/num_selected"]) == 0
    assert float(stats["ssd/mean_beta_selected"]) == 1.0


def test_non_finite_or_negative_importances_raise():
    rng = np.random.default_rng(2)
    good = random_tree(rng)
    bad = jax.tree_util.tree_map(np.copy, good)
    bad["a"]["kernel"][1, 2] = np.nan
    with pytest.raises(ValueError, match=r"\['a'\]\['kernel'\] holds 1 NaN or infinite"):
        check_importances(bad, "full_importances")
    imp = Importances(bad, "fisher", False, 64, 10)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ssd(full_importances=imp)
    neg = jax.tree_util.tree_map(np.copy, good)
    neg["b"][0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        ssd(full_importances=Importances(neg, "fisher", False, 64, 10))
    inf = jax.tree_util.tree_map(np.copy, good)
    inf["b"][0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        check_importances(inf, "I_f")


def test_argument_checks():
    with pytest.raises(ValueError, match="alpha"):
        ssd(alpha=0.0)
    with pytest.raises(ValueError, match="importance estimator"):
        ssd(importance="sampled")
    imp = Importances({"w": np.ones(3, np.float32)}, "batch_mean", False, 64, 3)
    with pytest.raises(ValueError, match="estimator='batch_mean'"):
        ssd(full_importances=imp)  # default estimator is fisher


# ---- on a trained model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_setup():
    splits, task, state = trained_mlp()
    split = data.class_forget(splits.train, 3)
    return splits, split, task, state


def test_importance_estimators_match_direct_computation(digits_setup):
    _, split, task, state = digits_setup
    forget = split.forget
    batch = forget.as_batch()
    n = len(forget)
    grads = jax.jit(jax.vmap(jax.grad(task.loss), in_axes=(None, 0)))(state.params, batch)
    fisher = importances(task, state.params, forget, estimator="fisher", batch_size=50)
    jax.tree_util.tree_map(
        lambda got, g: np.testing.assert_allclose(
            got, np.mean(np.square(g), 0), rtol=1e-4, atol=1e-10
        ),
        fisher.values,
        grads,
    )
    assert fisher.num_examples == n
    # batch_mean with the reference forget batch size 128: batches [0, 128) and [128, n).
    bm = importances(task, state.params, forget, estimator="batch_mean", batch_size=128)
    means = [
        jax.tree_util.tree_map(lambda g, s=s: np.mean(g[s : s + 128], 0), grads) for s in (0, 128)
    ]
    want = jax.tree_util.tree_map(lambda a, b: (np.square(a) + np.square(b)) / 2, *means)
    jax.tree_util.tree_map(
        lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-10), bm.values, want
    )
    assert bm.metadata() == {
        "estimator": "batch_mean",
        "label_free": False,
        "batch_size": 128,
        "num_examples": n,
    }
    # Label-free: mean |grad ||f(x)||^2|, and labels are never read.
    sq_norm = lambda p, ex: jnp.sum(jnp.square(task.outputs(p, ex)))
    lf_grads = jax.jit(jax.vmap(jax.grad(sq_norm), in_axes=(None, 0)))(state.params, batch)
    lf = importances(task, state.params, forget, label_free=True)
    jax.tree_util.tree_map(
        lambda got, g: np.testing.assert_allclose(
            got, np.mean(np.abs(g), 0), rtol=1e-4, atol=1e-10
        ),
        lf.values,
        lf_grads,
    )
    relabelled = dataclasses.replace(forget, y=(forget.y + 1) % 10)
    lf2 = importances(task, state.params, relabelled, label_free=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, lf.values, lf2.values)


def test_class_forgetting_on_digits(digits_setup):
    """SSD forgets a digits class (forget acc < 10%) and keeps retain accuracy within 5 points.

    With the per-example Fisher, I_D = (n_r I_r + n_f I_f)/n >= (n_f/n) I_f, so a parameter can be
    selected only if alpha < n/n_f (= 10 for one class of ten): the paper's alpha = 10 selects
    nothing here. alpha = 5, lambda = 0.1 (the paper's lambda for PinsFace) forget class 3.
    """
    _, split, task, state = digits_setup
    acc = lambda params, ds: evaluate_accuracy(task, params, ds)
    retain_before = acc(state.params, split.retain)
    assert acc(state.params, split.forget) > 0.9
    result = unlearn(
        ssd(DIGITS_ALPHA, DIGITS_LAM),
        state,
        task,
        split.forget,
        split.retain,
        key=jax.random.key(0),
    )
    forget_after, retain_after = (
        acc(result.state.params, split.forget),
        acc(result.state.params, split.retain),
    )
    assert forget_after < 0.10, forget_after
    assert retain_after > retain_before - 0.05, (retain_before, retain_after)
    assert 0 < result.metrics["ssd/selected_fraction"][0] < 0.1
    # The paper's alpha = 10 cannot select anything with the per-example Fisher (see docstring).
    state_imp = result.method_state
    _, stats = dampen(
        state.params, state_imp.forget.values, state_imp.full.values, alpha=10.0, lam=1.0
    )
    assert int(stats["ssd/num_selected"]) == 0
    with pytest.warns(UserWarning, match=r"alpha=10.0 >= n / n_f = 1437 / 146"):
        ssd(10.0, 1.0, full_importances=state_imp.full).init(state, task, split.forget, None, None)


def test_cached_full_importances_give_the_same_result_faster(digits_setup, tmp_path):
    splits, split, task, state = digits_setup
    full = full_data_importances(task, state.params, splits.train)
    assert full.num_examples == len(splits.train)
    path = tmp_path / "importances.npz"
    save_importances(path, full)
    loaded = load_importances(path, state.params)
    assert loaded.metadata() == full.metadata()
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.values, full.values)
    nested = load_importances(path)  # without params_like: nested dicts from the names
    jax.tree_util.tree_map(np.testing.assert_array_equal, nested.values, full.values)

    method = ssd(DIGITS_ALPHA, DIGITS_LAM)
    uncached = unlearn(method, state, task, split.forget, split.retain, key=jax.random.key(0))
    cached = unlearn(
        ssd(DIGITS_ALPHA, DIGITS_LAM, full_importances=loaded),
        state,
        task,
        split.forget,
        key=jax.random.key(0),
    )
    # I_D by one pass over train vs (n_r I_r + n_f I_f)/n: equal up to summation order.
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12),
        uncached.method_state.full.values,
        cached.method_state.full.values,
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        uncached.state.params,
        cached.state.params,
    )
    assert uncached.metrics["ssd/num_selected"][0] == cached.metrics["ssd/num_selected"][0]
    # The cached path makes no pass over the retain set.
    assert cached.wall_time < uncached.wall_time, (cached.wall_time, uncached.wall_time)
    assert (
        cached.hparams["cached_full_importances"] and not method.hparams["cached_full_importances"]
    )


def test_lfssd_and_batch_mean_run_end_to_end(digits_setup):
    _, split, task, state = digits_setup
    for method in (lfssd(DIGITS_ALPHA, DIGITS_LAM), ssd(importance="batch_mean")):
        result = unlearn(method, state, task, split.forget, split.retain, key=jax.random.key(0))
        assert np.isfinite(result.metrics["loss"][0])
        assert result.method_state.full.num_examples == len(split.forget) + len(split.retain)
        assert (
            result.hparams["forget_batch_size"] == 128 and result.hparams["full_batch_size"] == 64
        )
    # Without retain data and without cached importances there is no I_D.
    with pytest.raises(ValueError, match="retain"):
        ssd().init(state, task, split.forget, None, jax.random.key(0))
