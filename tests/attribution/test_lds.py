"""The linear datamodeling score against scipy's Spearman correlation, on predictors whose LDS is
known: exact linear datamodels (LDS 1) and scores unrelated to the outputs (LDS about 0)."""

import jax
import numpy as np
import pytest
import scipy.stats

from unlearn_jax.attribution import lds as L
from unlearn_jax.attribution.trak import ScoreStore


def test_a_perfect_predictor_has_lds_one_and_its_store_reads_agree():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 7))
    masks = L.subset_masks(40, 25, key=jax.random.key(0))
    # The outputs ARE a linear datamodel of the scores, seen through a monotone map per query.
    actual = np.exp(0.3 * (masks @ scores)) + np.arange(7)
    result = L.linear_datamodeling_score(scores, masks, actual)
    np.testing.assert_allclose(result.per_query, 1.0, rtol=1e-12)
    assert result.mean == pytest.approx(1.0) and result.undefined == 0
    store = ScoreStore(scores.astype(np.float32), np.arange(40), np.arange(7))
    from_store = L.linear_datamodeling_score(store, masks, actual)
    np.testing.assert_allclose(from_store.predicted, masks @ scores, rtol=1e-5)
    assert from_store.mean == pytest.approx(1.0)


def test_a_random_predictor_has_lds_about_zero_per_query_as_scipy():
    rng = np.random.default_rng(1)
    masks = L.subset_masks(40, 25, key=jax.random.key(1))  # the shapes of the test above
    scores = rng.normal(size=(40, 200))
    actual = rng.normal(size=(25, 200))  # unrelated to the subsets
    result = L.linear_datamodeling_score(scores, masks, actual)
    # scipy's full correlation matrix of the 2 x 200 columns; its off-diagonal block's diagonal
    # pairs each query's predicted and actual outputs (one call instead of 200).
    want = np.diagonal(scipy.stats.spearmanr(masks @ scores, actual).statistic[:200, 200:])
    np.testing.assert_allclose(result.per_query, want, rtol=1e-10, atol=1e-12)
    # 200 queries, each correlation with standard deviation ~1/5 around 0: the mean within ~0.015
    assert abs(result.mean) < 0.05


def test_ties_get_average_ranks_and_constant_queries_are_undefined():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(20, 5)).astype(float)  # many ties
    b = rng.integers(0, 3, size=(20, 5)).astype(float)
    np.testing.assert_array_equal(L.average_ranks(a), scipy.stats.rankdata(a, axis=0))
    want = [scipy.stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(5)]
    np.testing.assert_allclose(L.spearman(a, b), want, rtol=1e-12)
    masks = np.eye(4, 6, dtype=bool)
    actual = np.column_stack([np.arange(4.0), np.ones(4)])  # query 1 never changes
    result = L.linear_datamodeling_score(
        np.ones((6, 2)) * [[1.0], [2.0], [3.0], [4], [5], [6]], masks, actual
    )
    assert result.undefined == 1 and np.isnan(result.per_query[1])
    assert result.mean == pytest.approx(1.0)


def test_subset_masks_hold_exactly_a_fraction_and_depend_on_the_key_only():
    masks = L.subset_masks(11, 6, key=jax.random.key(3), fraction=0.3)
    assert masks.shape == (6, 11) and masks.dtype == bool
    np.testing.assert_array_equal(masks.sum(1), 3)
    np.testing.assert_array_equal(masks, L.subset_masks(11, 6, key=jax.random.key(3), fraction=0.3))
    assert len({row.tobytes() for row in masks}) > 1


def test_errors_name_the_problem():
    masks = np.eye(4, 5, dtype=bool) | np.eye(4, 5, 1, dtype=bool)  # 4 subsets of 5 examples
    with pytest.raises(ValueError, match="share the subset axis"):
        L.linear_datamodeling_score(np.ones((5, 2)), masks, np.ones((3, 2)))
    with pytest.raises(ValueError, match="at least 3 subsets"):
        L.linear_datamodeling_score(np.ones((5, 2)), masks[:2], np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"must be \[n, n_q\] = \[5, 2\]"):
        L.linear_datamodeling_score(np.ones((4, 2)), masks, np.ones((4, 2)))
    with pytest.raises(ValueError, match="fraction must lie in"):
        L.subset_masks(5, 2, key=jax.random.key(0), fraction=1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        L.linear_datamodeling_score(np.ones((5, 2)), masks, np.full((4, 2), np.nan))
