"""TRAK: exact leave-one-out on least squares, block-streamed scores against the one-shot formula,
the on-disk cache, and the score store's block reads."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from tests.attribution._problems import N, dataset, mlp_params, mlp_task
from unlearn_jax.attribution import features as F
from unlearn_jax.attribution import trak as T
from unlearn_jax.attribution.matching import MatchingContext
from unlearn_jax.core.task import flax_task
from unlearn_jax.data import Dataset
from unlearn_jax.models.linear import Linear

# float32 scores against float64 numpy of the same stored float32 features: the float32 inverse
# of Phi^T Phi + lam I bounds the error relative to the largest score.
RTOL, ATOL_SCALE = 1e-4, 3e-5
SPEC = T.TRAKSpec(F.kronecker(3, 2), lam=0.1, batch_size=N)


@functools.cache
def problem():
    """Two checkpoints of the tiny MLP, 9 training examples (k = 12 > n: lam > 0) and 4 queries."""
    return mlp_task(), [mlp_params(0), mlp_params(1, scale=0.7)], dataset(9, 1), dataset(4, 2, 100)


def one_shot(task, checkpoints, train, queries, per_class):
    """tau = Q_bar * mean_m Phi_m (Phi_m^T Phi_m + lam I)^-1 Psi_m^T, at once, in float64."""
    kernel, q = 0.0, 0.0
    apply = jax.jit(task.apply)
    for params in checkpoints:
        phi = np.asarray(
            F.featurize(task, params, train, SPEC.features, batch_size=N).features, np.float64
        )
        psi = F.featurize(task, params, queries, SPEC.features, per_class=per_class, batch_size=N)
        psi = np.asarray(psi.features, np.float64).reshape(-1, phi.shape[1])
        inverse = np.linalg.inv(phi.T @ phi + SPEC.lam * np.eye(phi.shape[1]))
        kernel = kernel + phi @ inverse @ psi.T / len(checkpoints)
        z = np.asarray(apply(params, train.x), np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        q = q + (1.0 - p[np.arange(len(train)), train.y]) / len(checkpoints)
    return (q[:, None] * kernel).reshape(len(train), len(queries), *([3] if per_class else []))


def test_identity_trak_on_least_squares_is_the_exact_leave_one_out_effect():
    # Least squares: f = theta^T [1, x], Q_i = y_i - f_i, and the TRAK score is the Newton step
    # phi_i^T (Phi^T Phi)^-1 psi_j Q_i. Removing example i moves the optimum by exactly
    # -(Phi^T Phi)^-1 phi_i Q_i / (1 - h_i) (Sherman-Morrison), h_i = phi_i^T (Phi^T Phi)^-1 phi_i.
    # The optimum and every leave-one-out refit are numpy's least-squares solutions (exact, and no
    # compiled iterative solver to pay for).
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(12, 3))
        y = x @ [1.0, -2.0, 0.5] + 0.3 * rng.normal(size=12)
        train = Dataset(x=x, y=y, ids=np.arange(12), num_classes=None)
        queries = Dataset(
            x=rng.normal(size=(4, 3)), y=np.zeros(4), ids=np.arange(4) + 50, num_classes=None
        )
        task = flax_task(Linear(num_outputs=1), "regression")
        # The data as the dataset holds it (its float32 inputs), in float64.
        x, y = np.asarray(train.x, np.float64), np.asarray(train.y, np.float64)
        design = np.concatenate([np.ones((12, 1)), x], axis=1)
        qx = np.concatenate([np.ones((4, 1)), np.asarray(queries.x, np.float64)], axis=1)
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        theta = {"head": {"bias": coef[:1], "kernel": coef[1:, None]}}
        spec = T.TRAKSpec(F.identity(dtype="float64"), lam=0.0, batch_size=16)
        trak = T.TRAK(task, [theta], train, spec)
        tau = np.asarray(trak.scores(queries).array)
        assert tau.dtype == np.float64
        phi = np.asarray(trak.features(0))  # columns: bias, kernel (tree order)
        np.testing.assert_allclose(phi, design, rtol=1e-12)
        leverage = np.einsum("ik,kl,il->i", phi, trak.inverse(0), phi)
        for i in range(12):
            keep = np.arange(12) != i
            loo = np.linalg.lstsq(design[keep], y[keep], rcond=None)[0]
            np.testing.assert_allclose(
                tau[i] / (1.0 - leverage[i]), qx @ (coef - loo), rtol=1e-9, atol=1e-12
            )
        # and the scores are the Newton (influence) step, from the design matrix directly
        residual = y - design @ coef
        newton = design @ np.linalg.solve(design.T @ design, qx.T) * residual[:, None]
        np.testing.assert_allclose(tau, newton, rtol=1e-9, atol=1e-12)
        # A squared error has curvature 1 in the prediction: the weighted form is the same.
        weighted = T.TRAK(task, [theta], train, dataclasses.replace(spec, curvature=True))
        np.testing.assert_allclose(weighted.scores(queries).array, tau, rtol=1e-12)


@pytest.mark.parametrize("per_class", [False, True])
def test_scores_streamed_in_blocks_equal_the_one_shot_computation(per_class, tmp_path):
    task, checkpoints, train, queries = problem()
    want = one_shot(task, checkpoints, train, queries, per_class)
    atol = ATOL_SCALE * np.abs(want).max()
    trak = T.TRAK(task, checkpoints, train, SPEC, cache_dir=tmp_path)
    # 9 rows in blocks of 4 (4, 4, 1) and 4 queries in blocks of 3 (3, 1): padded, one program
    blocked = trak.scores(queries, per_class=per_class, block_train=4, block_queries=3)
    assert isinstance(blocked.array, np.memmap) and blocked.path.parent == tmp_path / "scores"
    np.testing.assert_allclose(blocked.array, want, RTOL, atol)
    whole = T.TRAK(task, checkpoints, train, SPEC).scores(queries, per_class=per_class)
    assert not isinstance(whole.array, np.memmap)  # no cache: in memory, one block
    np.testing.assert_allclose(whole.array, want, RTOL, atol)


def test_the_cache_is_reused_by_later_requests(tmp_path, monkeypatch):
    task, checkpoints, train, queries = problem()
    first = T.TRAK(task, checkpoints, train, SPEC, cache_dir=tmp_path)
    scores = np.asarray(first.scores(queries).array)

    def refuse(*args, **kwargs):
        raise AssertionError("featurized again instead of reading the cache")

    monkeypatch.setattr(F, "featurize", refuse)
    again = T.TRAK(task, checkpoints, train, SPEC, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.scores(queries).array, scores)
    # A subset of the checkpoints and another lambda reuse the per-checkpoint features.
    other = T.TRAKSpec(SPEC.features, lam=0.5, batch_size=N)
    subset = T.TRAK(task, checkpoints[:1], train, other, cache_dir=tmp_path)
    phi = np.asarray(subset.features(0), np.float64)
    np.testing.assert_allclose(
        subset.inverse(0), np.linalg.inv(phi.T @ phi + 0.5 * np.eye(12)), rtol=1e-4, atol=1e-6
    )
    assert len(list(tmp_path.glob("features-*/meta.json"))) == 2
    # The curvature-weighted Gram Phi^T diag(p (1 - p)) Phi, from the same cached features.
    curved = T.TRAK(
        task, checkpoints[:1], train, dataclasses.replace(other, curvature=True), cache_dir=tmp_path
    )
    z = np.asarray(jax.jit(task.apply)(checkpoints[0], train.x), np.float64)
    p_y = np.exp(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(9), train.y]
    np.testing.assert_allclose(
        curved.gram(0), phi.T @ (phi * (p_y * (1 - p_y))[:, None]), rtol=1e-4, atol=1e-7
    )
    assert len(list(tmp_path.glob("features-*/inverse-*.npy"))) == 3  # lam 0.1 twice, 0.5 once
    with pytest.raises(ValueError, match="loss is linear in it"):
        T.TRAK(task, checkpoints, train, T.TRAKSpec(output="logit", curvature=True))


def test_matching_context_builds_the_targets_of_om_and_dmm():
    task, checkpoints, train, _ = problem()
    stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *checkpoints)
    context = MatchingContext(task, train, stacked, stacked, num_oracles=2, spec=SPEC)
    z = np.stack([np.asarray(jax.jit(task.apply)(p, train.x)) for p in checkpoints])
    np.testing.assert_allclose(context.oracle_logits, z.mean(0), rtol=1e-5, atol=1e-6)
    om = context.oracle_matching(models=3)
    table = om.feeds.statistics["targets"].value.value
    assert table.outputs.shape == (3, 9, 3)  # tiled for unlearn_many
    np.testing.assert_allclose(table.outputs[1], context.oracle_logits, rtol=1e-6)  # ids sorted
    forget = train.take(np.arange(3))
    method = context.dmm(forget, scale=2.0)
    table = method.feeds.statistics["targets"].value.value
    want = np.asarray(context.scores.array)[:3].sum(0)
    np.testing.assert_allclose(table.outputs, want, rtol=1e-5, atol=1e-7)
    assert float(table.scale) == 2.0 and method.hparams["scale"] == 2.0


def test_score_store_block_reads():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(7, 3, 2)).astype(np.float32)
    store = T.ScoreStore(array, np.arange(7) + 10, np.arange(3))
    np.testing.assert_allclose(
        store.sum_rows([16, 10, 12], block=2), array[[6, 0, 2]].sum(0), rtol=1e-6
    )
    masks = rng.integers(0, 2, size=(4, 7))
    np.testing.assert_allclose(
        store.masked_sums(masks, block=3), np.einsum("sn,nqk->sqk", masks, array), rtol=1e-6
    )
    with pytest.raises(ValueError, match="not training examples"):
        store.sum_rows([10, 99])
    with pytest.raises(ValueError, match=r"masks must be \[subsets, 7\]"):
        store.masked_sums(np.ones((2, 6)))


def test_errors_name_the_problem():
    task, checkpoints, train, _ = problem()
    wide = T.TRAK(task, checkpoints[:1], train, T.TRAKSpec(SPEC.features, batch_size=N))
    with pytest.raises(ValueError, match=r"not positive definite.*raise TRAKSpec\.lam"):
        wide.inverse(0)  # k = 12 > n = 9 and lam = 0
    with pytest.raises(ValueError, match="checkpoints is empty"):
        T.TRAK(task, [], train, SPEC)
    with pytest.raises(TypeError, match="list of parameter pytrees"):
        T.TRAK(task, checkpoints[0], train, SPEC)
    with pytest.raises(ValueError, match="applies to regression"):
        T.TRAK(task, checkpoints, train, T.TRAKSpec(output="prediction"))
