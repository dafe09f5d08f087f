"""The unlearn() driver: one compilation per method across runs and requests, run lengths, padded
batches, statistics, and its errors."""

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
from unlearn_jax.methods.driver import NonFiniteLossError, compute_statistics, unlearn
from unlearn_jax.methods.protocol import Feeds, Unlearner
from unlearn_jax.methods.ssd import ssd

TASK = Task(apply=lambda p, x: x @ p["w"] + p["b"][None])


def dataset(n, offset=0, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return Dataset(
        x=rng.normal(size=(n, 4)),
        y=rng.integers(0, classes, size=n),
        ids=np.arange(offset, offset + n),
        num_classes=classes,
    )


def state():
    params = {"w": jnp.full((4, 3), 0.1), "b": jnp.zeros(3)}
    # TrainState.create leaves step as the Python int 0: the driver must not retrace because of it.
    return TrainState.create(apply_fn=None, params=params, tx=optax.identity())


def counting(fn, counter):
    def counted(*args):
        counter["traces"] += 1
        return fn(*args)

    return counted


def toy_method(counter=None, batches=("forget",), phases=(("forget", None),), bad_step=None):
    """Adds 1 to the bias each step; loss is the step number (inf at ``bad_step``); records the
    number of real rows of each batch it reads."""

    def init(task, params, key, stats, plan):
        del task, params, key, stats
        return {"step": jnp.zeros((), jnp.int32), "total": plan.total_steps}

    def update(task, params, st, fb, rb, key):
        del task, key
        step = st["step"]
        params = {**params, "b": params["b"] + 1.0}
        loss = step.astype(jnp.float32)
        if bad_step is not None:
            loss = jnp.where(step == bad_step, jnp.inf, loss)
        metrics = {"loss": loss}
        if fb is not None:
            metrics["forget/rows"] = jnp.sum(fb["mask"])
            metrics["forget/ids"] = jnp.sum(jnp.where(fb["mask"] > 0, fb["id"], 0))
        if rb is not None:
            metrics["retain/rows"] = jnp.sum(rb["mask"])
        return params, {**st, "step": step + 1}, metrics

    if counter is not None:
        update = counting(update, counter)
    return Unlearner(init, update, "toy", Feeds(batches, phases), hparams={"h": 1})


# ---- compilation ---------------------------------------------------------------------------------
def test_one_compilation_for_all_steps_and_padded_batches():
    counter = {"traces": 0}
    result = unlearn(
        toy_method(counter), state(), TASK, dataset(10), key=jax.random.key(0), steps=25,
        batch_size=4,
    )  # fmt: skip
    assert counter["traces"] == 1
    assert result.steps == 25
    np.testing.assert_allclose(result.state.params["b"], 25.0)
    np.testing.assert_array_equal(result.metrics["loss"], np.arange(25))
    # 10 examples in batches of 4: 4, 4, then the last 2 padded; every pass sees each id once.
    np.testing.assert_array_equal(result.metrics["forget/rows"][:6], [4, 4, 2, 4, 4, 2])
    per_pass = result.metrics["forget/ids"][:3].sum(), result.metrics["forget/ids"][3:6].sum()
    assert per_pass == (45, 45)
    assert result.wall_time > 0 and result.method == "toy" and result.guarantee == "approximate"
    assert result.hparams == {"h": 1, "steps": 25, "batch_size": 4, "epochs": None}


def test_a_second_request_of_another_size_compiles_nothing():
    # Three deletion requests of different sizes (smaller and larger than the batch) with the same
    # method objects: the jitted steps are cached on the method's functions and the task, and
    # batches are padded to the batch size.
    counters = {"toy": {"traces": 0}, "npo": {"traces": 0}, "ssd": {"traces": 0}}
    npo = G.npo(optimizer=optax.adam(1e-2))
    npo = npo._replace(update=counting(npo.update, counters["npo"]))
    dampen = ssd(alpha=2.0, lam=0.5)
    dampen = dampen._replace(update=counting(dampen.update, counters["ssd"]))
    toy = toy_method(counters["toy"])
    retain = dataset(40, 1000, seed=5)
    for n in (3, 11, 30):
        forget = dataset(n, seed=n)
        unlearn(toy, state(), TASK, forget, key=jax.random.key(n), steps=3, batch_size=16)
        unlearn(npo, state(), TASK, forget, retain, key=jax.random.key(n), steps=3, batch_size=16)
        unlearn(dampen, state(), TASK, forget, retain, key=jax.random.key(n), batch_size=16)
    assert counters == {"toy": {"traces": 1}, "npo": {"traces": 1}, "ssd": {"traces": 1}}


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
    method = method._replace(update=counting(method.update, counter))
    for epochs in (3, 1):  # another run length: the plan is traced, not baked in
        result = unlearn(
            method, state(), TASK, dataset(7), dataset(20, 100), key=jax.random.key(0),
            epochs=epochs, batch_size=4,
        )  # fmt: skip
        assert np.all(np.isfinite(result.metrics["loss"]))
    assert counter["traces"] == 1, f"{method.name} retraced: {counter['traces']} traces"


# ---- steps, epochs and phases ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_forget", "batch_size", "epochs", "want"),
    [(10, 4, 2, 6), (10, 4, 0.5, 2), (3, 64, 2, 2), (10, 10, 1, 1)],
)
def test_epochs_count_passes_of_fixed_size_batches(n_forget, batch_size, epochs, want):
    result = unlearn(
        toy_method(), state(), TASK, dataset(n_forget), key=jax.random.key(0), epochs=epochs,
        batch_size=batch_size,
    )  # fmt: skip
    # 2 epochs over 3 examples with batch 64: each step sees all 3 (padded), an epoch is ONE step.
    assert result.steps == want


def test_phases_follow_the_epoch_layout():
    # SCRUB: per epoch a pass of max-steps over the forget set (first 2 epochs only), then a pass of
    # min-steps over the retain set. forget 10 / batch 8 -> 2 steps, retain 30 / 8 -> 4 steps.
    phases = (("forget", 2), ("retain", None))
    method = toy_method(batches=("forget", "retain"), phases=phases)
    result = unlearn(
        method, state(), TASK, dataset(10), dataset(30, 100), key=jax.random.key(0), epochs=3,
        batch_size=8,
    )  # fmt: skip
    assert result.steps == 2 * (2 + 4) + 4
    scrub = G.scrub(max_epochs=2, learning_rate=1e-3)
    result = unlearn(
        scrub, state(), TASK, dataset(10), dataset(30, 100), key=jax.random.key(0), epochs=3,
        batch_size=8,
    )  # fmt: skip
    np.testing.assert_array_equal(
        result.metrics["phase"], [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    )
    # The max phase has NaN for the min phase's terms and vice versa.
    assert np.isnan(result.metrics["retain/loss"][0]) and np.isnan(result.metrics["forget/kl"][2])
    half = unlearn(
        scrub, state(), TASK, dataset(10), dataset(30, 100), key=jax.random.key(0), epochs=0.5,
        batch_size=8,
    )  # fmt: skip
    assert half.steps == 3  # half of the first epoch's 6 steps


def test_schedules_read_the_run_length_from_the_plan():
    # l1-sparse's weight decays linearly over the run: gamma_t = gamma (1 - t / T).
    method = G.l1_sparse(gamma=1.0, optimizer=optax.sgd(0.0))
    for steps in (4, 8):
        result = unlearn(
            method, state(), TASK, dataset(5), dataset(9, 100), key=jax.random.key(0),
            steps=steps, batch_size=4,
        )  # fmt: skip
        l1, retain = result.metrics["params/l1"], result.metrics["retain/loss"]
        want = retain + (1 - np.arange(steps) / steps) * l1
        np.testing.assert_allclose(result.metrics["loss"], want, rtol=1e-6)


def test_same_key_same_result():
    method = G.random_label(learning_rate=0.05)
    runs = [
        unlearn(
            method,
            state(),
            TASK,
            dataset(7),
            dataset(20, 100),
            key=jax.random.key(3),
            steps=6,
            batch_size=4,
        )
        for _ in range(2)
    ]
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, runs[0].state.params, runs[1].state.params
    )


def test_the_callers_params_are_not_donated():
    s = state()
    unlearn(toy_method(), s, TASK, dataset(5), key=jax.random.key(0), steps=2)
    np.testing.assert_array_equal(s.params["b"], np.zeros(3))  # still readable, unchanged


def test_statistics_stream_each_source_in_order():
    # "train" is the retain set then the forget set; "by_class" sorts each stably by label.
    forget, retain = dataset(5, 0, seed=1), dataset(9, 100, seed=2)
    seen = []

    def recording(task):
        from unlearn_jax.core.reductions import Reduced, Reduction

        def init(params):
            return jnp.zeros(())

        def accumulate(acc, params, batch, key):
            jax.debug.callback(lambda ids, m: seen.append(ids[m > 0].tolist()), batch["id"],
                               batch["mask"])  # fmt: skip
            return acc

        return Reduction(init, accumulate, lambda acc: Reduced(acc, acc), "record")

    from unlearn_jax.methods.protocol import Statistic

    method = toy_method()._replace(
        feeds=Feeds(statistics={"s": Statistic(recording, "train", 4, "by_class")})
    )
    compute_statistics(method, TASK, state().params, forget, retain, batch_size=8,
                       key=jax.random.key(0))  # fmt: skip
    order = np.concatenate([
        retain.ids[np.argsort(retain.y, kind="stable")], forget.ids[np.argsort(forget.y, kind="stable")]
    ])  # fmt: skip
    assert [i for batch in seen for i in batch] == order.tolist()
    assert [len(b) for b in seen] == [4, 4, 4, 2]


# ---- errors --------------------------------------------------------------------------------------
def test_empty_forget_set_raises():
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(toy_method(), state(), TASK, dataset(5).take([]), key=jax.random.key(0), steps=2)


@pytest.mark.parametrize(
    "method",
    [toy_method(batches=("forget", "retain")), G.finetune(), G.npo(), G.scrub(), ssd()],
    ids=lambda m: m.name,
)
def test_method_that_needs_retain_gets_none(method):
    with pytest.raises(ValueError, match=f"{method.name} needs retain data"):
        kwargs = {} if method.feeds.run else {"steps": 2}
        unlearn(method, state(), TASK, dataset(5), None, key=jax.random.key(0), **kwargs)


def test_methods_without_retain_terms_accept_none():
    result = unlearn(
        G.gradient_ascent(learning_rate=0.01), state(), TASK, dataset(5), None,
        key=jax.random.key(0), steps=2,
    )  # fmt: skip
    assert result.steps == 2
    assert "retain" not in G.npo(retain_weight=0.0).feeds.sides()


def test_forget_set_overlapping_the_retain_set_is_refused():
    with pytest.raises(ValueError, match="3 ids are in both the forget and the retain set"):
        unlearn(G.npo(), state(), TASK, dataset(5), dataset(9, 2), key=jax.random.key(0), steps=1)


def test_labels_outside_the_models_outputs_are_refused():
    with pytest.raises(ValueError, match=r"labels in \[0, 4\] but the model has 3 outputs"):
        unlearn(toy_method(), state(), TASK, dataset(20, classes=5), key=jax.random.key(0), steps=1)


def test_inputs_of_the_wrong_shape_are_named():
    bad = Dataset(x=np.zeros((4, 7)), y=np.zeros(4, int), ids=np.arange(4), num_classes=3)
    with pytest.raises(ValueError, match=r"inputs of shape \(7,\)"):
        unlearn(toy_method(), state(), TASK, bad, key=jax.random.key(0), steps=1)


def test_non_finite_loss_stops_with_the_step():
    with pytest.raises(NonFiniteLossError, match="at step 7") as info:
        unlearn(
            toy_method(bad_step=7), state(), TASK, dataset(10), key=jax.random.key(0), steps=20,
            check_every=5,
        )  # fmt: skip
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


def test_one_shot_methods_take_no_run_length():
    with pytest.raises(ValueError, match="fixes its own run length"):
        unlearn(ssd(), state(), TASK, dataset(5), dataset(9, 100), key=jax.random.key(0), steps=3)


def test_not_an_unlearner():
    with pytest.raises(TypeError, match="Unlearner"):
        unlearn(T.saliency_mask(0.5), state(), TASK, dataset(5), key=jax.random.key(0), steps=1)
