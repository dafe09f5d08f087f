"""Oracle matching and DMM: one step against Adam on a hand-written loss, the epoch decay, the
targets DMM builds, compilation reuse, and errors (unlearn_many: tests/methods/test_many.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

from unlearn_jax.core.task import Task
from unlearn_jax.data import Dataset
from unlearn_jax.methods import driver
from unlearn_jax.methods.driver import unlearn
from unlearn_jax.methods.matching import dmm, matching_targets, oracle_matching
from unlearn_jax.methods.protocol import RunPlan

TASK = Task(apply=lambda p, x: x @ p["w"] + p["b"][None])
RTOL, ATOL = 1e-5, 1e-7


def dataset(n, offset=0, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(
        x=rng.normal(size=(n, 4)),
        y=rng.integers(0, 3, n),
        ids=np.arange(offset, offset + n),
        num_classes=3,
    )


def params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "b": jnp.asarray(rng.normal(size=3), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }


def state(p):
    return TrainState.create(apply_fn=None, params=p, tx=optax.identity())


FORGET, RETAIN = dataset(10, 0, 1), dataset(30, 100, 2)
ALL_IDS = np.concatenate([FORGET.ids, RETAIN.ids])


def table(seed=3, scale=1.0):
    """Target rows for every forget and retain id, stored in shuffled id order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(ALL_IDS.size)
    return ALL_IDS[order], scale * rng.normal(size=(ALL_IDS.size, 3)).astype(np.float32)


def batch(ds, rows, mask):
    return {
        "x": jnp.asarray(ds.x[rows]),
        "y": jnp.asarray(ds.y[rows]),
        "id": jnp.asarray(ds.ids[rows], jnp.int32),
        "mask": jnp.asarray(mask, jnp.float32),
    }


def lookup(ids, values, wanted):
    return np.stack([values[list(ids).index(i)] for i in np.asarray(wanted)])


@pytest.mark.parametrize("datamodel", [False, True])
def test_one_step_is_adam_on_the_weighted_squared_error(datamodel):
    ids, values = table()
    lr, ratio, c = 0.05, 3.0, 0.7
    if datamodel:
        method = dmm((ids, values), scale=c, learning_rate=lr, retain_ratio=ratio)
    else:
        method = oracle_matching((ids, values), learning_rate=lr, retain_ratio=ratio)
    p0 = params()
    stats = {name: s.value for name, s in method.feeds.statistics.items()}
    init = jax.jit(method.init, static_argnums=0)
    st = init(TASK, p0, jax.random.key(0), stats, RunPlan.create(5, 2, 4, 10, 30))
    fb = batch(FORGET, [0, 3, 5, 1], [1, 1, 1, 0])  # a padding row: weight 0
    rb = batch(RETAIN, [2, 7, 11, 4], [1, 1, 1, 1])
    update = jax.jit(method.update, static_argnums=0)
    new, st, metrics = update(TASK, p0, st, fb, rb, jax.random.key(1))

    def hand_loss(p):  # (mean_f e + ratio mean_r e) / (1 + ratio), e = mean_k (z - t)^2
        parts = []
        for b in (fb, rb):
            z = b["x"] @ p["w"] + p["b"][None]
            t = lookup(ids, values, b["id"])
            if datamodel:
                t = (b["x"] @ p0["w"] + p0["b"][None]) - c * t
            e = jnp.mean((z - t) ** 2, axis=1)
            parts.append(jnp.sum(b["mask"] * e) / jnp.sum(b["mask"]))
        return (parts[0] + ratio * parts[1]) / (1 + ratio)

    @jax.jit
    def reference(p):
        loss, grads = jax.value_and_grad(hand_loss)(p)
        adam = optax.adam(lr)
        updates, _ = adam.update(grads, adam.init(p), p)
        return loss, optax.apply_updates(p, updates)

    loss, want = reference(p0)
    np.testing.assert_allclose(metrics["loss"], loss, RTOL, ATOL)
    for k in p0:
        np.testing.assert_allclose(new[k], want[k], RTOL, ATOL)
    assert float(metrics["targets/missing"]) == 0.0


def test_dmm_without_effect_moves_nothing_and_the_rate_decays_per_epoch():
    # Zero predicted effects: the targets are the model's own logits, computed in the same step,
    # so every gradient is exactly 0 and so is Adam's update (a target off by rounding would not
    # do: Adam scales any gradient up to the learning rate).
    p0 = params(4)
    zero = np.zeros((ALL_IDS.size, 3), np.float32)
    result = unlearn(
        dmm((ALL_IDS, zero), scale=5.0, learning_rate=0.05),
        state(p0),
        TASK,
        FORGET,
        RETAIN,
        key=jax.random.key(0),
        batch_size=4,
    )
    assert result.steps == 15  # 5 epochs of ceil(10 / 4) forget batches
    assert result.hparams["epochs"] == 5  # the run length the method fixes, recorded
    for k in p0:
        np.testing.assert_array_equal(result.state.params[k], p0[k])
    np.testing.assert_allclose(
        result.metrics["learning_rate"], 0.05 * 0.95 ** (np.arange(15) // 3), rtol=1e-6
    )


def test_dmm_starts_from_the_scaled_predicted_effect():
    # At theta_0 the DMM target is z_0 - c * effect, so the error is (c * effect)^2.
    p0 = params(5)
    ids, effects = table(6)
    method = dmm((ids, effects), scale=2.0, learning_rate=0.05, retain_ratio=0.0)
    # one batch holds the whole forget set, so step 0's error is over all of it
    result = unlearn(method, state(p0), TASK, FORGET, RETAIN, key=jax.random.key(0), batch_size=16)
    want = np.mean((2.0 * lookup(ids, effects, FORGET.ids)) ** 2)
    np.testing.assert_allclose(result.metrics["forget/mse"][0], want, rtol=1e-5)
    assert result.metrics["forget/mse"][-1] < 0.9 * want  # and it moves towards the targets


def test_a_new_request_compiles_nothing():
    # unlearn_many against unlearn per model, with tables tiled per model: tests/methods/
    # test_many.py runs both matching methods of the registry through it.
    first = oracle_matching(table(9), learning_rate=0.01)
    stats = {name: s.value for name, s in first.feeds.statistics.items()}
    _, update = driver.compiled_steps(
        first, TASK, params(), stats, RunPlan.create(), key=jax.random.key(0)
    )
    unlearn(first, state(params(7)), TASK, FORGET, RETAIN, key=jax.random.key(2), batch_size=4)
    assert update._cache_size() == 1
    # Another request (another forget set, other targets of the same table shape): the same
    # functions, so the step the driver compiled above is reused.
    smaller = FORGET.take(np.arange(6))
    second = oracle_matching(table(11), learning_rate=0.01)
    assert second.update is first.update and second.init is first.init
    unlearn(second, state(params()), TASK, smaller, RETAIN, key=jax.random.key(4), batch_size=4)
    assert update._cache_size() == 1


def test_errors_name_the_problem():
    ids, values = table()
    with pytest.raises(ValueError, match="have no target"):
        unlearn(
            oracle_matching((ids[:-1], values[:-1])),
            state(params()),
            TASK,
            FORGET,
            RETAIN,
            key=jax.random.key(0),
            batch_size=4,
        )
    with pytest.raises(ValueError, match="predicted for a forget set of 3"):
        unlearn(
            dmm((ids, values), forget_ids=FORGET.ids[:3]),
            state(params()),
            TASK,
            FORGET,
            RETAIN,
            key=jax.random.key(0),
            batch_size=4,
        )
    with pytest.raises(ValueError, match="ids repeat"):
        matching_targets([1, 2, 1], np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"outputs must be \[n, K\] with n = 2"):
        matching_targets([1, 2], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        matching_targets([1, 2], np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="hold 2 models' tables, but models=3"):
        oracle_matching(matching_targets(ids, values, models=2), models=3)
    with pytest.raises(TypeError, match="targets must be MatchingTargets"):
        oracle_matching(values)
    with pytest.raises(ValueError, match="decay must lie in"):
        oracle_matching((ids, values), decay=0.0)
