import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._problems import explicit_hessian, flat, logistic_problem, loop_grads, mlp_problem
from unlearn_jax.core import curvature

RTOL_F32 = 1e-4  # second-order quantities through two autodiff passes in float32
ATOL_F32 = 1e-5


def _split(batch, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(jax.tree_util.tree_map(lambda a, s=s, start=start: a[start : start + s], batch))
        start += s
    return out


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_diag_fisher_is_mean_of_squared_per_example_grads_over_all_batches(chunk_size):
    params, batch, loss_fn, _ = mlp_problem(n=20)
    want = jax.tree_util.tree_map(
        lambda g: np.mean(np.asarray(g) ** 2, axis=0), loop_grads(loss_fn, params, batch)
    )
    # Uneven batches: a mean of per-batch means would weight them wrongly.
    got = curvature.diag_fisher(loss_fn, params, _split(batch, [7, 12, 1]), chunk_size=chunk_size)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want
    )


def test_diag_fisher_accepts_a_generator_and_rejects_a_bare_batch():
    params, batch, loss_fn, _ = logistic_problem(n=10)
    gen = (b for b in _split(batch, [5, 5]))
    ref = curvature.diag_fisher(loss_fn, params, [batch])
    got = curvature.diag_fisher(loss_fn, params, gen)
    np.testing.assert_allclose(flat(got), flat(ref), rtol=1e-5)
    with pytest.raises(TypeError, match="ITERABLE of batches"):
        curvature.diag_fisher(loss_fn, params, batch)
    with pytest.raises(ValueError, match="no batches"):
        curvature.diag_fisher(loss_fn, params, [])


def test_batch_mean_estimator_is_squared_mean_gradient_and_differs_from_fisher():
    params, batch, loss_fn, _ = mlp_problem(n=20)
    parts = _split(batch, [10, 10])
    per_ex = [loop_grads(loss_fn, params, p) for p in parts]
    want = jax.tree_util.tree_map(
        lambda a, b: (np.mean(np.asarray(a), 0) ** 2 + np.mean(np.asarray(b), 0) ** 2) / 2, *per_ex
    )
    got = curvature.diag_fisher_batch_mean(loss_fn, params, parts)
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-8)
    fisher = curvature.diag_fisher(loss_fn, params, parts)
    assert float(jnp.sum(flat(fisher))) > 2 * float(jnp.sum(flat(got)))


def test_sampled_fisher_converges_to_the_expectation_over_model_labels():
    params, batch, _, logits_fn = logistic_problem(n=6, d=3, classes=3)

    # Exact expectation: sum_c p_c (grad -log p_c)^2 for every example, by explicit enumeration.
    def exact_one(ex):
        probs = jax.nn.softmax(logits_fn(params, ex))
        total = jax.tree_util.tree_map(jnp.zeros_like, params)
        for c in range(3):
            g = jax.grad(lambda p: -jax.nn.log_softmax(logits_fn(p, ex))[c])(params)
            total = jax.tree_util.tree_map(lambda t, gg: t + probs[c] * gg**2, total, g)
        return total

    exacts = [exact_one(jax.tree_util.tree_map(lambda a: a[i], batch)) for i in range(6)]
    want = jax.tree_util.tree_map(lambda *t: sum(t) / 6, *exacts)
    got = curvature.diag_fisher_sampled(
        logits_fn, params, [batch], jax.random.key(0), num_samples=4000, chunk_size=4
    )
    np.testing.assert_allclose(flat(got), flat(want), rtol=0.08, atol=2e-3)
    again = curvature.diag_fisher_sampled(
        logits_fn, params, [batch], jax.random.key(0), num_samples=4000, chunk_size=4
    )
    np.testing.assert_array_equal(flat(got), flat(again))


@pytest.mark.parametrize("problem", [logistic_problem, mlp_problem])
@pytest.mark.parametrize("chunk_size", [None, 6])
def test_hvp_matches_explicit_hessian(problem, chunk_size):
    params, batch, loss_fn, _ = problem()
    v = jax.tree_util.tree_map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params
    )
    want = explicit_hessian(loss_fn, params, batch) @ flat(v)
    got = curvature.hvp(loss_fn, params, batch, v, chunk_size=chunk_size)
    np.testing.assert_allclose(flat(got), want, rtol=RTOL_F32, atol=ATOL_F32)


def _explicit_ggn(logits_fn, params, batch, out_hessian):
    """(1/B) sum_i J_i^T H_out,i J_i with the [K, P] Jacobians materialised."""
    flat_params, unravel = jax.flatten_util.ravel_pytree(params)

    @jax.jit
    def one(ex):
        jac = jax.jacobian(lambda fp: logits_fn(unravel(fp), ex))(flat_params)  # [K, P]
        return jac.T @ out_hessian(logits_fn(params, ex), ex) @ jac

    return jnp.mean(jax.vmap(one)(batch), axis=0)


def test_ggn_vp_cross_entropy_matches_explicit_jt_h_j():
    params, batch, _, logits_fn = mlp_problem()

    def ce_hessian(logits, ex):
        p = jax.nn.softmax(logits)
        return jnp.diag(p) - jnp.outer(p, p)

    ggn = _explicit_ggn(logits_fn, params, batch, ce_hessian)
    v = jax.tree_util.tree_map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype) + 1.0).reshape(p.shape), params
    )
    got = curvature.ggn_vp(logits_fn, params, batch, v, loss="cross_entropy", chunk_size=7)
    np.testing.assert_allclose(flat(got), ggn @ flat(v), rtol=RTOL_F32, atol=ATOL_F32)
    assert np.min(np.linalg.eigvalsh(np.asarray(ggn, np.float64))) > -1e-5  # PSD


def test_ggn_vp_mse_and_callable_loss_agree_with_explicit():
    params, batch, _, logits_fn = mlp_problem()
    v = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.1, params)
    mse = _explicit_ggn(logits_fn, params, batch, lambda o, ex: jnp.eye(o.shape[0]))
    got = curvature.ggn_vp(logits_fn, params, batch, v, loss="mse")
    np.testing.assert_allclose(flat(got), mse @ flat(v), rtol=RTOL_F32, atol=ATOL_F32)
    # A callable loss whose output Hessian is autodiffed: quartic in the outputs.
    quartic = lambda o, ex: jnp.sum(o**4) / 4
    ref = _explicit_ggn(logits_fn, params, batch, lambda o, ex: jnp.diag(3 * o**2))
    got = curvature.ggn_vp(logits_fn, params, batch, v, loss=quartic)
    np.testing.assert_allclose(flat(got), ref @ flat(v), rtol=RTOL_F32, atol=ATOL_F32)


def test_ggn_equals_hessian_for_a_linear_model_with_cross_entropy():
    params, batch, _, logits_fn = logistic_problem()
    ce = lambda p, ex: -jax.nn.log_softmax(logits_fn(p, ex))[ex["y"]]
    v = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), params)
    np.testing.assert_allclose(
        flat(curvature.ggn_vp(logits_fn, params, batch, v)),
        flat(curvature.hvp(ce, params, batch, v)),
        rtol=RTOL_F32,
        atol=ATOL_F32,
    )


def test_curvature_products_reject_mismatched_vectors():
    params, batch, loss_fn, logits_fn = logistic_problem()
    with pytest.raises(ValueError, match="same tree structure"):
        curvature.hvp(loss_fn, params, batch, {"w": params["w"]})
    bad = {"w": params["w"][:1], "b": params["b"]}
    with pytest.raises(ValueError, match="shape"):
        curvature.ggn_vp(logits_fn, params, batch, bad)
    with pytest.raises(ValueError, match="unknown GGN loss"):
        curvature.ggn_vp(logits_fn, params, batch, params, loss="hinge")


def test_flax_tasks_take_the_per_layer_path_automatically(monkeypatch):
    """diag_fisher, diag_fisher_sampled and per_example_grad_norms of ``task.loss`` of a Flax model
    go through the per-layer captures (no per-example gradient formed) and equal the generic path;
    ``method="generic"`` forces the reference."""
    from unlearn_jax.core import grads, layer_stats
    from unlearn_jax.models import MLP, model_task

    model = MLP(num_outputs=3, hidden_sizes=(8,))
    task = model_task(model)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 3, 12))}  # fmt: skip
    params = model.init(jax.random.key(0), batch["x"][:1])["params"]
    calls = []
    for name in ("diag_fisher_sum", "per_example_norms", "diag_fisher_sampled_sum"):
        real = getattr(layer_stats, name)
        monkeypatch.setattr(
            layer_stats,
            name,
            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k),
        )
    halves = [jax.tree_util.tree_map(lambda a, s=s: a[s : s + 6], batch) for s in (0, 6)]
    fast = curvature.diag_fisher(task.loss, params, halves)
    slow = curvature.diag_fisher(task.loss, params, halves, method="generic")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9),
                           fast, slow)  # fmt: skip
    norms = grads.per_example_grad_norms(task.loss, params, batch)
    want = grads.per_example_grad_norms(task.loss, params, batch, method="generic")
    np.testing.assert_allclose(norms, want, rtol=2e-5)
    sampled = curvature.diag_fisher_sampled(task.outputs, params, halves, jax.random.key(1),
                                            num_samples=64)  # fmt: skip
    reference = curvature.diag_fisher_sampled(task.outputs, params, halves, jax.random.key(1),
                                              num_samples=64, method="generic")  # fmt: skip
    # Other draws of the same estimator: equal in expectation (64 draws per example).
    total = lambda t: sum(float(jnp.sum(a)) for a in jax.tree_util.tree_leaves(t))
    assert abs(total(sampled) - total(reference)) < 0.2 * total(reference)
    assert {"diag_fisher_sum", "per_example_norms", "diag_fisher_sampled_sum"} <= set(calls)
