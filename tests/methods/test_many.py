"""unlearn_many: M models at once equals M single runs (vmapped path and loop fallback)."""

import jax
import numpy as np
import optax
import pytest

from tests.methods._digits import digits
from unlearn_jax import data
from unlearn_jax.methods import gradient as G
from unlearn_jax.methods.analytic import acu
from unlearn_jax.methods.base import NonFiniteLossError, unlearn, unlearn_many
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import fit_many

RTOL = 1e-5  # vmap batches the same float32 kernels; only reassociation differs


@pytest.fixture(scope="module")
def setup():
    splits = digits()
    model = get_model("mlp", num_outputs=10, hidden_sizes=(32,))
    task = model_task(model)
    keys = jax.random.split(jax.random.key(0), 3)
    states, _ = fit_many(
        model, task, splits.train.x[:1], optax.adam(3e-3), splits.train, keys=keys, epochs=3,
        batch_size=128, data_key=jax.random.key(1), progress=False,
    )  # fmt: skip
    split = data.class_forget(splits.train, 3)
    return task, states, split


def _model(states, m):
    return jax.tree_util.tree_map(lambda a: a[m], states)


def test_vmapped_gradient_method_equals_single_runs(setup):
    task, states, split = setup
    method = G.npo(optimizer=optax.adam(5e-4))
    many = unlearn_many(
        method, states, task, split.forget, split.retain, key=jax.random.key(5), steps=4
    )
    assert many.vectorised
    assert many.metrics["loss"].shape == (3, 4)
    for m in range(3):
        # NPO draws no per-model randomness, so a single run with the same key sees the same batches.
        single = unlearn(
            method,
            _model(states, m),
            task,
            split.forget,
            split.retain,
            key=jax.random.key(5),
            steps=4,
        )
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6),
            _model(many.states.params, m),
            single.state.params,
        )


def test_host_side_method_falls_back_to_a_loop(setup):
    task, states, split = setup
    many = unlearn_many(acu(), states, task, split.forget, split.retain, key=jax.random.key(0))
    assert not many.vectorised
    single = unlearn(
        acu(), _model(states, 1), task, split.forget, split.retain, key=jax.random.key(0)
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6),
        _model(many.states.params, 1),
        single.state.params,
    )


def test_non_finite_loss_names_the_model_and_step(setup):
    task, states, split = setup
    method = G.gradient_ascent(optimizer=optax.sgd(1e30))
    with pytest.raises(NonFiniteLossError, match="model"):
        unlearn_many(method, states, task, split.forget, None, key=jax.random.key(0), steps=5)
