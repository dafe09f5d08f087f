"""Influence / Newton removal on L2-regularised logistic regression (digits), all three solvers."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests._problems import flat, logistic_problem
from tests.methods._digits import digits, fit_logistic
from unlearn_jax import data
from unlearn_jax.core.solvers import SolverDidNotConverge
from unlearn_jax.core.task import Task
from unlearn_jax.methods.driver import unlearn
from unlearn_jax.methods.influence import (
    empirical_fisher_vp,
    influence_removal,
    l2_regularizer,
    removal_system,
)
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import create_train_state

L2 = 1e-2
# The acceptance bar of the issue: distance to the retrained optimum <= 10% of the original's.
MAX_DISTANCE_RATIO = 0.10
SOLVER_OPTIONS = {
    "dense": {},
    "cg": {"tol": 1e-8},
    "lissa": {"tol": 1e-8, "lissa_scale": "auto", "lissa_depth": 20_000},
}


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def logreg():
    """The original model at a tight optimum (||grad J|| <= 1e-10) of mean CE + (L2/2)||theta||^2."""
    splits = digits()
    model = get_model("linear", num_outputs=10)
    task = model_task(model)
    state = create_train_state(model, splits.train.x[:1], optax.sgd(0.1), jax.random.key(0))
    params0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state.params)
    theta = fit_logistic(task, params0, L2)
    return splits, task, state.replace(params=theta)


def test_original_is_at_the_optimum(logreg):
    splits, task, state = logreg
    batch = splits.train.as_batch()
    reg = l2_regularizer(L2)
    grad = jax.jit(jax.grad(lambda p: task.batch_loss(p, batch) + reg(p, batch, None)))(
        state.params
    )
    assert float(optax.tree.norm(grad)) < 1e-9


@pytest.mark.parametrize("fraction", [0.01, 0.10])
def test_newton_removal_lands_near_the_retrained_optimum(logreg, fraction):
    splits, task, state = logreg
    split = data.random_forget(splits.train, fraction, seed=0)
    retrained = fit_logistic(task, state.params, L2, split.retain.ids)
    original_distance = float(jnp.linalg.norm(flat(state.params) - flat(retrained)))
    assert original_distance > 1e-3  # the forget set does move the optimum
    for solver, options in SOLVER_OPTIONS.items():
        result = unlearn(
            influence_removal(solver=solver, l2=L2, **options),
            state,
            task,
            split.forget,
            split.retain,
            key=jax.random.key(0),
        )
        assert bool(result.metrics["ihvp/converged"][0]), (solver, result.metrics)
        distance = float(jnp.linalg.norm(flat(result.state.params) - flat(retrained)))
        ratio = distance / original_distance
        # Measured: 0.005 / 0.008 / 0.013 at 1% / 5% / 10% for every solver.
        assert ratio <= MAX_DISTANCE_RATIO, (solver, fraction, ratio)
        assert ratio <= 0.03, (solver, fraction, ratio)


def test_koh_liang_all_data_hessian_is_first_order_only(logreg):
    """hessian_data='all' is the influence function: its error grows with the forget fraction."""
    splits, task, state = logreg
    split = data.random_forget(splits.train, 0.10, seed=0)
    retrained = fit_logistic(task, state.params, L2, split.retain.ids)
    d0 = float(jnp.linalg.norm(flat(state.params) - flat(retrained)))
    ratios = {}
    for hessian_data in ("retain", "all"):
        method = influence_removal(solver="dense", l2=L2, hessian_data=hessian_data)
        result = unlearn(method, state, task, split.forget, split.retain, key=jax.random.key(0))
        ratios[hessian_data] = (
            float(jnp.linalg.norm(flat(result.state.params) - flat(retrained))) / d0
        )
    # Measured 0.013 vs 0.166: the all-data Hessian over-counts the forget set's curvature.
    assert ratios["retain"] < 0.2 * ratios["all"], ratios


def test_system_matches_explicit_hessian():
    """b and (A + damping I) agree with jax.hessian on a small problem, for every curvature."""
    params, batch, _, logits_fn = logistic_problem(n=12, d=4, classes=3, dtype=jnp.float64)

    del logits_fn
    small = Task(apply=lambda p, x: x @ p["w"] + p["b"][None])

    n, n_f, mu, delta = 12, 3, 0.3, 0.01
    forget = jax.tree_util.tree_map(lambda a: a[:n_f], batch)
    retain = jax.tree_util.tree_map(lambda a: a[n_f:], batch)
    flat_params, unravel = jax.flatten_util.ravel_pytree(params)
    per_example = lambda fp, data: jax.vmap(small.loss, in_axes=(None, 0))(unravel(fp), data)
    h_retain = jax.jit(jax.hessian(lambda fp: jnp.mean(per_example(fp, retain))))(flat_params)
    a = ((n - n_f) / n) * h_retain + (delta + mu * (n - n_f) / n) * np.eye(flat_params.size)
    v = unravel(jax.random.normal(jax.random.key(0), flat_params.shape, jnp.float64))

    def system(**options):
        """(b, A v + damping v) of removal_system, in one jitted call."""

        @jax.jit
        def run(v):
            st = removal_system(small, params, forget, retain, **options)
            return flat(st.b), flat(st.matvec(v)) + st.damping * flat(v)

        return run(v)

    b, got = system(l2=mu, damping=delta)
    np.testing.assert_allclose(got, a @ flat(v), rtol=1e-10)
    g_forget = jax.jit(jax.jacobian(lambda fp: per_example(fp, forget)))(flat_params)  # [n_f, P]
    want_b = (n_f / n) * (np.mean(g_forget, 0) + mu * flat_params)
    np.testing.assert_allclose(b, want_b, rtol=1e-10)
    # GGN equals the Hessian for a linear model with softmax cross-entropy.
    _, ggn = system(curvature="ggn", l2=mu, damping=delta)
    np.testing.assert_allclose(ggn, got, rtol=1e-10)
    # Empirical Fisher: (1/B) sum_i g_i g_i^T v, against explicit per-example gradients.
    g_retain = np.asarray(jax.jit(jax.jacobian(lambda fp: per_example(fp, retain)))(flat_params))
    fv = jax.jit(lambda v: empirical_fisher_vp(small.loss, params, retain, v, chunk_size=4))(v)
    np.testing.assert_allclose(flat(fv), g_retain.T @ (g_retain @ flat(v)) / (n - n_f), rtol=1e-10)
    # And the all-data variant adds the forget set's curvature.
    _, all_data = system(hessian_data="all", l2=mu)
    h_all = jax.jit(jax.hessian(lambda fp: jnp.mean(per_example(fp, batch))))(flat_params)
    np.testing.assert_allclose(
        all_data, (h_all + mu * np.eye(h_all.shape[0])) @ flat(v), rtol=1e-10
    )


def test_solver_that_did_not_converge_is_reported_or_raises(logreg):
    splits, task, state = logreg
    split = data.random_forget(splits.train, 0.05, seed=1)
    starved = influence_removal(solver="cg", l2=L2, maxiter=2, tol=1e-10)
    result = unlearn(starved, state, task, split.forget, split.retain, key=jax.random.key(0))
    assert not bool(result.metrics["ihvp/converged"][0])
    assert int(result.metrics["ihvp/iterations"][0]) == 2
    assert result.metrics["ihvp/relative_residual"][0] > 1e-10
    assert not bool(result.method_state.solution.converged)
    with pytest.raises(SolverDidNotConverge, match=r"stopped after 2 iterations"):
        unlearn(
            influence_removal(solver="cg", l2=L2, maxiter=2, tol=1e-10, throw=True),
            state,
            task,
            split.forget,
            split.retain,
            key=jax.random.key(0),
        )
    # LiSSA with a scale far too small diverges: reported, not hidden.
    diverged = influence_removal(solver="lissa", l2=L2, lissa_scale=0.05, lissa_depth=50)
    result = unlearn(diverged, state, task, split.forget, split.retain, key=jax.random.key(0))
    assert not bool(result.metrics["ihvp/converged"][0])


def test_argument_checks():
    with pytest.raises(ValueError, match="positive definite"):
        influence_removal(solver="cg")  # no damping, no l2
    with pytest.raises(ValueError, match="unknown curvature"):
        influence_removal(solver="dense", curvature="kfac")
    with pytest.raises(ValueError, match="unknown hessian_data"):
        influence_removal(solver="dense", hessian_data="forget")
    assert "retain" in influence_removal(solver="dense").feeds.sides()


def test_one_compilation_serves_every_split(logreg):
    """Retrace guard: sizes enter as traced values and the retain sample is padded to a
    power-of-two bucket, so deletions of any size (same bucket) reuse one compiled solve."""
    splits, task, state = logreg
    method = influence_removal(solver="cg", l2=L2, tol=3e-7)
    traces = {"n": 0}
    update = method.update

    def counted(*args):
        traces["n"] += 1
        return update(*args)

    method = method._replace(update=counted)
    for fraction, seed in ((0.01, 3), (0.05, 4), (0.2, 5)):
        split = data.random_forget(splits.train, fraction, seed=seed)
        result = unlearn(method, state, task, split.forget, split.retain, key=jax.random.key(0))
        assert bool(result.metrics["ihvp/converged"][0])
    assert traces["n"] == 1
