"""Training: the fit recipe against numpy references, compile counts, masks, retrain, fit_many."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests._training_setup import ADAM, BATCH, SGD, classification, mlp, regression
from unlearn_jax import training
from unlearn_jax.data import Dataset, padded_batches
from unlearn_jax.models import Linear, get_model, model_task
from unlearn_jax.training import (
    create_train_state,
    evaluate_accuracy,
    fit,
    fit_many,
    retrain,
    train_original,
)

# float32 training compared with float64 numpy references of the same updates.
RTOL_F32 = 1e-5
ATOL_F32 = 1e-6
# vmapped vs looped training: batched kernels may reassociate sums; a few epochs of Adam amplify the
# last-bit differences a little (observed < 1e-6; 1e-5 leaves room across XLA versions).
ATOL_VMAP = 1e-5


def _leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _linear_params(state):
    """Linear regression parameters as one float64 vector ``[w; b]``."""
    head = state.params["head"]
    return np.concatenate([np.asarray(head["kernel"], np.float64)[:, 0], np.asarray(head["bias"])])


def _perm(key, epoch, n):
    """The documented batch order: a permutation drawn from ``fold_in(key, epoch)``."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))


# ---- create_train_state ---------------------------------------------------------------------------
def test_create_train_state_initialises_params_and_optimizer():
    model = mlp()
    x = np.zeros((1, 5), np.float32)
    opt = ADAM
    state = create_train_state(model, x, opt, jax.random.key(3))
    want = model.init(jax.random.key(3), x)["params"]
    for got, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert _leaves_equal(state.opt_state, opt.init(state.params))
    assert state.tx is opt


def test_create_train_state_rejects_batch_norm_and_bad_arguments():
    class WithBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(nn.Dense(2)(x))

    with pytest.raises(ValueError, match=r"\['batch_stats'\].*GroupNorm"):
        create_train_state(WithBatchNorm(), np.zeros((2, 3)), SGD, jax.random.key(0))
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        create_train_state(Linear(2), np.zeros((1, 3)), "adam", jax.random.key(0))
    with pytest.raises(ValueError, match=r"non-empty batch.*shape \(0, 3\)"):
        create_train_state(Linear(2), np.zeros((0, 3)), SGD, jax.random.key(0))


# ---- the recipe, against numpy --------------------------------------------------------------------
def _numpy_sgd_linear_regression(ds, theta, *, lr, epochs, batch_size, key):
    """Mini-batch SGD on 0.5 * (w.x + b - y)^2 in float64, in fit's batch order."""
    x = np.concatenate([ds.x.astype(np.float64), np.ones((len(ds), 1))], axis=1)
    y = ds.y.astype(np.float64)
    losses = []
    for e in range(epochs):
        perm = _perm(key, e, len(ds))
        total = 0.0
        for start in range(0, len(ds), batch_size):
            rows = perm[start : start + batch_size]
            r = x[rows] @ theta - y[rows]
            total += np.sum(0.5 * r**2)
            theta = theta - lr * x[rows].T @ r / len(rows)
        losses.append(total / len(ds))
    return theta, losses


def test_fit_matches_numpy_sgd_including_the_partial_last_batch():
    ds = regression(n=10)
    task = model_task(Linear(1), kind="regression")
    state = create_train_state(Linear(1), ds.x[:1], SGD, jax.random.key(0))
    key = jax.random.key(5)
    want, want_losses = _numpy_sgd_linear_regression(
        ds, _linear_params(state), lr=0.1, epochs=3, batch_size=BATCH, key=key
    )
    state, history = fit(state, task, ds, epochs=3, batch_size=BATCH, key=key, progress=False)
    # Batches of 8 and 2: the last is padded to 8 rows but averaged over its 2 real ones.
    np.testing.assert_allclose(_linear_params(state), want, rtol=RTOL_F32, atol=ATOL_F32)
    np.testing.assert_allclose(history["loss"], want_losses, rtol=RTOL_F32)
    assert int(state.step) == 6


def test_fit_is_deterministic_given_the_key():
    ds = classification()
    model = mlp()
    task = model_task(model)
    init = create_train_state(model, ds.x[:1], ADAM, jax.random.key(0))
    kw = dict(epochs=2, batch_size=BATCH, progress=False)
    a, ha = fit(init, task, ds, key=jax.random.key(1), **kw)
    b, hb = fit(init, task, ds, key=jax.random.key(1), **kw)
    c, _ = fit(init, task, ds, key=jax.random.key(2), **kw)
    assert _leaves_equal(a.params, b.params) and _leaves_equal(a.opt_state, b.opt_state)
    assert ha == hb
    assert not _leaves_equal(a.params, c.params)


def test_one_compiled_step_serves_every_batch_and_every_call():
    """50 rows in batches of 8: six full batches and a partial one, one trace of the step."""
    ds = classification(n=50)
    model = mlp()
    task = model_task(model)
    traces = []

    def counting_regularizer(params, batch, mask):
        traces.append(batch["x"].shape)  # runs only while the step is being traced
        return 0.0 * jnp.sum(params["head"]["bias"])

    state = create_train_state(model, ds.x[:1], ADAM, jax.random.key(0))
    kw = dict(epochs=3, batch_size=BATCH, regularizer=counting_regularizer, progress=False)
    trained, _ = fit(state, task, ds, key=jax.random.key(1), **kw)
    assert int(trained.step) == 3 * 7
    assert traces == [(BATCH, 5)]
    # Another key, and a retain set of 47 rows: the compiled step is reused.
    fit(state, task, ds, key=jax.random.key(2), **kw)
    fit(state, task, ds.without_ids(ds.ids[:3]), key=jax.random.key(2), **kw)
    assert traces == [(BATCH, 5)]


def test_a_regularizer_that_calls_jax_grad_is_differentiated_twice():
    r"""Gradient penalty R = lam * ||grad L||^2 on linear least squares, one full-batch SGD step.

    With Z = [X, 1], L = ||Z theta - y||^2 / (2N), g = Z^T (Z theta - y) / N and H = Z^T Z / N, the
    step is theta - lr * (g + 2 lam H g): the H g term exists only through double backprop.
    """
    ds = regression(n=BATCH)
    model = Linear(1)
    task = model_task(model, kind="regression")
    lam, lr = 0.3, 0.1

    def gradient_penalty(params, batch, mask):
        def masked_mean(p):
            return jnp.sum(mask * task.batch_losses(p, batch)) / jnp.sum(mask)

        g = jax.grad(masked_mean)(params)
        return lam * sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g))

    state = create_train_state(model, ds.x[:1], SGD, jax.random.key(0))
    theta = _linear_params(state)
    z = np.concatenate([ds.x.astype(np.float64), np.ones((BATCH, 1))], axis=1)
    g = z.T @ (z @ theta - ds.y) / BATCH
    hess = z.T @ z / BATCH
    want = theta - lr * (g + 2 * lam * hess @ g)

    state, history = fit(
        state, task, ds, epochs=1, batch_size=BATCH, key=jax.random.key(1),
        regularizer=gradient_penalty, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(_linear_params(state), want, rtol=RTOL_F32, atol=ATOL_F32)
    np.testing.assert_allclose(history["regularizer"], [lam * g @ g], rtol=RTOL_F32)


def test_a_nan_loss_names_the_epoch_and_step():
    ds = classification(n=12)
    bad_id = int(ds.ids[7])
    key = jax.random.key(4)

    def nan_on_one_example(params, batch, mask):
        del params
        hit = jnp.any((batch["id"] == bad_id) & (mask > 0))
        return jnp.where(hit, jnp.nan, 0.0)

    step = int(np.flatnonzero(_perm(key, 0, 12) == 7)[0]) // BATCH + 1
    model = mlp()
    state = create_train_state(model, ds.x[:1], ADAM, jax.random.key(0))
    with pytest.raises(FloatingPointError, match=rf"epoch 1/2, step {step}/2"):
        fit(state, model_task(model), ds, epochs=2, batch_size=BATCH, key=key,
            regularizer=nan_on_one_example, progress=False)  # fmt: skip


def test_diverging_training_raises_instead_of_returning_nan():
    ds = regression(n=10)
    model = Linear(1)
    state = create_train_state(model, ds.x[:1], optax.sgd(1e30), jax.random.key(0))
    with pytest.raises(FloatingPointError, match=r"epoch 1/5"):
        fit(state, model_task(model, "regression"), ds, epochs=5, batch_size=BATCH,
            key=jax.random.key(0), progress=False)  # fmt: skip


# ---- member masks ---------------------------------------------------------------------------------
def test_a_mask_of_ones_equals_no_mask():
    ds = classification()
    model = mlp()
    task = model_task(model)
    state = create_train_state(model, ds.x[:1], ADAM, jax.random.key(0))
    kw = dict(epochs=2, batch_size=BATCH, key=jax.random.key(1), progress=False)
    plain, h_plain = fit(state, task, ds, **kw)
    masked, h_masked = fit(state, task, ds, member_mask=np.ones(len(ds), bool), **kw)
    assert _leaves_equal(plain.params, masked.params)
    assert h_plain == h_masked


def test_non_members_have_no_influence_on_training():
    ds = classification(n=40)
    mask = np.arange(40) % 3 != 0
    rng = np.random.default_rng(9)
    x2 = ds.x.copy()
    y2 = ds.y.copy()
    x2[~mask] = rng.normal(size=x2[~mask].shape) * 100  # anything at all in the non-member rows
    y2[~mask] = (y2[~mask] + 1) % 3
    other = Dataset(x=x2, y=y2, ids=ds.ids, num_classes=3)
    model = mlp()
    task = model_task(model)
    state = create_train_state(model, ds.x[:1], ADAM, jax.random.key(0))
    kw = dict(epochs=2, batch_size=BATCH, key=jax.random.key(1), member_mask=mask, progress=False)
    a, ha = fit(state, task, ds, **kw)
    b, hb = fit(state, task, other, **kw)
    assert _leaves_equal(a.params, b.params)
    assert ha == hb  # losses and train accuracy are over members only


# ---- history and evaluation -----------------------------------------------------------------------
def test_history_matches_an_independent_evaluation():
    train, test = classification(seed=0), classification(n=30, seed=1)
    model = mlp()
    task = model_task(model)
    state = create_train_state(model, train.x[:1], ADAM, jax.random.key(0))
    state, history = fit(state, task, train, epochs=3, batch_size=BATCH, key=jax.random.key(1),
                         test=test, eval_batch_size=7, progress=False)  # fmt: skip
    assert sorted(history) == ["loss", "test_acc", "train_acc"]
    assert all(len(v) == 3 for v in history.values())
    for ds, key in ((train, "train_acc"), (test, "test_acc")):
        logits = np.asarray(model.apply({"params": state.params}, ds.x))
        want = np.mean(np.argmax(logits, axis=1) == ds.y)
        assert history[key][-1] == pytest.approx(want, abs=1e-12)
        assert evaluate_accuracy(task, state.params, ds, batch_size=16) == pytest.approx(
            want, abs=1e-12
        )


def test_regression_history_reports_the_mean_squared_error():
    train = regression(n=20)
    model = get_model("mlp_regressor", num_outputs=1, hidden_sizes=(4,))
    task = model_task(model)
    state = create_train_state(model, train.x[:1], ADAM, jax.random.key(0))
    state, history = fit(state, task, train, epochs=2, batch_size=BATCH, key=jax.random.key(1),
                         test=train, progress=False)  # fmt: skip
    assert sorted(history) == ["loss", "test_mse", "train_mse"]
    pred = np.asarray(model.apply({"params": state.params}, train.x), np.float64)[:, 0]
    want = np.mean((pred - train.y) ** 2)
    assert history["train_mse"][-1] == pytest.approx(want, rel=1e-5)
    assert history["test_mse"][-1] == pytest.approx(want, rel=1e-5)


def test_progress_bar_only_when_asked(capsys):
    ds = classification(n=20)
    model = mlp()
    state = create_train_state(model, ds.x[:1], ADAM, jax.random.key(0))
    kw = dict(epochs=1, batch_size=BATCH, key=jax.random.key(0))
    fit(state, model_task(model), ds, progress=False, **kw)
    assert capsys.readouterr().err == ""
    fit(state, model_task(model), ds, progress=True, **kw)
    assert "fit cls" in capsys.readouterr().err


# ---- input errors ---------------------------------------------------------------------------------
def test_fit_rejects_bad_inputs_with_messages_that_name_them():
    ds = classification(n=20, k=3)
    two = Linear(2)  # fewer outputs than classes; checked before any computation
    state = jax.eval_shape(lambda k: create_train_state(two, ds.x[:1], SGD, k), jax.random.key(0))
    kw = dict(epochs=1, batch_size=BATCH, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match=r"labels in \[0, 2\] but the model has 2 outputs"):
        fit(state, model_task(two), ds, **kw)
    state3 = create_train_state(mlp(), ds.x[:1], ADAM, jax.random.key(0))
    task3 = model_task(mlp())
    with pytest.raises(ValueError, match="regression"):
        fit(state3, model_task(mlp(), "regression"), ds, **kw)
    with pytest.raises(ValueError, match="empty"):
        fit(state3, task3, ds.take(np.zeros((0,), np.int64)), **kw)
    with pytest.raises(ValueError, match=r"member_mask must have shape \(20,\)"):
        fit(state3, task3, ds, member_mask=np.ones(19), **kw)
    with pytest.raises(ValueError, match="selects no training example"):
        fit(state3, task3, ds, member_mask=np.zeros(20), **kw)
    with pytest.raises(ValueError, match="epochs=0"):
        fit(state3, task3, ds, **{**kw, "epochs": 0})
    with pytest.raises(ValueError, match="single key"):
        fit(state3, task3, ds, **{**kw, "key": jax.random.split(jax.random.key(0), 2)})
    with pytest.raises(TypeError, match=r"must return a scalar.*\(8,\)"):
        fit(state3, task3, ds, regularizer=lambda p, b, m: m, **kw)


# ---- retrain ---------------------------------------------------------------------------------------
def _setup_retrain():
    ds = classification(n=40)
    model = mlp()
    return ds, model, model_task(model), ADAM


def test_retrain_trains_the_same_recipe_on_the_retain_set_only():
    ds, model, task, opt = _setup_retrain()
    forget = ds.ids[[3, 17, 30]]
    kw = dict(epochs=2, batch_size=BATCH, progress=False)
    result = retrain(model, task, ds.x[:1], opt, ds, forget,
                     init_key=jax.random.key(0), data_key=jax.random.key(1), **kw)  # fmt: skip
    np.testing.assert_array_equal(result.retained_ids, np.setdiff1d(ds.ids, forget))
    # Independently: the same init and data keys, fit on the retain set built by hand.
    keep = ~np.isin(ds.ids, forget)
    retain = Dataset(x=ds.x[keep], y=ds.y[keep], ids=ds.ids[keep], num_classes=3)
    state = create_train_state(model, ds.x[:1], opt, jax.random.key(0))
    state, history = fit(state, task, retain, key=jax.random.key(1), **kw)
    assert _leaves_equal(result.state.params, state.params)
    assert result.history == history
    assert result.wall_time > 0


def test_train_original_is_retrain_with_nothing_forgotten():
    ds, model, task, opt = _setup_retrain()
    kw = dict(epochs=1, batch_size=BATCH, progress=False)
    result = train_original(model, task, ds.x[:1], opt, ds,
                            init_key=jax.random.key(0), data_key=jax.random.key(1), **kw)  # fmt: skip
    state = create_train_state(model, ds.x[:1], opt, jax.random.key(0))
    state, _ = fit(state, task, ds, key=jax.random.key(1), **kw)
    assert _leaves_equal(result.state.params, state.params)
    np.testing.assert_array_equal(result.retained_ids, ds.ids)


def test_retrain_rejects_unknown_ids_and_forgetting_everything():
    ds, model, task, opt = _setup_retrain()
    kw = dict(epochs=1, batch_size=8, init_key=jax.random.key(0), data_key=jax.random.key(1))
    with pytest.raises(ValueError, match="ids not in"):
        retrain(model, task, ds.x[:1], opt, ds, [999_999], **kw)
    with pytest.raises(ValueError, match="nothing is left"):
        retrain(model, task, ds.x[:1], opt, ds, ds.ids, **kw)


# ---- fit_many ---------------------------------------------------------------------------------------
def test_fit_many_equals_a_loop_of_single_fits():
    train, test = classification(n=30), classification(n=12, seed=1)
    model = mlp()
    task = model_task(model)
    opt = ADAM
    keys = jax.random.split(jax.random.key(0), 3)
    masks = np.random.default_rng(0).random((3, 30)) < 0.5
    kw = dict(epochs=2, batch_size=BATCH, progress=False)
    states, history = fit_many(model, task, train.x[:1], opt, train, keys=keys,
                               member_masks=masks, data_key=jax.random.key(7), test=test, **kw)  # fmt: skip
    assert history["loss"].shape == history["test_acc"].shape == (3, 2)
    for j in range(3):
        single = create_train_state(model, train.x[:1], opt, keys[j])
        single, h = fit(single, task, train, key=jax.random.key(7), member_mask=masks[j],
                        test=test, **kw)  # fmt: skip
        got = jax.tree.map(lambda a, j=j: a[j], states)
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(single.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL_VMAP)
        assert int(got.step) == int(single.step)
        for name, values in h.items():
            np.testing.assert_allclose(history[name][j], values, rtol=1e-5, atol=1e-6)


def test_fit_many_validates_its_keys_and_masks():
    train = classification(n=10)
    model = Linear(3)
    task = model_task(model)
    kw = dict(epochs=1, batch_size=4, data_key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"stack of keys \[M\]"):
        fit_many(model, task, train.x[:1], SGD, train, keys=jax.random.key(0), **kw)
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ValueError, match=r"member_masks must have shape \(2, 10\)"):
        fit_many(model, task, train.x[:1], SGD, train, keys=keys,
                 member_masks=np.ones((3, 10)), **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"selects no training example \(rows \[1\]\)"):
        fit_many(model, task, train.x[:1], SGD, train, keys=keys,
                 member_masks=np.stack([np.ones(10), np.zeros(10)]), **kw)  # fmt: skip


def test_the_epoch_order_is_that_of_padded_batches():
    """Epoch e of fit visits the rows as data.padded_batches with key fold_in(key, e) does."""
    ds = classification(n=10)
    key = jax.random.key(3)
    for epoch in range(2):
        idx, valid = training.minibatch._epoch_plan(key, epoch, n=10, batch_size=4)
        batches = list(padded_batches(ds, 4, key=jax.random.fold_in(key, epoch)))
        assert len(batches) == 3 and not valid[3:].any()
        for s, (batch, mask) in enumerate(batches):
            np.testing.assert_array_equal(valid[s], np.asarray(mask) > 0)
            np.testing.assert_array_equal(
                ds.ids[idx[s]][valid[s]], np.asarray(batch["id"])[valid[s]]
            )
        assert sorted(idx[valid].tolist()) == list(range(10))


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(training.minibatch, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_fit_full_batch_reaches_the_stationary_point_of_the_weighted_objective():
    from unlearn_jax import data as data_mod
    from unlearn_jax.training import create_train_state, fit_full_batch

    train = data_mod.load("synthetic", n=120, dim=4, classes=3, seed=0).train
    model = get_model("linear", num_outputs=3)
    task = model_task(model)
    params = create_train_state(model, train.x[:1], optax.sgd(0.1), jax.random.key(0)).params
    members = train.ids[::2]
    theta = fit_full_batch(task, params, train, l2=0.1, member_ids=members, tol=1e-6)
    # Independent check: the gradient of the objective on the members alone vanishes there.
    sub = {k: v for k, v in train.by_ids(members).as_batch().items() if k != "id"}
    objective = lambda p: task.batch_loss(p, sub) + 0.05 * optax.tree.norm(p, squared=True)
    assert float(optax.tree.norm(jax.grad(objective)(theta))) < 1e-5
    assert float(objective(theta)) < float(objective(params))
    with pytest.raises(ValueError, match="none of member_ids"):
        fit_full_batch(task, params, train, l2=0.1, member_ids=[10**6])
