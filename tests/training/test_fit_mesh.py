"""fit under a mesh, in this process (one CPU device): argument checks and the one-device mesh.

The 8-device comparisons (data x fsdp, fsdp x tensor, fit_many) run in their own process:
tests/methods/sharded_check.py's ``check_fit``, started by tests/methods/test_sharded.py.
"""

import jax
import numpy as np
import pytest

from tests._training_setup import ADAM, BATCH, classification, mlp
from unlearn_jax import sharding
from unlearn_jax.models import model_task
from unlearn_jax.training import create_train_state, fit, fit_many, retrain


def _setup():
    data = classification()
    model = mlp()
    state = create_train_state(model, data.x[:1], ADAM, jax.random.key(0))
    return model, data, state


def test_rules_or_logical_without_a_mesh_are_refused():
    model, data, state = _setup()
    kwargs = dict(epochs=1, batch_size=BATCH, key=jax.random.key(1), progress=False)
    with pytest.raises(ValueError, match="pass mesh= too"):
        fit(state, model_task(model), data, rules=sharding.ShardingRules(), **kwargs)
    with pytest.raises(ValueError, match="pass mesh= too"):
        fit(state, model_task(model), data, logical={("head", "kernel"): ("embed", None)}, **kwargs)
    with pytest.raises(ValueError, match="pass mesh= too"):
        fit_many(
            model, model_task(model), data.x[:1], ADAM, data, keys=jax.random.split(jax.random.key(2), 2),
            epochs=1, batch_size=BATCH, data_key=jax.random.key(1), rules=sharding.ShardingRules(),
        )  # fmt: skip
    with pytest.raises(TypeError, match=r"jax\.sharding\.Mesh"):
        fit(state, model_task(model), data, mesh={"data": 1}, **kwargs)


def test_one_device_mesh_equals_the_plain_fit_and_leaves_the_callers_state_alone():
    model, data, state = _setup()
    mesh = sharding.make_mesh({"data": 1})
    kwargs = dict(epochs=1, batch_size=BATCH, key=jax.random.key(1), progress=False)
    plain, plain_history = fit(state, model_task(model), data, **kwargs)
    placed = sharding.Placement(mesh).put(state)
    out, history = fit(placed, model_task(model), data, mesh=mesh, **kwargs)
    assert int(out.step) == int(plain.step) == 5  # 40 rows in batches of 8
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(history["loss"], plain_history["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(placed), strict=True):
        assert a.sharding == b.sharding
    # The step donated fit's own copy, not the state passed in.
    assert not any(a.is_deleted() for a in jax.tree.leaves(placed))
    # retrain forwards the mesh: the same steps on all rows give the same model.
    again = retrain(
        model, model_task(model), data.x[:1], ADAM, data, [], epochs=1, batch_size=BATCH,
        init_key=jax.random.key(0), data_key=jax.random.key(1), progress=False, mesh=mesh,
    )  # fmt: skip
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(a, b)
