"""The unlearn() driver: one compilation per run, steps vs. epochs, plans, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

from unlearn_jax.core.task import Task
from unlearn_jax.data import Dataset
from unlearn_jax.methods import gradient as G
from unlearn_jax.methods import objectives as O
from unlearn_jax.methods import transforms as T
from unlearn_jax.methods.base import NonFiniteLossError, RunInfo, Unlearner, unlearn

TASK = Task(apply=lambda p, x: x @ p["w"] + p["b"][None])


def dataset(n, offset=0, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(
        x=rng.normal(size=(n, 4)),
        y=rng.integers(0, 3, size=n),
        ids=np.arange(offset, offset + n),
        num_classes=3,
    )


def state():
    params = {"w": jnp.full((4, 3), 0.1), "b": jnp.zeros(3)}
    # TrainState.create leaves step as the Python int 0: the driver must not retrace because of it.
    return TrainState.create(apply_fn=None, params=params, tx=optax.identity())


def counting(update, counter):
    def counted(*args):
        counter["traces"] += 1
        return update(*args)

    return counted


def toy_method(counter=None, needs_retain=False, bad_step=None, epoch_over="forget"):
    """Adds 1 to the bias each step; loss is the step number (inf at ``bad_step``)."""

    def init(train_state, task, forget, retain, key):
        del train_state, task, forget, retain, key
        return jnp.zeros((), jnp.int32)

    def update(train_state, step, task, fb, rb, key):
        del task, key
        if needs_retain:
            assert rb is not None
        params = {**train_state.params, "b": train_state.params["b"] + 1.0}
        loss = step.astype(jnp.float32)
        if bad_step is not None:
            loss = jnp.where(step == bad_step, jnp.inf, loss)
        metrics = {"loss": loss, "batch/x0": fb["x"][0, 0]}
        return train_state.replace(params=params), step + 1, metrics

    if counter is not None:
        update = counting(update, counter)
    return Unlearner(
        init, update, "toy", needs_retain=needs_retain, epoch_over=epoch_over, hparams={"h": 1}
    )


# ---- compilation ---------------------------------------------------------------------------------
def test_one_compilation_for_all_steps():
    counter = {"traces": 0}
    result = unlearn(
        toy_method(counter),
        state(),
        TASK,
        dataset(10),
        key=jax.random.key(0),
        steps=25,
        batch_size=4,
    )
    assert counter["traces"] == 1
    assert result.steps == 25
    np.testing.assert_allclose(result.state.params["b"], 25.0)
    np.testing.assert_array_equal(result.metrics["loss"], np.arange(25))
    assert result.wall_time > 0 and result.method == "toy"
    assert result.hparams == {"h": 1, "steps": 25, "batch_size": 4, "epochs": None}


@pytest.mark.parametrize(
    "make",
    [
        lambda: G.salun(fraction=0.5, learning_rate=0.01),  # two phases under lax.switch
        lambda: G.sam(G.npo(beta=0.1, optimizer=optax.adam(1e-3)), rho=0.05),
        lambda: G.l1_sparse(learning_rate=0.01),  # a schedule reading the step
    ],
    ids=["salun", "sam+npo", "l1_sparse"],
)
def test_gradient_methods_compile_their_step_once(make):
    counter = {"traces": 0}
    method = make()
    plan = method.plan

    def counted_plan(info):
        planned, steps = plan(info)
        return planned._replace(update=counting(planned.update, counter)), steps

    method = method._replace(plan=counted_plan)
    result = unlearn(
        method,
        state(),
        TASK,
        dataset(7),
        dataset(20, 100),
        key=jax.random.key(0),
        epochs=3,
        batch_size=4,
    )
    assert counter["traces"] == 1, f"{method.name} retraced: {counter['traces']} traces"
    assert result.steps > 5
    assert np.all(np.isfinite(result.metrics["loss"]))


# ---- steps and epochs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_forget", "batch_size", "epochs", "want"),
    [(10, 4, 2, 6), (10, 4, 0.5, 2), (3, 64, 2, 2), (10, 10, 1, 1)],
)
def test_epochs_count_fixed_size_batches(n_forget, batch_size, epochs, want):
    result = unlearn(
        toy_method(),
        state(),
        TASK,
        dataset(n_forget),
        key=jax.random.key(0),
        epochs=epochs,
        batch_size=batch_size,
    )
    # 2 epochs over 3 examples with batch 64: each step sees all 3, so an epoch is ONE step.
    assert result.steps == want


def test_epochs_over_retain():
    method = toy_method(needs_retain=True, epoch_over="retain")
    result = unlearn(
        method,
        state(),
        TASK,
        dataset(3),
        dataset(17, 100),
        key=jax.random.key(0),
        epochs=2,
        batch_size=4,
    )
    assert result.steps == 10  # ceil(17 / 4) = 5 steps per pass


def test_plan_sets_the_run_length_and_phases():
    method = G.scrub(max_epochs=2)
    info = RunInfo(forget_size=10, retain_size=30, batch_size=8, steps=None, epochs=3)
    planned, steps = method.plan(info)
    # per epoch: 2 max-steps (10 / 8) while epoch < 2, then 4 min-steps (30 / 8)
    assert steps == 2 * 2 + 3 * 4
    ms = planned.init(state(), TASK, dataset(10), dataset(30, 100), jax.random.key(0))
    np.testing.assert_array_equal(ms.phase_table, [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    _, steps = method.plan(info._replace(epochs=None, steps=5))
    assert steps == 5
    _, steps = method.plan(info._replace(epochs=0.5))
    assert steps == 3  # half of the first epoch's 6 steps


def test_same_key_same_result():
    method = G.random_label(learning_rate=0.05)
    a = unlearn(
        method,
        state(),
        TASK,
        dataset(7),
        dataset(20, 100),
        key=jax.random.key(3),
        steps=6,
        batch_size=4,
    )
    b = unlearn(
        method,
        state(),
        TASK,
        dataset(7),
        dataset(20, 100),
        key=jax.random.key(3),
        steps=6,
        batch_size=4,
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.state.params, b.state.params)


# ---- errors --------------------------------------------------------------------------------------
def test_empty_forget_set_raises():
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(toy_method(), state(), TASK, dataset(5).take([]), key=jax.random.key(0), steps=2)


@pytest.mark.parametrize(
    "method",
    [toy_method(needs_retain=True), G.finetune(), G.npo(), G.scrub()],
    ids=lambda m: m.name,
)
def test_method_that_needs_retain_gets_none(method):
    with pytest.raises(ValueError, match=f"{method.name} needs retain data"):
        unlearn(method, state(), TASK, dataset(5), None, key=jax.random.key(0), steps=2)


def test_methods_without_retain_terms_accept_none():
    result = unlearn(
        G.gradient_ascent(learning_rate=0.01),
        state(),
        TASK,
        dataset(5),
        None,
        key=jax.random.key(0),
        steps=2,
    )
    assert result.steps == 2
    assert not G.npo(retain_weight=0.0).needs_retain


def test_non_finite_loss_stops_with_the_step():
    with pytest.raises(NonFiniteLossError, match="at step 7") as info:
        unlearn(
            toy_method(bad_step=7),
            state(),
            TASK,
            dataset(10),
            key=jax.random.key(0),
            steps=20,
            check_every=5,
        )
    assert info.value.step == 7
    # the last checked state is the one after steps 0..4 (bias +5), and it is finite
    np.testing.assert_allclose(info.value.last_finite_state.params["b"], 5.0)


def test_a_diverging_gradient_method_raises_instead_of_returning_nan():
    # (sum theta)^2 with a step far too large: |sum theta| grows ~300x per step until inf, then NaN.
    blow_up = O.Term(
        "params/sq",
        "params",
        lambda p, ctx, s: sum(jnp.sum(a) for a in jax.tree_util.tree_leaves(p)) ** 2,
    )
    method = G.gradient_method(blow_up, optax.sgd(10.0), name="diverging")
    with pytest.raises(NonFiniteLossError, match="diverging: the loss became") as info:
        unlearn(
            method, state(), TASK, dataset(10), key=jax.random.key(0), steps=200, check_every=10
        )
    assert 5 < info.value.step < 200
    leaves = jax.tree_util.tree_leaves(info.value.last_finite_state.params)
    assert all(np.all(np.isfinite(a)) for a in leaves)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of"),
        ({"steps": 2, "epochs": 1}, "exactly one of"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_run_lengths(kwargs, match):
    with pytest.raises(ValueError, match=match):
        unlearn(toy_method(), state(), TASK, dataset(5), key=jax.random.key(0), **kwargs)


def test_phased_method_needs_a_plan_outside_the_driver():
    with pytest.raises(ValueError, match="plan it first"):
        G.salun().init(state(), TASK, dataset(5), dataset(5, 10), jax.random.key(0))


def test_not_an_unlearner():
    with pytest.raises(TypeError, match="Unlearner"):
        unlearn(T.saliency_mask(0.5), state(), TASK, dataset(5), key=jax.random.key(0), steps=1)
