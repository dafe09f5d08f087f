import math

import numpy as np
import pytest

from unlearn_jax.evaluation import challenge, mia

EXACT = 1e-12  # float64; the reference and the library take the same logarithms
DELTA = 1e-5
CAP = 50.0


def _reference_attack_epsilon(fp, fn, num_negative, num_positive):
    """Rule 7 for one attack from its error counts: +inf, None (discarded) or a value >= 0."""
    fpr, fnr = fp / num_negative, fn / num_positive
    if fpr == 0 and fnr == 0:
        return math.inf
    if fpr == 0 or fnr == 0:
        return None
    terms = []
    if 1 - DELTA - fpr > 0:
        terms.append(math.log(1 - DELTA - fpr) - math.log(fnr))
    if 1 - DELTA - fnr > 0:
        terms.append(math.log(1 - DELTA - fnr) - math.log(fpr))
    if not terms:
        return None
    return max(0.0, *terms)


def _reference_epsilon(u, r, both_directions=False):
    """The released scorer's rules for one example, transcribed slowly from their statement.

    Written from the rules (module docstring of ``challenge``), not from either implementation: the
    positive class by median, the peaky rule, the one-threshold grid (here in float64; the released
    float32 grid differs by rounding only), the interval family counted model by model, every
    attack reduced to its error counts.
    """
    u, r = [float(v) for v in u], [float(v) for v in r]
    pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
    range_pos, range_neg = max(pos) - min(pos), max(neg) - min(neg)
    smallest, largest = min(range_pos, range_neg), max(range_pos, range_neg)
    if largest > 0 and smallest / largest < 0.01:
        return CAP
    attacks = set()  # (false positives, false negatives, negatives, positives)

    low, high = min(pos + neg), max(pos + neg)
    for t in np.linspace(low, high, math.ceil(100 * (high - low))):
        fn = sum(1 for v in pos if v < t)  # positives predicted negative
        fp = sum(1 for v in neg if v >= t)  # negatives predicted positive
        attacks.add((fp, fn, len(neg), len(pos)))
        if both_directions:  # "positive iff phi < t"
            attacks.add((len(neg) - fp, len(pos) - fn, len(neg), len(pos)))

    # The interval family's positive class is the side with the smaller range (ties: neg).
    peaky, other = (neg, pos) if range_pos >= range_neg else (pos, neg)
    first_right, last_right = min(peaky) + smallest - 2.0, max(peaky) + 2.0
    rights = np.linspace(first_right, last_right, math.ceil(100 * (last_right - first_right)))
    lefts = np.array([np.linspace(b - smallest - 2.0, b - smallest + 2.0, 400) for b in rights])
    a, b = lefts[:, :, None], rights[:, None, None]  # [right ends, left ends, 1]
    p, q = np.array(peaky)[None, None, :], np.array(other)[None, None, :]  # [1, 1, models]
    fn = np.sum((p < a) | (p > b), axis=-1).ravel()
    fp = np.sum((a <= q) & (q <= b), axis=-1).ravel()
    base = p.size + 1  # (fp, fn) pairs coded as one integer to find the distinct ones quickly
    for code in np.unique(fp * base + fn).tolist():
        attacks.add((code // base, code % base, q.size, p.size))

    values = [_reference_attack_epsilon(*attack) for attack in attacks]
    values = [v for v in values if v is not None]
    return min(CAP, max(values)) if values else 0.0


def _cases():
    """[models, examples] samples: (unlearned, retrained) per case, 2 forget examples each."""
    rng = np.random.default_rng(0)

    def z(m=40):
        return rng.normal(size=(m, 2))

    # Ties that pick a side. Equal ranges, so the interval family's positive class is rule 2's
    # negative class: both sides span exactly [-2, 2] (dyadic values), the unlearned models
    # concentrated in the middle, the retrained ones near the ends.
    middle = np.clip(np.round(64 * 0.4 * z()) / 64, -2.0, 2.0)
    ends = np.where(np.arange(40)[:, None] < 21, 1.75, -1.75) + 0.1 * z()
    ends = np.clip(np.round(64 * ends) / 64, -2.0, 2.0)
    middle[:2] = ends[:2] = [[-2.0, -2.0], [2.0, 2.0]]
    # Equal medians and ranges, so rule 2 makes the unlearned side positive: the same sorted values
    # but for those between the median and the 80th percentile, pushed up.
    same_ends = np.sort(3 * z(), axis=0)
    pushed = same_ends.copy()
    pushed[21:32] += 0.8 * (same_ends[32] - same_ends[21:32])
    return {
        "identical": (z(), z()),
        "equal_ranges": (middle, ends),
        "equal_medians": (pushed, same_ends),
        "shifted": (z() + 0.5, z()),
        "different_spread": (0.5 * z(), z()),
        "over_forgetting": (z() - 1.0, z()),
        "peaky": (0.005 * z(), z()),
        "well_separated": (z() + 6.0, z()),
        "unequal_model_counts": (z(40) + 0.3, z(28)),
        "ties": (np.round(z()), np.round(z() + 0.5)),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_epsilons_match_the_transcribed_rules(case):
    u, r = CASES[case]
    got = challenge.challenge_epsilons(u, r)
    want = [_reference_epsilon(u[:, n], r[:, n]) for n in range(u.shape[1])]
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)
    if case in ("peaky", "well_separated"):
        np.testing.assert_array_equal(got, CAP)
    else:
        assert np.all((got > 0) & (got < CAP))


def test_both_directions_adds_the_reversed_thresholds():
    u, r = CASES["different_spread"]
    got = challenge.challenge_epsilons(u, r, both_directions=True)
    want = [_reference_epsilon(u[:, n], r[:, n], both_directions=True) for n in range(2)]
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)
    assert np.all(got >= challenge.challenge_epsilons(u, r))


def test_over_forgetting_is_attacked_like_under_forgetting():
    # The positive class is whichever side has the larger median, the interval family's whichever
    # has the smaller range: the labels "unlearned" and "retrained" play no part, so swapping them
    # changes nothing. A rule that only calls "unlearned" above a threshold would give the
    # over-forgetting direction (unlearned models less confident) epsilon near 0.
    u, r = CASES["over_forgetting"]
    forward = challenge.challenge_epsilons(u, r)
    np.testing.assert_array_equal(forward, challenge.challenge_epsilons(r, u))
    np.testing.assert_array_equal(forward, challenge.challenge_epsilons(-u, -r))
    assert np.all(forward > 2.0)


def test_pinned_special_cases():
    # Retrained: 12 values interleaved with the unlearned ones plus 4 far out (range 2), so no
    # attack separates the sides; only the peaky rule can give the cap.
    def retrained(u):
        return np.concatenate([u[:12] + 0.0007, [-1.0, -0.5, 0.5, 1.0]])[:, None]

    # Range 0.018 = 0.9% of the other's: peaky -> the cap (or a cap of one's own).
    peaky = np.linspace(-0.009, 0.009, 16)
    assert challenge.challenge_epsilons(peaky[:, None], retrained(peaky))[0] == CAP
    assert challenge.challenge_epsilons(peaky[:, None], retrained(peaky), cap=7.0)[0] == 7.0
    # Range 0.022 = 1.1%: not peaky, and the attacks give a finite epsilon.
    tight = np.linspace(-0.011, 0.011, 16)
    eps = challenge.challenge_epsilons(tight[:, None], retrained(tight))[0]
    assert 0 < eps < CAP
    assert eps == pytest.approx(_reference_epsilon(tight, retrained(tight)[:, 0]), abs=EXACT)
    # The same values in another order: every attack has FPR = 1 - FNR -> epsilon exactly 0.
    r = np.random.default_rng(3).normal(size=(16, 1))
    assert challenge.challenge_epsilons(r[::-1], r)[0] == 0.0
    # Every value equal: the released code stops (no attack kept); here epsilon 0.
    assert challenge.challenge_epsilons(np.ones((8, 1)), np.ones((8, 1)))[0] == 0.0
    # Two distinct constants 0.5 apart: a threshold separates them perfectly -> the cap.
    assert challenge.challenge_epsilons(np.ones((8, 1)), np.full((8, 1), 1.5))[0] == CAP


def test_counting_and_epsilon_table_by_hand():
    values = np.array([0.0, 1.0, 1.0, 2.0])
    # One threshold: "phi >= t" counts a value equal to t; an interval [a, b] counts both ends.
    np.testing.assert_array_equal(
        challenge._count_at_least(values, np.array([-1.0, 1.0, 1.5, 2.0, 2.5])), [4, 3, 1, 1, 0]
    )
    left = np.array([[0.0, 1.0, 1.5, 2.5]])
    np.testing.assert_array_equal(
        challenge._count_between(values, left, np.array([2.0])), [[4, 3, 1, 0]]
    )
    table = challenge._epsilon_table(4, 2, DELTA)  # [fp 0..4, fn 0..2]
    assert table.shape == (5, 3)
    assert table[0, 0] == math.inf  # perfect
    assert table[0, 1] == -math.inf and table[3, 0] == -math.inf  # one zero rate: discarded
    assert table[4, 2] == -math.inf  # FPR = FNR = 1: both terms undefined, discarded
    # FPR 1/4, FNR 1/2: max(log(0.75 - d) - log 0.5, log(0.5 - d) - log 0.25) = log(2 - 4 d).
    assert table[1, 1] == pytest.approx(math.log(2 - 4 * DELTA), abs=EXACT)
    # FPR 1, FNR 1/2: the first term is undefined; the second, log(0.5 - d), is negative -> 0.
    assert table[4, 1] == 0.0


def test_float32_grid_matches_its_definition():
    grid = challenge._float32_grid(-1.23456789012345, 2.3456789, 359)
    assert grid.size == 359
    assert grid[0] == np.float32(-1.23456789012345) and grid[-1] == np.float32(2.3456789)
    step = (np.float32(2.3456789) - np.float32(-1.23456789012345)) / np.float32(358)
    assert grid[100] == np.float32(np.float32(-1.23456789012345) + step * np.float32(100))
    assert grid[300] == np.float32(np.float32(2.3456789) - step * np.float32(58))
    np.testing.assert_allclose(grid, np.linspace(-1.23456789012345, 2.3456789, 359), atol=1e-6)
    assert challenge._float32_grid(0.5, 0.5, 1).tolist() == [0.5]


@pytest.mark.parametrize(
    "num_models, last_bucket",
    # ceil(ln 511) = 7 (e^6 = 403 < 511 < e^7 = 1097), ceil(ln 127) = 5 (e^4 = 55 < 127 < e^5 =
    # 148), ceil(ln 7) = 2, ceil(ln 2) = 1, ln 1 = 0; last bucket 2 ceil(ln(M - 1)) - 1.
    [(512, 13), (128, 9), (8, 3), (3, 1), (2, -1)],
)
def test_points_last_bucket_by_hand(num_models, last_bucket):
    edge = 0.5 * (last_bucket + 1)  # the first epsilon past the last bucket
    eps = [0.0, 0.4999, 0.5, 1.0, max(edge - 1e-9, 0.0), edge, 50.0]
    got = challenge.challenge_points(eps, num_models=num_models)
    want = [2.0 ** -math.floor(2 * e) if math.floor(2 * e) <= last_bucket else 0.0 for e in eps]
    np.testing.assert_array_equal(got, want)
    assert got[-2] == 0.0 and got[-1] == 0.0


def test_points_buckets_and_limits():
    eps = np.array([0.0, 0.4999, 0.5, 0.99, 1.0, 1.2, 3.0, 50.0])
    want = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 2.0**-6, 2.0**-100]
    np.testing.assert_allclose(challenge.challenge_points(eps), want, rtol=EXACT)
    # Beyond max_bucket: 0 points (the released rule), not the last bucket's points.
    np.testing.assert_array_equal(
        challenge.challenge_points(eps, max_bucket=2), [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    )
    np.testing.assert_array_equal(challenge.challenge_points([0.3, 0.6], max_bucket=0), [1.0, 0.0])
    # Another bin width: M = 512 -> E = 7 -> buckets of 1.0 up to k = 6.
    np.testing.assert_array_equal(
        challenge.challenge_points([0.9, 6.5, 7.0], num_models=512, bin_width=1.0),
        [1.0, 2.0**-6, 0.0],
    )


def test_score_by_hand():
    rng = np.random.default_rng(4)
    r = rng.normal(size=(8, 3))
    # Column 0: the same values permuted -> epsilon 0 -> 1 point; column 1: peaky -> 50 -> 0
    # points; column 2: shifted -> whatever epsilon, whose points follow the M = 8 rule (last
    # bucket 3).
    u = np.stack([r[::-1, 0], np.full(8, 0.1) + 1e-4 * np.arange(8), r[:, 2] + 0.7], axis=1)
    out = challenge.challenge_score(
        u,
        r,
        ra_unlearned=[0.90, 0.94],
        ra_retrained=0.95,
        ta_unlearned=0.85,
        ta_retrained=np.array([0.88, 0.92]),
    )
    eps = challenge.challenge_epsilons(u, r)
    assert eps[0] == 0.0 and eps[1] == CAP
    k = math.floor(2 * eps[2])
    quality = (1.0 + 0.0 + (2.0**-k if k <= 3 else 0.0)) / 3
    assert out["challenge/forget_quality"] == pytest.approx(quality, abs=EXACT)
    assert out["challenge/ra_ratio"] == pytest.approx(0.92 / 0.95, abs=EXACT)
    assert out["challenge/ta_ratio"] == pytest.approx(0.85 / 0.90, abs=EXACT)
    assert out["challenge/score"] == pytest.approx(
        quality * (0.92 / 0.95) * (0.85 / 0.90), abs=EXACT
    )
    assert out["challenge/epsilon_max"] == CAP
    assert out["challenge/epsilon_mean"] == pytest.approx(np.mean(eps), abs=EXACT)
    assert out["challenge/last_bucket"] == 3.0
    # An explicit max_bucket overrides the rule from the number of models.
    wide = challenge.challenge_score(
        u, r, ra_unlearned=1, ra_retrained=1, ta_unlearned=1, ta_retrained=1, max_bucket=100
    )
    assert wide["challenge/forget_quality"] == pytest.approx(
        (1.0 + 2.0**-100 + 2.0**-k) / 3, abs=EXACT
    )
    assert wide["challenge/last_bucket"] == 100.0


def test_identical_distributions_score_above_shifted_ones():
    # The in-sample maximum over attacks is biased upwards (module docstring): identical
    # distributions earn about 0.15-0.2 points per example, not 1; a shift of 1 sd far fewer.
    rng = np.random.default_rng(0)
    u, r = rng.normal(size=(64, 16)), rng.normal(size=(64, 16))
    utility = dict(ra_unlearned=1.0, ra_retrained=1.0, ta_unlearned=1.0, ta_retrained=1.0)
    same = challenge.challenge_score(u, r, **utility)["challenge/forget_quality"]
    shifted = challenge.challenge_score(u + 1.0, r, **utility)["challenge/forget_quality"]
    assert 0.08 < same < 0.35
    assert same > 3 * shifted


def test_confidences_follow_the_released_statistic():
    assert challenge.challenge_confidences(np.log([[0.8, 0.1, 0.1]]), [0])[0] == pytest.approx(
        math.log(0.8 / 0.2), abs=EXACT
    )
    rng = np.random.default_rng(5)
    logits = 10 * rng.normal(size=(3, 7, 4))
    labels = rng.integers(0, 4, size=7)
    np.testing.assert_allclose(
        challenge.challenge_confidences(logits, labels),
        mia.logit_margins(logits, labels),
        rtol=0,
        atol=1e-10,
    )
    # Far past float64's reach the 1e-45 offsets take over: +-log(1e45).
    saturated = challenge.challenge_confidences([[800.0, 0.0], [0.0, 800.0]], [0, 0])
    np.testing.assert_allclose(saturated, [45 * math.log(10), -45 * math.log(10)], rtol=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="share the example axis"):
        challenge.challenge_epsilons(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        challenge.challenge_epsilons(np.full((2, 1), np.nan), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="delta must lie in"):
        challenge.challenge_epsilons(np.zeros((2, 1)), np.zeros((2, 1)), delta=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        challenge.challenge_points([-0.1])
    with pytest.raises(ValueError, match="num_models must be an integer >= 2"):
        challenge.challenge_points([0.1], num_models=1)
    with pytest.raises(ValueError, match="not both"):
        challenge.challenge_points([0.1], num_models=8, max_bucket=3)
    with pytest.raises(ValueError, match="max_bucket must be an integer >= 0"):
        challenge.challenge_points([0.1], max_bucket=-1)
    with pytest.raises(ValueError, match="needs at least 2"):
        challenge.challenge_score(
            np.zeros((1, 1)),
            np.zeros((3, 1)),
            ra_unlearned=1.0,
            ra_retrained=1.0,
            ta_unlearned=1.0,
            ta_retrained=1.0,
        )
    with pytest.raises(ValueError, match="ra_retrained must be positive"):
        challenge.challenge_score(
            np.zeros((2, 1)),
            np.zeros((2, 1)),
            ra_unlearned=1.0,
            ra_retrained=0.0,
            ta_unlearned=1.0,
            ta_retrained=1.0,
        )
