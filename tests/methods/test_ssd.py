"""SSD: the dampening formula against NumPy, its edge cases, importance caching, digits class forgetting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.methods._digits import trained_mlp
from unlearn_jax import data
from unlearn_jax.methods.driver import unlearn
from unlearn_jax.methods.ssd import (
    PROTOCOLS,
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
        "protocol": None,
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
    _, stats = dampen(state.params, state_imp.forget, state_imp.full, alpha=10.0, lam=1.0)
    assert int(stats["ssd/num_selected"]) == 0
    full = Importances(state_imp.full, "fisher", False, 128, len(split.forget) + len(split.retain))
    with pytest.warns(UserWarning, match=r"alpha=10.0 >= n / n_f = 1437 / 146"):
        unlearn(ssd(10.0, 1.0, full_importances=full), state, task, split.forget,
                key=jax.random.key(0))  # fmt: skip


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
        uncached.method_state.full,
        cached.method_state.full,
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        uncached.state.params,
        cached.state.params,
    )
    assert uncached.metrics["ssd/num_selected"][0] == cached.metrics["ssd/num_selected"][0]
    # The cached path needs no retain set at all (it was not given one above).
    assert (
        cached.hparams["cached_full_importances"] and not method.hparams["cached_full_importances"]
    )


def test_lfssd_and_batch_mean_run_end_to_end(digits_setup):
    _, split, task, state = digits_setup
    sizes = {"lfssd": (128, 128), "ssd": (64, 64)}  # batch_mean defaults to the full_class protocol
    for method in (lfssd(DIGITS_ALPHA, DIGITS_LAM), ssd(importance="batch_mean")):
        result = unlearn(method, state, task, split.forget, split.retain, key=jax.random.key(0))
        assert np.isfinite(evaluate_accuracy(task, result.state.params, split.retain))
        hp = result.hparams
        assert (hp["forget_batch_size"], hp["full_batch_size"]) == sizes[method.name]
    # Without retain data and without cached importances there is no I_D.
    with pytest.raises(ValueError, match="needs retain data"):
        unlearn(ssd(), state, task, split.forget, None, key=jax.random.key(0))


# ---- the reference scripts' loaders (importance="batch_mean") ------------------------------------
def reference_batches(train_y, forget_idx, retain_idx, protocol):
    """A transcription of the loaders of SSD's scripts (if-loops/selective-synaptic-dampening at
    cdfdc0e): full-class and sub-class build the retain and forget sets class by class in data order
    (get_classwise_ds, build_retain_forget_sets), batch 64 (-b default); random forgetting keeps
    random_split's order, batch 128; the full-data loader is ConcatDataset((retain, forget)),
    unshuffled. Returns (forget batches, full batches) as lists of row positions."""
    if protocol == "random":
        batch, forget, retain = 128, list(forget_idx), list(retain_idx)
    else:
        batch = 64
        by_class = lambda idx: [i for c in range(10) for i in idx if train_y[i] == c]
        forget, retain = by_class(forget_idx), by_class(retain_idx)
    full = retain + forget
    cut = lambda idx: [idx[s : s + batch] for s in range(0, len(idx), batch)]
    return cut(forget), cut(full)


def reference_importance(task, params, x, y, batches):
    """(1/M) sum_m (grad of the mean CE over batch m)^2, one jax.grad per batch (as the scripts)."""
    grad = jax.jit(lambda p, xb, yb: jax.grad(lambda q: task.batch_loss(q, {"x": xb, "y": yb}))(p))
    total = None
    for rows in batches:
        g = jax.tree_util.tree_map(np.square, grad(params, x[rows], y[rows]))
        total = g if total is None else jax.tree_util.tree_map(np.add, total, g)
    return jax.tree_util.tree_map(lambda t: t / len(batches), total)


@pytest.mark.parametrize("protocol", ["full_class", "random"])
def test_batch_mean_reproduces_the_reference_loaders(digits_setup, protocol):
    splits, class_split, task, state = digits_setup
    split = (
        class_split if protocol == "full_class" else data.random_forget(splits.train, 0.1, seed=1)
    )
    train = splits.train
    forget_idx, retain_idx = train.positions(split.forget.ids), train.positions(split.retain.ids)
    batch = 64 if protocol == "full_class" else 128
    assert len(split.retain) % batch != 0  # the last retain batch straddles into the forget set
    forget_batches, full_batches = reference_batches(train.y, forget_idx, retain_idx, protocol)
    want_f = reference_importance(task, state.params, train.x, train.y, forget_batches)
    want_d = reference_importance(task, state.params, train.x, train.y, full_batches)
    close = lambda got, want: jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-12), got, want
    )
    # One call: both passes inside unlearn().
    method = ssd(alpha=10.0, lam=1.0, importance="batch_mean", protocol=protocol)
    result = unlearn(method, state, task, split.forget, split.retain, key=jax.random.key(0))
    close(result.method_state.forget, want_f)
    close(result.method_state.full, want_d)
    assert result.hparams["protocol"] == protocol and result.hparams["full_batch_size"] == batch
    # Cached: the full-data importances computed once, passed back.
    cached = full_data_importances(task, state.params, retain=split.retain, forget=split.forget,
                                   estimator="batch_mean", protocol=protocol)  # fmt: skip
    close(cached.values, want_d)
    assert cached.protocol == protocol and cached.batch_size == batch
    again = unlearn(ssd(alpha=10.0, lam=1.0, importance="batch_mean", protocol=protocol,
                        full_importances=cached), state, task, split.forget, key=jax.random.key(0))  # fmt: skip
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.state.params, result.state.params)
    # A cached value of another protocol is refused.
    other = "random" if protocol == "full_class" else "full_class"
    with pytest.raises(ValueError, match="protocol"):
        ssd(importance="batch_mean", protocol=other, full_importances=cached)


def test_protocols_fix_the_batch_sizes_and_order():
    assert PROTOCOLS["full_class"] == (64, 64, "by_class")
    assert PROTOCOLS["sub_class"] == (64, 64, "by_class")
    assert PROTOCOLS["random"] == (128, 128, "data")
    with pytest.raises(ValueError, match="protocol"):
        ssd(importance="fisher", protocol="random")
    with pytest.raises(ValueError, match="SSD protocol"):
        ssd(importance="batch_mean", protocol="cifar")
