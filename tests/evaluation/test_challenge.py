import math

import numpy as np
import pytest

from unlearn_jax.evaluation import challenge

EXACT = 1e-12
DELTA = 1e-5


def _reference_epsilon(u, r, delta=DELTA, cap=50.0, both_directions=True):
    """A slow, independent transcription of the rule: loop over thresholds and count by hand."""
    best = 0.0
    thresholds = [-math.inf, *sorted(set(u) | set(r))]
    directions = (True, False) if both_directions else (True,)
    for t in thresholds:
        for above in directions:
            says_unlearned = (lambda v, t=t: v > t) if above else (lambda v, t=t: v <= t)
            fpr = sum(says_unlearned(v) for v in r) / len(r)
            fnr = sum(not says_unlearned(v) for v in u) / len(u)
            if fpr == 0 and fnr == 0:
                return cap
            if fpr == 0 or fnr == 0:
                continue
            terms = []
            if 1 - delta - fpr > 0:
                terms.append(math.log(1 - delta - fpr) - math.log(fnr))
            if 1 - delta - fnr > 0:
                terms.append(math.log(1 - delta - fnr) - math.log(fpr))
            if not terms:
                return cap
            best = max(best, *terms)
    return min(best, cap)


def test_epsilon_hand_cases():
    # Columns are forget examples; rows are models.
    unlearned = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    retrained = np.array([[0.0, 2.5, 10.0], [1.0, 4.0, 11.0], [2.0, 5.0, 12.0], [3.0, 6.0, 13.0]])
    eps = challenge.challenge_epsilons(unlearned, retrained)
    # Example 0: identical samples -> nothing beats chance -> 0.
    assert eps[0] == 0.0
    # Example 1: "unlearned iff phi <= 2.5" has FPR 1/4 (retrained 2.5), FNR 1/4 (unlearned 3):
    # eps = log(1 - delta - 1/4) - log(1/4) = log(4 (0.75 - delta)); no threshold does better.
    assert eps[1] == pytest.approx(math.log(4 * (0.75 - DELTA)), abs=EXACT)
    # Example 2: perfectly separated -> FPR = FNR = 0 -> infinite -> capped at 50.
    assert eps[2] == 50.0
    # One-sided ("unlearned iff phi > t", the released code's rule) misses example 1's
    # over-forgetting; the perfect separation is still caught (both rates 1: both terms undefined).
    one_sided = challenge.challenge_epsilons(unlearned, retrained, both_directions=False)
    np.testing.assert_array_equal(one_sided, [0.0, 0.0, 50.0])


def test_single_zero_rate_attacks_are_discarded():
    # The top value is an unlearned model's, so "phi > 3.5" has FPR 0 and FNR 3/4: -log FPR = inf if
    # it were counted. Discarded, the example scores like the best two-sided finite attack.
    u = np.array([[0.0], [1.0], [2.0], [4.0]])
    r = np.array([[0.5], [1.5], [2.5], [3.0]])
    eps = challenge.challenge_epsilons(u, r)[0]
    assert eps < 50.0
    assert eps == pytest.approx(_reference_epsilon(u[:, 0].tolist(), r[:, 0].tolist()), abs=EXACT)


@pytest.mark.parametrize("both_directions", [True, False])
def test_epsilon_matches_loop_reference_with_ties(both_directions):
    rng = np.random.default_rng(0)
    u = rng.integers(0, 6, size=(12, 25)).astype(float)
    r = rng.integers(1, 8, size=(9, 25)).astype(float)  # different model counts and many ties
    got = challenge.challenge_epsilons(u, r, both_directions=both_directions)
    want = [
        _reference_epsilon(u[:, n].tolist(), r[:, n].tolist(), both_directions=both_directions)
        for n in range(25)
    ]
    np.testing.assert_allclose(got, want, atol=EXACT)
    assert np.all(got >= 0)


def test_points_buckets():
    eps = np.array([0.0, 0.4999, 0.5, 0.99, 1.0, 1.2, 3.0, 50.0])
    want = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 2.0**-6, 2.0**-100]
    np.testing.assert_allclose(challenge.challenge_points(eps), want, rtol=EXACT)
    truncated = challenge.challenge_points(eps, max_bucket=12)
    assert truncated[-1] == 2.0**-12 and truncated[-2] == 2.0**-6


def test_score_by_hand():
    unlearned = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    retrained = np.array([[0.0, 2.5, 10.0], [1.0, 4.0, 11.0], [2.0, 5.0, 12.0], [3.0, 6.0, 13.0]])
    # epsilons 0, log(3 - 4 delta) = 1.0986 (bucket 2), 50 (bucket 100) -> points 1, 1/4, 2^-100
    out = challenge.challenge_score(
        unlearned,
        retrained,
        ra_unlearned=[0.90, 0.94],
        ra_retrained=0.95,
        ta_unlearned=0.85,
        ta_retrained=np.array([0.88, 0.92]),
    )
    quality = (1.0 + 0.25 + 2.0**-100) / 3
    assert out["challenge/forget_quality"] == pytest.approx(quality, abs=EXACT)
    assert out["challenge/ra_ratio"] == pytest.approx(0.92 / 0.95, abs=EXACT)
    assert out["challenge/ta_ratio"] == pytest.approx(0.85 / 0.90, abs=EXACT)
    assert out["challenge/score"] == pytest.approx(
        quality * (0.92 / 0.95) * (0.85 / 0.90), abs=EXACT
    )
    assert out["challenge/epsilon_max"] == 50.0


def test_score_orders_identical_above_shifted_distributions():
    rng = np.random.default_rng(0)
    u, r = rng.normal(size=(256, 40)), rng.normal(size=(256, 40))
    utility = dict(ra_unlearned=1.0, ra_retrained=1.0, ta_unlearned=1.0, ta_retrained=1.0)
    quality = [
        challenge.challenge_score(u + shift, r, **utility)["challenge/forget_quality"]
        for shift in (0.0, 0.5, 1.0)
    ]
    # The in-sample max over thresholds is biased upwards (module docstring): identical
    # distributions score about 0.22, not 1; shifts of 0.5 and 1 sd about 0.08 and 0.02.
    assert 0.15 < quality[0] < 0.3
    assert quality[0] > 2 * quality[1] > 4 * quality[2]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="share the example axis"):
        challenge.challenge_epsilons(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        challenge.challenge_epsilons(np.full((2, 1), np.nan), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="must be >= 0"):
        challenge.challenge_points([-0.1])
    with pytest.raises(ValueError, match="ra_retrained must be positive"):
        challenge.challenge_score(
            np.zeros((2, 1)),
            np.zeros((2, 1)),
            ra_unlearned=1.0,
            ra_retrained=0.0,
            ta_unlearned=1.0,
            ta_retrained=1.0,
        )
