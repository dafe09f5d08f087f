"""Certified removal (Guo et al. 2020): the noise scale, the budget and the bounds on hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.methods._digits import digits
from unlearn_jax.methods.certified import (
    CertifiedLinearModel,
    certified_fit,
    certified_remove,
    data_dependent_residual_bound,
    gaussian_constant,
    noise_scale,
    residual_budget,
    worst_case_residual_bound,
)

# Hand-computed values carry 6-7 significant digits.
HAND_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def test_noise_scale_and_budget_by_hand():
    # delta = 1e-4: c = sqrt(2 ln(1.5 / 1e-4)) = sqrt(2 * (ln 1.5 + 4 ln 10))
    #             = sqrt(2 * (0.4054651 + 9.2103404)) = sqrt(19.231611) = 4.385386.
    assert gaussian_constant(1e-4) == pytest.approx(4.385386, rel=HAND_RTOL)
    # Theorem 3 read backwards: delta = 1.5 exp(-c^2 / 2).
    assert 1.5 * math.exp(-(gaussian_constant(1e-4) ** 2) / 2) == pytest.approx(1e-4, rel=1e-12)
    # sigma = c eps' / eps: eps = 1, eps' = 0.1 -> 0.4385386.
    assert noise_scale(1.0, 1e-4, 0.1) == pytest.approx(0.4385386, rel=HAND_RTOL)
    # The authors' sigma = 10 with eps = 0.5: eps' = sigma eps / c = 5 / 4.385386 = 1.140151.
    assert residual_budget(10.0, 0.5, 1e-4) == pytest.approx(1.140151, rel=HAND_RTOL)
    # delta = 0.01: c = sqrt(2 ln 150) = sqrt(2 * 5.010635) = 3.165639; eps = 2, eps' = 1 -> 1.582820.
    assert noise_scale(2.0, 0.01, 1.0) == pytest.approx(1.582820, rel=HAND_RTOL)


def test_worst_case_bound_by_hand():
    # 4 gamma m^2 C^2 / (lam^2 (n - m)): m = 1, n = 101, lam = 0.01, gamma = 1/4, C = 1
    #   = 4 * 0.25 * 1 / (1e-4 * 100) = 100.
    assert worst_case_residual_bound(1, 101, 0.01) == pytest.approx(100.0, rel=1e-12)
    # m = 3, n = 1003, lam = 0.1: 4 * 0.25 * 9 / (0.01 * 1000) = 0.9.
    assert worst_case_residual_bound(3, 1003, 0.1) == pytest.approx(0.9, rel=1e-12)
    # gamma, C scale it: gamma = 0.1, C = 2, m = 2, n = 12, lam = 1: 4 * 0.1 * 4 * 4 / 10 = 0.64.
    assert worst_case_residual_bound(2, 12, 1.0, gamma=0.1, grad_bound=2.0) == pytest.approx(0.64)
    with pytest.raises(ValueError, match="cannot remove"):
        worst_case_residual_bound(5, 5, 0.1)


def test_newton_removal_step_and_data_dependent_bound_by_hand():
    """Four 1-D points, w* = 0 by symmetry (no noise), remove (x=1, s=+1), lam = 0.1.

    Delta = lam m w* + grad l(w*; x=1, s=+1) = 0 + (-s sigmoid(0) x) = -0.5.
    H = sum_rem sigmoid(0)^2 x^2 + lam (n - m) = 0.25 (1 + 0.25 + 0.25) + 0.3 = 0.675.
    w- = -0.5 / 0.675 = -20/27 = -0.7407407.
    Bound = gamma ||X'|| |step| ||X' step|| = 0.25 * 1.5 * (20/27)^2 = 150/729 = 0.2057613.
    Actual residual: sigmoid(-20/27) - 0.5 sigmoid(10/27) + 0.5 sigmoid(-10/27) + 0.3 (-20/27)
                   = 0.322843 - 0.295774 + 0.204226 - 0.222222 = 0.009073.
    """
    x = np.array([[1.0], [1.0], [0.5], [0.5]])
    y = np.array([1, 0, 1, 0])  # s = +1, -1, +1, -1
    model = CertifiedLinearModel(
        weights=jnp.zeros((1, 1)),
        noise=jnp.zeros((1, 1)),
        lam=0.1,
        sigma=1.0,
        epsilon=1.0,
        delta=1e-4,
        gamma=0.25,
        num_train=4,
        residual_bound=0.0,
        num_classes=2,
    )
    new, report = certified_remove(model, x[1:], y[1:], x[:1], y[:1])
    assert float(new.weights[0, 0]) == pytest.approx(-20 / 27, rel=1e-12)
    assert report.step_bound == pytest.approx(150 / 729, rel=1e-10)
    assert report.gradient_residual_norm == pytest.approx(0.009073, rel=1e-3)
    assert report.gradient_residual_norm <= report.step_bound
    assert new.num_train == 3 and report.residual_bound == pytest.approx(150 / 729)
    # budget = sigma eps / c = 1 / 4.385386 = 0.228031 >= 0.2058: certified.
    assert report.budget == pytest.approx(0.228031, rel=HAND_RTOL)
    assert report.certified and new.certified and not report.retrained
    # The same bound from the standalone function.
    assert float(data_dependent_residual_bound(x[1:], np.array([-20 / 27]))) == pytest.approx(
        150 / 729
    )


@pytest.fixture(scope="module")
def digits_features():
    splits = digits()
    x = splits.train.x.reshape(len(splits.train), -1).astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x, splits.train.y


def test_training_reaches_the_perturbed_optimum_with_the_right_noise(digits_features):
    x, y = digits_features
    model = certified_fit(x, y, lam=1e-3, epsilon=1.0, delta=1e-4, sigma=2.0, key=jax.random.key(0))
    assert model.weights.shape == (64, 10) and model.num_classes == 10
    # The sum-form gradient of L_b at the returned weights (independent numpy evaluation).
    w, b = np.asarray(model.weights), np.asarray(model.noise)
    s = np.where(y[:, None] == np.arange(10), 1.0, -1.0)
    z = x @ w
    grad = x.T @ (-s / (1 + np.exp(s * z))) + 1e-3 * len(x) * w + b
    assert np.abs(grad).max() < 1e-7
    assert model.residual_bound < 1e-8  # the optimisation error, counted against the budget
    # b ~ N(0, sigma^2 I): 640 draws, sample std within 10% of sigma = 2.
    assert abs(float(np.std(b)) - 2.0) < 0.2
    assert float(np.mean(np.asarray(model.predict(x)) == y)) > 0.85
    # budget= instead of sigma= gives sigma = c eps' / eps.
    other = certified_fit(
        x, y, lam=1e-3, epsilon=0.5, delta=1e-4, budget=0.1, key=jax.random.key(0)
    )
    assert other.sigma == pytest.approx(4.385386 * 0.1 / 0.5, rel=HAND_RTOL)
    assert other.budget == pytest.approx(0.1)


def test_sequential_removals_accumulate_and_trigger_retraining(digits_features):
    x, y = digits_features
    model = certified_fit(x, y, lam=1e-2, epsilon=1.0, delta=1e-4, sigma=1.0, key=jax.random.key(1))
    keep = np.ones(len(x), bool)
    total = model.residual_bound
    for i in range(3):  # remove points 0, 1, 2 one at a time
        keep[i] = False
        model, report = certified_remove(model, x[keep], y[keep], x[i : i + 1], y[i : i + 1])
        total += report.step_bound
        assert report.gradient_residual_norm <= report.step_bound + 1e-12
        assert report.residual_bound == pytest.approx(total)
    assert model.num_train == len(x) - 3 and model.certified
    # A batch removal whose bound exceeds a tiny budget: reported, then retrained on request.
    tight = model._replace(sigma=1e-6)
    batch = np.arange(3, 40)
    keep[batch] = False
    stale, report = certified_remove(tight, x[keep], y[keep], x[batch], y[batch])
    assert not report.certified and not stale.certified and not report.retrained
    fresh, report = certified_remove(
        tight, x[keep], y[keep], x[batch], y[batch], retrain_key=jax.random.key(2)
    )
    assert report.retrained and report.certified and fresh.certified
    assert fresh.num_train == keep.sum() and fresh.residual_bound < 1e-6
    assert not np.allclose(np.asarray(fresh.noise), np.asarray(model.noise))  # fresh noise


def test_bad_input(digits_features):
    x, y = digits_features
    with pytest.raises(ValueError, match=r"\|\|x_i\|\|_2 <= 1"):
        certified_fit(x * 2, y, lam=1e-3, epsilon=1.0, delta=1e-4, sigma=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="exactly one of sigma"):
        certified_fit(x, y, lam=1e-3, epsilon=1.0, delta=1e-4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="delta"):
        noise_scale(1.0, 1.5, 0.1)
    model = certified_fit(
        x[:100], y[:100], lam=1e-2, epsilon=1, delta=1e-4, sigma=1, key=jax.random.key(0)
    )
    with pytest.raises(ValueError, match="trained on 100 points"):
        certified_remove(model, x[2:100], y[2:100], x[:1], y[:1])
