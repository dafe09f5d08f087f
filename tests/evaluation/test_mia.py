import math

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from unlearn_jax.evaluation import mia

EXACT = 1e-12  # float64 host arithmetic on a handful of terms
# AUC of two samples of 2000 from one distribution: sd = sqrt((n1 + n0 + 1) / (12 n1 n0)) ~ 0.0091,
# so 0.05 is more than 5 sd.
NULL_AUC_N = 2000
NULL_AUC_TOL = 0.05


def _probs_to_logits(p):
    return np.log(np.asarray(p, np.float64)) + 7.0  # an arbitrary shift: softmax ignores it


# ---------------------------------------------------------------------------------------------------
# Features by hand
# ---------------------------------------------------------------------------------------------------
def test_margin_loss_confidence_entropy_by_hand():
    p = [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]
    logits, labels = _probs_to_logits(p), np.array([0, 1])
    np.testing.assert_allclose(
        mia.logit_margins(logits, labels), [0.0, math.log(0.3 / 0.7)], atol=EXACT
    )
    np.testing.assert_allclose(
        mia.per_example_losses(logits, labels), [-math.log(0.5), -math.log(0.3)], atol=EXACT
    )
    np.testing.assert_allclose(mia.confidences(logits, labels), [0.5, 0.3], atol=EXACT)
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    np.testing.assert_allclose(mia.entropies(logits), [h, h], atol=EXACT)


def test_modified_entropy_by_hand():
    logits = _probs_to_logits([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    # Mentr = -(1 - p_y) log p_y - sum_{k != y} p_k log(1 - p_k)
    want_y0 = -0.5 * math.log(0.5) - (0.3 * math.log(0.7) + 0.2 * math.log(0.8))
    want_y2 = -0.8 * math.log(0.2) - (0.5 * math.log(0.5) + 0.3 * math.log(0.7))
    got = mia.modified_entropies(logits, np.array([0, 2]))
    np.testing.assert_allclose(got, [want_y0, want_y2], atol=EXACT)


def test_modified_entropy_separates_confident_wrong_from_confident_right():
    logits = _probs_to_logits([[0.98, 0.01, 0.01]] * 2)
    right, wrong = mia.modified_entropies(logits, np.array([0, 1]))
    h = mia.entropies(logits)
    assert h[0] == h[1]  # plain entropy cannot tell them apart
    assert right < 0.2 < 5.0 < wrong


def test_features_exact_for_extreme_logits():
    # p_y rounds to 1.0 (or 0.0) in float64; the margin-based formulas stay exact.
    logits = np.array([[1000.0, 0.0, 0.0], [1000.0, 0.0, 0.0]])
    labels = np.array([0, 1])
    phi = mia.logit_margins(logits, labels)
    np.testing.assert_allclose(phi, [1000.0 - math.log(2.0), -1000.0], rtol=1e-15)
    loss = mia.per_example_losses(logits, labels)
    np.testing.assert_allclose(loss, [2.0 * math.exp(-1000.0), 1000.0], rtol=1e-12, atol=1e-300)
    mentr = mia.modified_entropies(logits, labels)
    # y=1: -(1 - p_1) log p_1 = 1000 (to 1e-430); -p_0 log(1 - p_0) with 1 - p_0 = 2 e^-1000.
    np.testing.assert_allclose(mentr[1], 1000.0 + 1000.0 - math.log(2.0), rtol=1e-12)
    assert np.all(np.isfinite(mentr)) and 0.0 <= mentr[0] < 1e-300


def test_features_broadcast_over_models():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(4, 6, 5)), rng.integers(0, 5, size=6)
    got = mia.logit_margins(logits, labels)
    want = np.stack([mia.logit_margins(logits[m], labels) for m in range(4)])
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got, want, atol=EXACT)


# ---------------------------------------------------------------------------------------------------
# Threshold attacks, ROC, AUC
# ---------------------------------------------------------------------------------------------------
def _separable(n=200, c=10, seed=0):
    rng = np.random.default_rng(seed)
    y_in, y_out = rng.integers(0, c, n), rng.integers(0, c, n)
    members = 20.0 * np.eye(c)[y_in] + 0.1 * rng.normal(size=(n, c))  # loss ~ 0
    nonmembers = 0.1 * rng.normal(size=(n, c))  # near-uniform: loss ~ log c, high entropy
    return members, y_in, nonmembers, y_out


@pytest.mark.parametrize("feature", mia.FEATURES)
def test_threshold_attack_perfect_separation(feature):
    members, y_in, nonmembers, y_out = _separable()
    out = mia.threshold_attacks(members, y_in, nonmembers, y_out, features=[feature])
    assert out[f"mia/{feature}/auc"] == 1.0
    assert out[f"mia/{feature}/tpr@0.1%fpr"] == 1.0
    assert out[f"mia/{feature}/advantage"] == 1.0


@pytest.mark.parametrize("feature", mia.FEATURES)
def test_threshold_attack_identical_distributions_is_chance(feature):
    rng = np.random.default_rng(1)
    logits = 2.0 * rng.normal(size=(2 * NULL_AUC_N, 10))
    labels = rng.integers(0, 10, 2 * NULL_AUC_N)
    n = NULL_AUC_N
    out = mia.threshold_attacks(logits[:n], labels[:n], logits[n:], labels[n:], features=[feature])
    assert abs(out[f"mia/{feature}/auc"] - 0.5) < NULL_AUC_TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + 0.7 * labels, 1)  # rounding creates many ties
    assert mia.roc_auc(scores, labels) == pytest.approx(
        skm.roc_auc_score(labels, scores), abs=1e-12
    )
    fpr, tpr, thr = mia.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=EXACT)
    np.testing.assert_allclose(tpr, sk_tpr, atol=EXACT)
    np.testing.assert_allclose(thr[1:], sk_thr[1:], atol=EXACT)
    # The rank formula equals the trapezoidal area under the curve.
    trapezoid = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert mia.roc_auc(scores, labels) == pytest.approx(trapezoid, abs=1e-12)


def test_roc_and_tpr_at_fpr_hand_case():
    # members 0.9, 0.5, 0.5; non-members 0.5, 0.1. Pairs: (0.9 > both) 2, (0.5 = 0.5) 2 x 1/2,
    # (0.5 > 0.1) 2 -> AUC = 5 / 6. ROC: (0, 0), (0, 1/3), (1/2, 1), (1, 1).
    scores, labels = [0.9, 0.5, 0.5, 0.5, 0.1], [1, 1, 1, 0, 0]
    assert mia.roc_auc(scores, labels) == pytest.approx(5 / 6, abs=EXACT)
    fpr, tpr, thr = mia.roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.1])
    # Linear interpolation on the tied (diagonal) segment: 1/3 + (0.25 / 0.5) * (2/3) = 2/3.
    assert mia.tpr_at_fpr(fpr, tpr, 0.25) == pytest.approx(2 / 3, abs=EXACT)
    assert mia.tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(1 / 3, abs=EXACT)  # highest TPR at FPR 0
    assert mia.tpr_at_fpr(fpr, tpr, 0.5) == 1.0
    assert mia.tpr_at_fpr(fpr, tpr, 1.0) == 1.0


def test_tpr_at_low_fpr_staircase():
    # 1000 non-members 0..999; members 999.5, 998.5 and ten low ones (n_1 = 12). Descending, the ROC
    # visits (0, 1/12) at 999.5, (0.001, 1/12) at 999, (0.001, 2/12) at 998.5, (0.002, 2/12) at 998:
    # the best attack with FPR <= 0.1% takes threshold 998.5 and catches both high members.
    nonmembers = np.arange(1000.0)
    members = np.r_[999.5, 998.5, np.arange(10.0)]
    out = mia.attack_metrics(members, nonmembers, target_fprs=(0.0, 0.0005, 0.001, 0.01))
    assert out["tpr@0%fpr"] == pytest.approx(1 / 12, abs=EXACT)
    assert out["tpr@0.05%fpr"] == pytest.approx(1 / 12, abs=EXACT)  # flat segment
    assert out["tpr@0.1%fpr"] == pytest.approx(2 / 12, abs=EXACT)
    assert out["tpr@1%fpr"] == pytest.approx(2 / 12, abs=EXACT)


# ---------------------------------------------------------------------------------------------------
# Learned attack, MIA-Efficacy
# ---------------------------------------------------------------------------------------------------
def _confident(rng, n, c, strength):
    y = rng.integers(0, c, n)
    return strength * np.eye(c)[y] + rng.normal(size=(n, c)), y


@pytest.mark.parametrize("forget_like", ["nonmembers", "members", "half"])
def test_mia_efficacy_tracks_what_the_forget_set_looks_like(forget_like):
    rng = np.random.default_rng(0)
    retain = _confident(rng, 1500, 10, 8.0)  # members: confident and correct
    test = _confident(rng, 500, 10, 0.5)  # non-members: unsure
    unseen, seen = _confident(rng, 300, 10, 0.5), _confident(rng, 300, 10, 8.0)
    forget = {
        "nonmembers": unseen,
        "members": seen,
        "half": (np.r_[unseen[0][:150], seen[0][:150]], np.r_[unseen[1][:150], seen[1][:150]]),
    }[forget_like]
    out = mia.mia_efficacy(
        *forget,
        retain_logits=retain[0],
        retain_labels=retain[1],
        test_logits=test[0],
        test_labels=test[1],
        key=0,
    )
    assert out["mia/learned/holdout_auc"] > 0.95
    low, high = {"nonmembers": (95.0, 100.0), "members": (0.0, 5.0), "half": (45.0, 55.0)}[
        forget_like
    ]
    assert low <= out["MIA-Efficacy"] <= high  # a percentage


def test_learned_attack_balances_classes_and_is_deterministic():
    rng = np.random.default_rng(0)
    members = rng.normal(1.0, 1.0, size=(1000, 3))
    nonmembers = rng.normal(-1.0, 1.0, size=(100, 3))
    targets = rng.normal(size=(20, 3))
    a = mia.learned_attack(members, nonmembers, targets, key=jax.random.key(3))
    b = mia.learned_attack(members, nonmembers, targets, key=jax.random.key(3))
    c = mia.learned_attack(members, nonmembers, targets, key=jax.random.PRNGKey(3))
    assert a.num_per_class == 100
    np.testing.assert_array_equal(a.target_member_prob, b.target_member_prob)
    assert np.all(c.target_member_prob >= 0)
    # Balanced training: an example exactly between the two means is about a coin flip.
    mid = mia.learned_attack(members, nonmembers, np.zeros((1, 3)), key=0)
    assert abs(mid.target_member_prob[0] - 0.5) < 0.15
    assert 0.85 < mid.holdout_acc <= 1.0


def test_learned_attack_rejects_too_few_examples():
    with pytest.raises(ValueError, match="too few examples"):
        mia.learned_attack(np.ones((5, 2)), np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="same number of columns"):
        mia.learned_attack(np.ones((5, 2)), np.ones((5, 3)), np.ones((1, 2)))


# ---------------------------------------------------------------------------------------------------
# LiRA
# ---------------------------------------------------------------------------------------------------
def test_lira_hand_case():
    # IN values 1, 3 (mean 2, ddof-0 std 1); OUT values -1, 1 (mean 0, std 1).
    shadow_phi = np.array([[1.0], [3.0], [-1.0], [1.0]])
    shadow_in = np.array([[True], [True], [False], [False]])
    for phi, want in [(1.0, 0.0), (2.0, 2.0), (0.0, -2.0)]:
        # log N(phi; 2, 1) - log N(phi; 0, 1) = (phi^2 - (phi - 2)^2) / 2
        scores, metrics = mia.lira(shadow_phi, shadow_in, np.array([phi]))
        assert scores[0] == pytest.approx(want, abs=EXACT)
        assert metrics == {}
    offline, _ = mia.lira(shadow_phi, shadow_in, np.array([1.0]), online=False)
    assert offline[0] == pytest.approx(math.log(0.5 * (1 + math.erf(1 / math.sqrt(2)))), abs=EXACT)


def _planted_lira(seed=0, m=64, n=400, shift=1.5, noise=0.5):
    """Each example has its own difficulty mu_n; training on it raises phi by `shift`."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 3.0, size=n)
    shadow_in = rng.random((m, n)) < 0.5
    shadow_phi = mu + shift * shadow_in + noise * rng.normal(size=(m, n))
    target_in = rng.random(n) < 0.5
    target_phi = mu + shift * target_in + noise * rng.normal(size=n)
    return shadow_phi, shadow_in, target_phi, target_in


@pytest.mark.parametrize(
    "online, fix_variance", [(True, False), (True, True), (False, False), (False, True)]
)
def test_lira_recovers_planted_signal_that_a_global_threshold_misses(online, fix_variance):
    shadow_phi, shadow_in, target_phi, target_in = _planted_lira()
    scores, metrics = mia.lira(
        shadow_phi,
        shadow_in,
        target_phi,
        target_in=target_in,
        online=online,
        fix_variance=fix_variance,
    )
    baseline = mia.roc_auc(target_phi, target_in)  # one threshold for all examples
    assert baseline < 0.75  # about 0.70 on this draw
    assert metrics["mia/lira/auc"] > 0.95  # about 0.97 for all four variants
    assert metrics["mia/lira/auc"] == pytest.approx(mia.roc_auc(scores, target_in), abs=EXACT)
    assert metrics["mia/lira/tpr@1%fpr"] > 0.5  # 0.64-0.70


def test_lira_null_signal_is_chance():
    shadow_phi, shadow_in, target_phi, target_in = _planted_lira(shift=0.0, n=2000)
    _, metrics = mia.lira(shadow_phi, shadow_in, target_phi, target_in=target_in)
    assert abs(metrics["mia/lira/auc"] - 0.5) < NULL_AUC_TOL


def test_lira_rejects_examples_without_enough_shadows():
    shadow_phi = np.zeros((4, 2))
    shadow_in = np.array([[1, 1], [1, 0], [0, 0], [0, 0]], bool)  # example 1 has one IN model
    with pytest.raises(ValueError, match=r"at least 2 IN shadow.*\[1\]"):
        mia.lira(shadow_phi, shadow_in, np.zeros(2))
    scores, _ = mia.lira(shadow_phi, shadow_in, np.zeros(2), fix_variance=True)
    assert scores.shape == (2,)
    with pytest.raises(ValueError, match="target_phi has 3 examples"):
        mia.lira(shadow_phi, shadow_in, np.zeros(3))


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_are_named():
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        mia.logit_margins(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="does not match the logits"):
        mia.logit_margins(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        mia.logit_margins(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        mia.logit_margins(np.zeros((3, 1)), np.zeros(3, int))
    with pytest.raises(ValueError, match="integer class labels"):
        mia.logit_margins(logits, np.zeros(3))
    with pytest.raises(ValueError, match="both members and non-members"):
        mia.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="empty"):
        mia.attack_metrics([], [0.1])
    with pytest.raises(ValueError, match="unknown membership feature"):
        mia.membership_scores(logits, np.zeros(3, int), "margin-ish")
