"""Features: projected per-example gradients of the output function against explicit matrices.

References: the per-example gradients come from the Jacobian of the batch's logits (``jax.jacrev``,
an independent path from the capture and from ``vmap(grad)``) through the margin's derivative
written by hand; the projection matrices from a transcription of ``core.layer_stats``'s documented
construction.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attribution._problems import N, dataset, documented_matrix, mlp_params, mlp_task
from unlearn_jax.attribution import features as F
from unlearn_jax.attribution import outputs as O
from unlearn_jax.core import layer_stats
from unlearn_jax.core.task import Task
from unlearn_jax.data import Dataset

# float32 features against float64 numpy products of the same float32 Jacobians.
RTOL, ATOL = 2e-5, 2e-6
LEAVES = ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]  # tree order


@functools.cache
def problem():
    ds = dataset(N, seed=0)
    batch = {"x": jnp.asarray(ds.x), "y": jnp.asarray(ds.y)}
    task, params = mlp_task(), mlp_params(0)
    jac = jax.jit(jax.jacrev(task.apply))(params, batch["x"])  # leaves [B, K, *shape]
    rows = {
        f"{layer}/{leaf}": np.asarray(jac[layer][leaf], np.float64).reshape(N, 3, -1)
        for layer in ("Dense_0", "Dense_1")
        for leaf in ("bias", "kernel")
    }
    logits = np.asarray(jax.jit(task.apply)(params, batch["x"]), np.float64)
    return task, params, batch, rows, logits


def margin_derivative(z, y):
    """d margin / d z: 1 at the label, minus the softmax over the other classes elsewhere."""
    z = np.asarray(z, np.float64)
    others = np.where(np.arange(z.shape[1])[None] == y[:, None], -np.inf, z)
    soft = np.exp(others - others.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    return np.where(np.arange(z.shape[1])[None] == y[:, None], 1.0, -soft)


def margin_rows(batch, rows, logits):
    c = margin_derivative(logits, np.asarray(batch["y"]))
    return {name: np.einsum("bk,bkp->bp", c, g) for name, g in rows.items()}


def kronecker_reference(per_leaf, spec):
    """``vec(P_in^T [G; g_bias] P_out)`` per layer, in the capture's (call) order."""
    columns = []
    for layer in ("Dense_1", "Dense_0"):
        bias = per_leaf[f"{layer}/bias"]
        d_out = bias.shape[1]
        g = np.concatenate([per_leaf[f"{layer}/kernel"].reshape(N, -1, d_out), bias[:, None]], 1)
        leaf = LEAVES.index(f"{layer}/kernel")
        p_in = documented_matrix(spec.key, leaf, 0, g.shape[1], spec.projection.k_in)
        p_out = documented_matrix(spec.key, leaf, 1, d_out, spec.projection.k_out)
        columns.append(g.reshape(N, -1) @ np.kron(p_in, p_out))
    return np.concatenate(columns, axis=1)


def test_margin_features_are_the_explicit_kronecker_projection():
    task, params, batch, rows, z = problem()
    spec = F.kronecker(3, 2)
    values, phi = F.example_features(task, params, batch, spec)
    want = kronecker_reference(margin_rows(batch, rows, z), spec)
    np.testing.assert_allclose(phi, want, RTOL, ATOL)
    layout = layer_stats.projection_layout(task, params, batch["x"], spec.projection)
    assert [name for name, _, _ in layout] == ["Dense_1", "Dense_0"]  # the order of the calls
    assert F.feature_dim(task, params, batch["x"], spec) == phi.shape[1] == 12
    # The margin by hand: z_y - log sum_{k != y} exp(z_k).
    y = np.asarray(batch["y"])
    others = [np.log(np.sum(np.exp(np.delete(z[i], y[i])))) for i in range(N)]
    np.testing.assert_allclose(values, z[np.arange(N), y] - others, RTOL, ATOL)


def test_per_class_features_project_each_logit():
    task, params, batch, rows, _ = problem()
    spec = F.kronecker(3, 2)
    per_class = F.class_features(task, params, batch, spec)
    for k in range(3):
        want = kronecker_reference({name: g[:, k] for name, g in rows.items()}, spec)
        np.testing.assert_allclose(per_class[:, k], want, RTOL, ATOL)


def test_identity_features_are_the_flattened_gradients():
    task, params, batch, rows, z = problem()
    _, phi = F.example_features(task, params, batch, F.identity())
    per_leaf = margin_rows(batch, rows, z)
    np.testing.assert_allclose(phi, np.concatenate([per_leaf[k] for k in LEAVES], 1), RTOL, ATOL)


def test_dense_features_are_the_sum_of_explicit_per_leaf_projections():
    # A model without a Flax module: every leaf takes the dense projection, R_l regenerated.
    task = Task(apply=lambda p, x: x @ p["w"] + p["b"][None])
    rng = np.random.default_rng(1)
    params = {
        "b": jnp.asarray(rng.normal(size=3), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
    _, _, batch, _, _ = problem()
    spec = F.dense(7)
    _, phi = F.example_features(task, params, batch, spec)
    x = np.asarray(batch["x"], np.float64)
    z = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
    c = margin_derivative(z, np.asarray(batch["y"]))
    grad_w = np.einsum("bi,bk->bik", x, c).reshape(N, -1)
    want = c @ documented_matrix(spec.key, 0, 2, 3, 7) + grad_w @ documented_matrix(
        spec.key, 1, 2, 12, 7
    )
    np.testing.assert_allclose(phi, want, RTOL, ATOL)


def test_featurize_streams_a_dataset_with_weights_gram_and_storage_dtype():
    task, params, batch, _, _ = problem()
    x = np.concatenate([np.asarray(batch["x"])[1:], np.ones((2, 4))])
    y = np.concatenate([np.asarray(batch["y"])[1:], [2, 0]])
    ds = Dataset(x=x, y=y, ids=np.arange(7) + 40, num_classes=3)
    spec = F.kronecker(3, 2, dtype="bfloat16")
    out = F.featurize(task, params, ds, spec, batch_size=N, gram=True)  # 6 rows, then 1 padded
    values, phi = F.example_features(task, params, {"x": x[:N], "y": jnp.asarray(y[:N])}, spec)
    assert out.features.dtype == spec.storage_dtype
    stored = np.asarray(out.features, np.float64)
    np.testing.assert_allclose(stored[:N], np.asarray(phi, np.float64), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(out.gram, stored.T @ stored, rtol=1e-5, atol=1e-6)
    z = np.asarray(jax.jit(task.apply)(params, x), np.float64)
    p_y = np.exp(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(7), y]
    np.testing.assert_allclose(out.out_to_loss, 1.0 - p_y, RTOL, ATOL)  # Q = 1 - p_y
    np.testing.assert_allclose(out.values[:N], values, RTOL, ATOL)


def test_regression_and_sequence_outputs_by_hand():
    task = Task(apply=lambda p, x: x @ p["w"], kind="regression")
    params = {"w": jnp.asarray([[1.0], [2.0]])}
    batch = {"x": jnp.asarray([[1.0, 1.0], [0.0, 2.0]]), "y": jnp.asarray([2.0, 5.0])}
    values, phi = F.example_features(task, params, batch, F.identity())
    np.testing.assert_allclose(values, [3.0, 4.0])
    np.testing.assert_allclose(phi, batch["x"])  # d(x . w)/dw = x
    function = O.OutputFunction(O.PREDICTION)
    np.testing.assert_allclose(jax.jit(function.out_to_loss)(values, batch), [-1.0, 1.0])  # y - f
    # A sequence model whose logits are rows of E: f = sum_t w_t log softmax(E[x_t])_{y_t}, so
    # d f / d E[v] = sum_{t: x_t = v} w_t (onehot(y_t) - softmax(E[v])) (repeated tokens add up).
    seq_task = Task(apply=lambda p, x: p["E"][x], kind="sequence")
    table = np.log([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    x, y = np.asarray([[0, 1, 0], [2, 2, 1]]), np.asarray([[1, 2, 0], [1, 0, 2]])
    w = np.asarray([[1.0, 1.0, 0.5], [0.0, 1.0, 1.0]])
    seq_batch = {"x": x, "y": y, "weights": w}
    values, phi = F.example_features(seq_task, {"E": table}, seq_batch, F.identity())
    soft = np.exp(table)
    want_values = [np.sum(w[b] * np.log(soft[x[b], y[b]])) for b in range(2)]
    want = np.zeros((2, 3, 3))
    for b in range(2):
        for t in range(3):
            want[b, x[b, t]] += w[b, t] * (np.eye(3)[y[b, t]] - soft[x[b, t]])
    np.testing.assert_allclose(values, want_values, rtol=1e-6)
    np.testing.assert_allclose(phi, want.reshape(2, 9), rtol=1e-5, atol=1e-6)
    seq = O.OutputFunction(O.LOG_LIKELIHOOD)
    np.testing.assert_allclose(seq.out_to_loss(np.zeros(2), {}), [1.0, 1.0])  # loss = -f


def test_errors_name_the_problem():
    task, params, batch, _, _ = problem()
    with pytest.raises(ValueError, match="'prediction' output applies to regression"):
        F.example_features(task, params, batch, F.identity(), output="prediction")
    with pytest.raises(ValueError, match="unknown feature dtype"):
        F.FeatureSpec(dtype="float16")
    with pytest.raises(TypeError, match="Projection or None"):
        F.FeatureSpec(projection=16)
    with pytest.raises(ValueError, match="per-class queries"):
        O.OutputFunction(O.LOGIT).out_to_loss(jnp.zeros(2), batch)
    with pytest.raises(ValueError, match="inputs 'x' and targets 'y'"):
        F.example_features(task, params, {"x": batch["x"]}, F.identity())
    with pytest.raises(ValueError, match="per-class features need a classification"):
        F.class_features(Task(apply=task.apply, kind="regression"), params, batch)
