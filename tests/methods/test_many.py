"""Every method of the registry through the protocol: init on ShapeDtypeStructs (eval_shape), and
unlearn_many (one vmap, no loop) equal to single runs.

The matching methods (registry.MATCHING_METHODS) are built from a MatchingContext of the two trained
models, which stand in for both its populations (oracles and TRAK's checkpoints): only the protocol
is checked here; their targets are tests/apps/test_bench.py's and tests/attribution/'s.
"""

import functools

import jax
import numpy as np
import optax
import pytest

from tests._training_setup import classification
from unlearn_jax.apps import registry
from unlearn_jax.attribution import MatchingContext
from unlearn_jax.methods import gradient as G
from unlearn_jax.methods.driver import (
    NonFiniteLossError,
    compute_statistics,
    unlearn,
    unlearn_many,
)
from unlearn_jax.methods.protocol import RunPlan
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import fit_many

RTOL = 1e-5  # vmap batches the same float32 kernels; only reassociation differs
ATOL = 1e-5
# Short runs: the point is the equality of the two paths, not unlearning quality.
SHORT = {"steps": 2}


@functools.cache
def setup():
    train = classification(n=48, d=5, k=3, seed=3)
    model = get_model("mlp", num_outputs=3, hidden_sizes=(8,))
    task = model_task(model)
    states, _ = fit_many(
        model, task, train.x[:1], optax.adam(3e-2), train, keys=jax.random.split(jax.random.key(0), 2),
        epochs=3, batch_size=16, data_key=jax.random.key(1), progress=False,
    )  # fmt: skip
    forget, retain = train.take(np.arange(9)), train.take(np.arange(9, 48))
    return task, states, forget, retain


def _model(tree, m):
    return jax.tree_util.tree_map(lambda a: a[m], tree)


@functools.cache
def context():
    task, states, _, _ = setup()
    train = classification(n=48, d=5, k=3, seed=3)
    return MatchingContext(task, train, states.params, states.params, num_oracles=2,
                           num_checkpoints=2)  # fmt: skip


ALL = sorted({**registry.METHODS, **registry.MATCHING_METHODS})


def _build(name, models=None):
    """The registry's method (for ``models`` models, for a matching method) on a short run."""
    if registry.needs_context(name):  # one epoch: one step of the 9 forget examples
        forget = setup()[2]
        method, run = registry.build(
            name, context=context(), forget=forget, models=models, epochs=1
        )
        return method, {**run, "batch_size": 16}
    method, run = registry.build(name)
    if run.get("steps") or run.get("epochs"):
        run = {**{k: v for k, v in run.items() if k not in ("steps", "epochs")}, **SHORT}
    return method, {**run, "batch_size": 16}


@pytest.mark.parametrize("name", ALL)
def test_every_registry_method_is_one_vmap_equal_to_single_runs(name):
    task, states, forget, retain = setup()
    method, run = _build(name)
    key = jax.random.key(5)
    many = unlearn_many(_build(name, models=2)[0], states, task, forget, retain, key=key, **run)
    assert many.method == method.name and many.guarantee == method.guarantee
    for m in range(2):
        single = unlearn(method, _model(states, m), task, forget, retain, key=key, **run)
        assert single.steps == many.steps
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
            _model(many.states.params, m),
            single.state.params,
        )
        for k, v in single.metrics.items():
            # An iterative solver's stopping test may flip one iteration under reassociation.
            atol = 1 if k.endswith("/iterations") else 1e-5
            np.testing.assert_allclose(many.metrics[k][m], v, rtol=1e-4, atol=atol, err_msg=k)


@pytest.mark.parametrize("name", ALL)
def test_init_runs_on_shape_dtype_structs(name):
    # jax.eval_shape(init) gives the method state's shapes without touching data or devices: the
    # shardings of a method state follow from it.
    task, states, forget, retain = setup()
    method, _run = _build(name)
    params = _model(states.params, 0)
    structs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    stats = compute_statistics(method, task, params, forget, retain, batch_size=16,
                               key=jax.random.key(0))  # fmt: skip
    stat_structs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), stats)
    plan = RunPlan.create(2, 1, 3, len(forget), len(retain))
    shapes = jax.eval_shape(
        functools.partial(method.init, task), structs, jax.random.key(0), stat_structs, plan
    )
    concrete = method.init(task, params, jax.random.key(0), stats, plan)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(concrete)
    for s, c in zip(
        jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(concrete), strict=True
    ):
        assert (s.shape, s.dtype) == (c.shape, c.dtype)


def test_non_finite_loss_names_the_model_and_step():
    task, states, forget, retain = setup()
    method = G.gradient_ascent(optimizer=optax.sgd(1e30))
    with pytest.raises(NonFiniteLossError, match="model") as info:
        unlearn_many(method, states, task, forget, retain, key=jax.random.key(0), steps=20,
                     check_every=5)  # fmt: skip
    assert info.value.model in (0, 1)


def test_states_without_a_model_axis_are_refused():
    task, states, forget, retain = setup()
    with pytest.raises(ValueError, match="leading model axis"):
        one = _model(states, 0)
        one = one.replace(params={**one.params, "extra": np.zeros(())})
        unlearn_many(G.npo(), one, task, forget, retain, key=jax.random.key(0), steps=1)
