import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._problems import explicit_hessian, flat, logistic_problem, mlp_problem
from unlearn_jax.core import curvature, solvers

SOLVE_RTOL_F32 = 1e-4  # the bar for CG/dense on a well-conditioned float32 problem
LISSA_RTOL = 1e-3  # LiSSA is a fixed-point iteration: looser, stated here


def _system(problem=logistic_problem, damping=0.1):
    params, batch, loss_fn, _ = problem()
    matvec = lambda v: curvature.hvp(loss_fn, params, batch, v)
    b = jax.tree_util.tree_map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype) * 0.7).reshape(p.shape), params
    )
    h = np.asarray(explicit_hessian(loss_fn, params, batch), np.float64)
    want = np.linalg.solve(h + damping * np.eye(h.shape[0]), np.asarray(flat(b), np.float64))
    return params, matvec, b, want, h


def _rel_err(x, want):
    return np.linalg.norm(np.asarray(flat(x), np.float64) - want) / np.linalg.norm(want)


@pytest.mark.parametrize("method", ["cg", "dense"])
def test_cg_and_dense_match_numpy_solve_on_damped_explicit_hessian(method):
    params, matvec, b, want, _ = _system()
    res = solvers.inverse_hvp(matvec, b, method=method, damping=0.1, tol=1e-6, params_like=params)
    assert _rel_err(res.x, want) < SOLVE_RTOL_F32
    assert bool(res.converged)
    assert float(res.relative_residual) < 1e-5
    if method == "cg":
        assert 1 <= int(res.iterations) <= flat(b).size + 5  # CG finishes in ~P steps


def test_lissa_converges_to_the_same_solution():
    _params, matvec, b, want, h = _system()
    lam_max = np.linalg.eigvalsh(h).max() + 0.1
    res = solvers.inverse_hvp(
        matvec, b, method="lissa", damping=0.1, scale=lam_max, depth=5000, tol=1e-5
    )
    assert _rel_err(res.x, want) < LISSA_RTOL
    assert bool(res.converged)


def test_lissa_with_too_small_a_scale_diverges_and_says_so():
    _, matvec, b, _, h = _system()
    lam_max = np.linalg.eigvalsh(h).max() + 0.1
    res = solvers.inverse_hvp(matvec, b, method="lissa", damping=0.1, scale=lam_max / 3, depth=200)
    assert not bool(res.converged)
    with pytest.raises(solvers.SolverDidNotConverge, match="relative residual"):
        solvers.inverse_hvp(
            matvec, b, method="lissa", damping=0.1, scale=lam_max / 3, depth=200, throw=True
        )


def test_cg_on_the_mlp_ggn_is_jittable_and_reports_convergence():
    params, batch, _, logits_fn = mlp_problem()
    b = jax.tree_util.tree_map(jnp.ones_like, params)

    @jax.jit
    def solve(b):
        matvec = lambda v: curvature.ggn_vp(logits_fn, params, batch, v)
        return solvers.inverse_hvp(matvec, b, method="cg", damping=1e-2, tol=1e-5)

    res = solve(b)
    direct = solvers.inverse_hvp(
        lambda v: curvature.ggn_vp(logits_fn, params, batch, v), b, method="dense", damping=1e-2
    )
    np.testing.assert_allclose(flat(res.x), flat(direct.x), rtol=1e-3, atol=1e-3)
    assert bool(res.converged)
    assert set(res.metrics()) == {
        "ihvp/iterations",
        "ihvp/residual_norm",
        "ihvp/relative_residual",
        "ihvp/converged",
        "ihvp/breakdown",
    }


def test_cg_that_runs_out_of_iterations_is_reported_not_hidden():
    _, matvec, b, _, _ = _system(damping=1e-3)
    res = solvers.inverse_hvp(matvec, b, method="cg", damping=1e-3, maxiter=2, tol=1e-8)
    assert int(res.iterations) == 2
    assert not bool(res.converged)


@pytest.mark.parametrize(
    "method,damping", [("cg", 0.0), ("lissa", 0.0), ("dense", -1.0), ("cg", -0.5)]
)
def test_non_positive_damping_is_rejected_where_needed(method, damping):
    _, matvec, b, _, _ = _system()
    with pytest.raises(ValueError, match="damping"):
        solvers.inverse_hvp(matvec, b, method=method, damping=damping)


def test_dense_allows_zero_damping_and_flags_a_singular_system():
    _, matvec, b, _, h = _system()
    definite = lambda v: jax.tree_util.tree_map(lambda a, x: a + 0.5 * x, matvec(v), v)
    res = solvers.inverse_hvp(definite, b, method="dense", damping=0.0)
    want = np.linalg.solve(h + 0.5 * np.eye(h.shape[0]), np.asarray(flat(b), np.float64))
    assert _rel_err(res.x, want) < SOLVE_RTOL_F32
    # The softmax bias direction is a null direction of the undamped Hessian: not solvable.
    assert not bool(solvers.inverse_hvp(matvec, b, method="dense", damping=0.0).converged)


def test_mismatched_right_hand_side_and_unknown_method_are_rejected():
    params, matvec, b, _, _ = _system()
    with pytest.raises(ValueError, match="same tree structure"):
        solvers.inverse_hvp(matvec, {"w": b["w"]}, damping=0.1, params_like=params)
    with pytest.raises(ValueError, match="unknown inverse_hvp method"):
        solvers.inverse_hvp(matvec, b, method="qr", damping=0.1)


def test_traced_damping_is_one_compilation_for_every_value():
    _params, matvec, b, _, h = _system()
    traces = {"n": 0}

    @jax.jit
    def solve(damping):
        traces["n"] += 1
        return solvers.inverse_hvp(matvec, b, method="cg", damping=damping, tol=1e-6).x

    for damping in (0.1, 0.5, 2.0):
        want = np.linalg.solve(h + damping * np.eye(h.shape[0]), np.asarray(flat(b), np.float64))
        assert _rel_err(solve(jnp.float32(damping)), want) < SOLVE_RTOL_F32
    assert traces["n"] == 1


def test_several_right_hand_sides_are_solved_together():
    params, matvec, b, _, h = _system()
    scales = jnp.asarray([1.0, -2.0, 0.5])
    bs = jax.tree_util.tree_map(lambda a: scales.reshape(-1, *([1] * a.ndim)) * a[None], b)
    res = solvers.inverse_hvp_many(
        matvec, bs, method="cg", damping=0.1, tol=1e-6, params_like=params
    )
    assert res.converged.shape == (3,) and bool(np.all(res.converged))
    for r, s in enumerate(np.asarray(scales)):
        want = np.linalg.solve(h + 0.1 * np.eye(h.shape[0]), s * np.asarray(flat(b), np.float64))
        assert _rel_err(jax.tree_util.tree_map(lambda a, r=r: a[r], res.x), want) < SOLVE_RTOL_F32


def test_cg_reports_a_direction_of_non_positive_curvature_instead_of_dividing_by_it():
    # An indefinite operator: A = diag(1, -1) on a two-element pytree. CG's first direction b has
    # b^T A b = 0 for b = (1, 1): breakdown at once, reported, no NaN.
    matvec = lambda v: {"a": v["a"], "b": -v["b"]}
    b = {"a": jnp.ones(1), "b": jnp.ones(1)}
    res = solvers.inverse_hvp(matvec, b, method="cg", damping=1e-12, tol=1e-6)
    assert bool(res.breakdown) and not bool(res.converged)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(res.x))
    with pytest.raises(solvers.SolverDidNotConverge, match="broke down"):
        solvers.inverse_hvp(matvec, b, method="cg", damping=1e-12, tol=1e-6, throw=True)


def test_power_iteration_on_pytrees_finds_the_top_eigenvalue():
    _, matvec, b, _, h = _system()
    top = float(jax.jit(lambda k: solvers.top_eigenvalue(matvec, b, k, iterations=100))(
        jax.random.key(0)))  # fmt: skip
    np.testing.assert_allclose(top, np.linalg.eigvalsh(h).max(), rtol=1e-3)
