"""ACU: the analytic head equals ridge regression refitted from scratch after any learn/unlearn order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from tests.methods._digits import trained_mlp
from unlearn_jax.methods.analytic import (
    AnalyticHead,
    NotLearnedError,
    acu,
    fit_analytic_head,
    model_features_fn,
    with_head,
)
from unlearn_jax.methods.driver import unlearn

# float64 end to end: the requirement is 1e-5 relative error; we see ~1e-12.
RTOL_F64 = 1e-5
GAMMA = 0.1


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def ridge_reference(features, labels, num_classes, gamma=GAMMA):
    """Ridge on [features, 1] with one-hot targets by numpy.linalg.solve (bias regularised too)."""
    x = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1).astype(np.float64)
    y = np.eye(num_classes)[labels]
    return np.linalg.solve(x.T @ x + gamma * np.eye(x.shape[1]), x.T @ y)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    n, d, k = 240, 12, 4
    labels = rng.integers(0, k, size=n)
    centers = rng.normal(size=(k, d))
    features = centers[labels] + 0.7 * rng.normal(size=(n, d))
    return features, labels, k


def test_learn_unlearn_sequence_matches_ridge_from_scratch(toy):
    features, labels, k = toy
    n = features.shape[0]
    rng = np.random.default_rng(1)
    head = AnalyticHead.create(features.shape[1], k, gamma=GAMMA)
    assert head.dtype == jnp.float64
    learned = set()

    def learn(ids):
        nonlocal head
        ids = np.asarray(sorted(ids))
        head = head.learn(features[ids], labels[ids], ids)
        learned.update(ids.tolist())

    def forget(ids):
        nonlocal head
        ids = np.asarray(sorted(ids))
        head = head.unlearn(features[ids], labels[ids], ids)
        learned.difference_update(ids.tolist())

    def check():
        ids = np.asarray(sorted(learned))
        assert head.num_learned == len(ids)
        np.testing.assert_array_equal(head.learned_ids, ids)
        ref = ridge_reference(features[ids], labels[ids], k)
        assert rel_err(head.weights, ref) < RTOL_F64

    learn(range(0, 100))  # 1: learn
    check()
    forget(rng.choice(100, size=17, replace=False))  # 2: unlearn a random subset
    check()
    learn(range(100, 180))  # 3: learn more
    check()
    forget(rng.choice(sorted(learned), size=40, replace=False))  # 4: unlearn old and new
    check()
    learn(set(range(n)) - learned - set(range(200, 240)))  # 5: re-learn what was removed
    check()
    forget([i for i in sorted(learned) if labels[i] == 2])  # 6: a whole class
    check()
    assert not np.any(head.contains(np.flatnonzero(labels == 2)))
    learn(range(200, 240))  # 7
    check()
    for _ in range(5):  # 8-12: single-example removals
        forget([int(rng.choice(sorted(learned)))])
    check()
    # The removed class's output column is exactly what ridge without that class gives.
    ids = np.asarray(sorted(learned))
    ref = ridge_reference(features[ids], labels[ids], k)
    assert rel_err(head.predict(features[:20]), np.c_[features[:20], np.ones(20)] @ ref) < RTOL_F64


def test_matches_sklearn_ridge_and_is_order_free(toy):
    features, labels, k = toy
    ids = np.arange(features.shape[0])
    at_once = AnalyticHead.create(features.shape[1], k, gamma=GAMMA).learn(features, labels, ids)
    piecewise = AnalyticHead.create(features.shape[1], k, gamma=GAMMA)
    for chunk in np.array_split(np.random.default_rng(2).permutation(ids), 7):
        piecewise = piecewise.learn(features[chunk], labels[chunk], chunk)
    x = np.c_[features, np.ones(len(ids))]
    sk = Ridge(alpha=GAMMA, fit_intercept=False, solver="cholesky").fit(x, np.eye(k)[labels])
    assert rel_err(at_once.weights, sk.coef_.T) < RTOL_F64
    assert rel_err(piecewise.weights, sk.coef_.T) < RTOL_F64
    # Symmetric R after updates, exactly (it is re-symmetrised).
    np.testing.assert_array_equal(np.asarray(piecewise.r), np.asarray(piecewise.r).T)


def test_regression_targets_and_no_bias(toy):
    features, _, _ = toy
    rng = np.random.default_rng(3)
    y = rng.normal(size=(features.shape[0], 2))
    ids = np.arange(features.shape[0])
    head = AnalyticHead.create(features.shape[1], 2, gamma=0.5, fit_bias=False)
    head = head.learn(features, y, ids).unlearn(features[:50], y[:50], ids[:50])
    ref = np.linalg.solve(
        features[50:].T @ features[50:] + 0.5 * np.eye(features.shape[1]), features[50:].T @ y[50:]
    )
    assert rel_err(head.weights, ref) < RTOL_F64
    np.testing.assert_array_equal(np.asarray(head.bias), 0.0)


def test_removing_what_was_never_learned_raises_and_changes_nothing(toy):
    features, labels, k = toy
    ids = np.arange(100)
    head = AnalyticHead.create(features.shape[1], k).learn(features[:100], labels[:100], ids)
    r_before = np.asarray(head.r).copy()
    with pytest.raises(NotLearnedError, match="never learned"):
        head.unlearn(features[100:103], labels[100:103], [100, 101, 102])
    with pytest.raises(NotLearnedError, match="never learned"):
        head.unlearn(features[[5, 150]], labels[[5, 150]], [5, 150])  # one known, one not
    once = head.unlearn(features[:3], labels[:3], [0, 1, 2])
    with pytest.raises(NotLearnedError, match="never learned"):  # removing twice
        once.unlearn(features[:1], labels[:1], [0])
    with pytest.raises(NotLearnedError, match="fingerprint"):  # same id, other features
        head.unlearn(features[7:8] + 1.0, labels[7:8], [7])
    with pytest.raises(NotLearnedError, match="fingerprint"):  # same id, other label
        head.unlearn(features[7:8], (labels[7:8] + 1) % k, [7])
    with pytest.raises(ValueError, match="already learned"):
        head.learn(features[:2], labels[:2], [0, 1])
    with pytest.raises(ValueError, match="repeat"):
        head.unlearn(features[[4, 4]], labels[[4, 4]], [4, 4])
    np.testing.assert_array_equal(np.asarray(head.r), r_before)
    ref = ridge_reference(features[:100], labels[:100], k)
    assert rel_err(head.weights, ref) < RTOL_F64


def test_bad_shapes_and_dtypes(toy):
    features, labels, k = toy
    head = AnalyticHead.create(features.shape[1], k)
    with pytest.raises(ValueError, match=r"shape \[B, 12\]"):
        head.learn(features[:, :5], labels, np.arange(len(labels)))
    with pytest.raises(ValueError, match="labels must lie"):
        head.learn(features[:3], np.array([0, 1, 9]), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        head.learn(np.full((1, 12), np.nan), [0], [0])
    with pytest.raises(ValueError, match="gamma"):
        AnalyticHead.create(3, 2, gamma=0.0)
    with jax.enable_x64(False), pytest.raises(ValueError, match="64-bit"):
        AnalyticHead.create(3, 2, dtype=jnp.float64)


# ---- the Unlearner on a trained MLP ------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_mlp():
    from unlearn_jax import data

    splits, task, state = trained_mlp()
    return splits, data.class_forget(splits.train, 3), task, state


def test_acu_unlearner_equals_head_refitted_on_retain(digits_mlp):
    splits, split, task, state = digits_mlp
    features_fn = model_features_fn(state)
    with jax.enable_x64(True):
        head = fit_analytic_head(features_fn, state.params, splits.train, num_outputs=10)
        result = unlearn(acu(head), state, task, split.forget, key=jax.random.key(2))
        ledger = head.after(result.method_state, split.forget.ids)
    assert ledger.num_learned == len(split.retain) and result.guarantee == "exact"
    # One pass over the forget set, one padded batch of at most 64 at a time (sequential downdates).
    assert result.steps == -(-len(split.forget) // 64)
    assert float(result.metrics["acu/num_removed"].sum()) == len(split.forget)

    feats = np.asarray(features_fn(state.params, split.retain.x), np.float64)
    ref = ridge_reference(feats, split.retain.y, 10)
    got = np.concatenate(
        [result.state.params["head"]["kernel"], result.state.params["head"]["bias"][None]]
    )
    # The params hold the head in float32; the head itself is float64.
    assert rel_err(ledger.weights, ref) < RTOL_F64
    assert rel_err(got, ref) < 1e-6
    # The backbone is untouched.
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, state.params["hidden_0"], result.state.params["hidden_0"]
    )
    # The head's statistics streamed from retain + forget (head=None) give the same result.
    with jax.enable_x64(True):
        again = unlearn(acu(), state, task, split.forget, split.retain, key=jax.random.key(2))
        weights = np.asarray(again.method_state.r) @ np.asarray(again.method_state.q)
    assert rel_err(weights, ref) < RTOL_F64
    # A second request on the updated ledger works on top of the first.
    more = split.retain.take(np.arange(10))
    with jax.enable_x64(True):
        second = unlearn(acu(ledger), result.state, task, more, key=jax.random.key(3))
        assert ledger.after(second.method_state, more.ids).num_learned == len(split.retain) - 10
        # Removing the forget set a second time is refused by the ledger, before any step.
        with pytest.raises(NotLearnedError):
            unlearn(acu(ledger), result.state, task, split.forget, key=jax.random.key(4))


def test_with_head_checks_shapes(digits_mlp):
    _, _, _, state = digits_mlp
    small = AnalyticHead.create(5, 10)
    with pytest.raises(ValueError, match="kernel shape"):
        with_head(state.params, small)
    with pytest.raises(ValueError, match="no layer"):
        with_head(state.params, small, path=("nope",))
