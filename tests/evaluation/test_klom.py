import math

import numpy as np
import pytest

from unlearn_jax.evaluation import mia
from unlearn_jax.evaluation.klom import klom, klom_from_margins, klom_summary

EXACT = 1e-12  # float64, 20-term sums
FLOOR = 1e-5
BINS = 20


def _floored(counts):
    """Bin probabilities of a 20-bin histogram written out by hand: floor 1e-5, renormalise."""
    p = np.maximum(np.asarray(counts, np.float64) / np.sum(counts), FLOOR)
    return p / p.sum()


def _kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def test_default_direction_is_kl_unlearned_to_oracle_on_an_asymmetric_case():
    # Unlearned margins all 0; oracle margins half 0, half 10. Pooled range [0, 10], 20 bins of 0.5:
    # 0 falls in bin 0 and 10 in bin 19 (the right edge belongs to the last bin).
    unlearned = np.zeros((4, 1))
    oracle = np.array([[0.0], [0.0], [10.0], [10.0]])
    p_u = _floored([4] + [0] * 19)
    p_o = _floored([2] + [0] * 18 + [2])
    forward = _kl(p_u, p_o)  # about log 2 = 0.693
    backward = _kl(p_o, p_u)  # about 0.5 log(0.5 / 1e-5) = 5.06
    assert forward == pytest.approx(math.log(2.0), abs=1e-3)
    assert backward > 5.0
    got = klom_from_margins(unlearned, oracle)
    assert got[0] == pytest.approx(forward, abs=EXACT)
    named = klom_from_margins(unlearned, oracle, direction="unlearned||oracle")
    np.testing.assert_array_equal(named, got)
    swapped = klom_from_margins(oracle, unlearned)
    assert swapped[0] == pytest.approx(backward, abs=EXACT)


def test_both_directions_by_hand_on_a_planted_narrow_case():
    # Unlearned margins narrower than the oracles'. Pooled range [0, 10], bins of 0.5: unlearned
    # 0, 0 -> bin 0 and 2.5, 2.6 -> bin 5; oracle 0 -> bin 0, 2.5 -> bin 5, 5 -> bin 10, 10 -> bin 19.
    unlearned = np.array([[0.0], [0.0], [2.5], [2.6]])
    oracle = np.array([[0.0], [2.5], [5.0], [10.0]])
    counts_u = [0] * BINS
    counts_u[0], counts_u[5] = 2, 2
    counts_o = [0] * BINS
    counts_o[0] = counts_o[5] = counts_o[10] = counts_o[19] = 1
    p_u, p_o = _floored(counts_u), _floored(counts_o)
    # KL(u || o) ~ 2 * 0.5 log(0.5 / 0.25) = log 2; KL(o || u) ~ 2 * 0.25 log(0.25 / 0.5) +
    # 2 * 0.25 log(0.25 / 1e-5) = 4.72: the oracle mass the unlearned models miss costs log(1/floor).
    u_to_o, o_to_u = _kl(p_u, p_o), _kl(p_o, p_u)
    assert u_to_o == pytest.approx(math.log(2.0), abs=1e-3)
    assert o_to_u == pytest.approx(-0.5 * math.log(2.0) + 0.5 * math.log(0.25 / 1e-5), abs=1e-3)
    got_u_to_o = klom_from_margins(unlearned, oracle, direction="unlearned||oracle")
    got_o_to_u = klom_from_margins(unlearned, oracle, direction="oracle||unlearned")
    assert got_u_to_o[0] == pytest.approx(u_to_o, abs=EXACT)
    assert got_o_to_u[0] == pytest.approx(o_to_u, abs=EXACT)
    assert got_o_to_u[0] > 6 * got_u_to_o[0]


def test_direction_swap_equals_argument_swap():
    rng = np.random.default_rng(2)
    unlearned = 0.4 * rng.normal(size=(30, 12))
    oracle = rng.normal(size=(25, 12)) + 0.2
    reverse = klom_from_margins(unlearned, oracle, direction="oracle||unlearned")
    np.testing.assert_array_equal(reverse, klom_from_margins(oracle, unlearned))
    assert np.all(reverse != klom_from_margins(unlearned, oracle))
    u_logits, o_logits = rng.normal(size=(6, 4, 3)), 3 * rng.normal(size=(9, 4, 3))
    labels = np.array([0, 2, 1, 1])
    np.testing.assert_array_equal(
        klom(u_logits, o_logits, labels, direction="oracle||unlearned"),
        klom(o_logits, u_logits, labels),
    )


@pytest.mark.parametrize("direction", ["unlearned||oracle", "oracle||unlearned"])
def test_pooled_maximum_is_counted_in_the_last_bin(direction):
    # The only difference between the sides is one unlearned model at the pooled maximum 10. It
    # lands in bin 19 here; the reference codes' digitize-based histograms drop it, leaving two
    # identical histograms and KLoM 0.
    unlearned = np.array([[0.0], [0.0], [0.0], [10.0]])
    oracle = np.array([[0.0], [0.0], [0.0], [0.0]])
    p_u = _floored([3] + [0] * 18 + [1])
    p_o = _floored([4] + [0] * 19)
    want = _kl(p_u, p_o) if direction == "unlearned||oracle" else _kl(p_o, p_u)
    got = klom_from_margins(unlearned, oracle, direction=direction)[0]
    assert got == pytest.approx(want, abs=EXACT)
    assert got > 0.2


def test_histogram_bins_by_hand():
    # Pooled range [-1, 1]: 20 bins of width 0.1. Unlearned -1, -0.95 -> bin 0, 0.05 -> bin 10,
    # 1 -> bin 19; oracle -0.5 -> bin 5 (4 times).
    unlearned = np.array([[-1.0], [-0.95], [0.05], [1.0]])
    oracle = np.full((4, 1), -0.5)
    counts_u = [0] * BINS
    for b in (0, 0, 10, 19):
        counts_u[b] += 1
    counts_o = [0] * BINS
    counts_o[5] = 4
    want = _kl(_floored(counts_u), _floored(counts_o))
    got = klom_from_margins(unlearned, oracle)
    assert got[0] == pytest.approx(want, abs=EXACT)


def test_identical_samples_give_zero_and_same_distribution_is_small():
    rng = np.random.default_rng(0)
    same = rng.normal(size=(50, 30))
    np.testing.assert_allclose(klom_from_margins(same, same), 0.0, atol=EXACT)
    # All margins of an example equal: both histograms are one spike.
    np.testing.assert_allclose(klom_from_margins(np.ones((3, 2)), np.ones((5, 2))), 0.0, atol=EXACT)
    # Independent draws of 200 models from the same distribution vs a shift of 1.5 sd: the
    # same-distribution values are finite-sample noise (mean ~0.15), every shifted one is larger
    # than the noise's 95th percentile (~0.27).
    a, b = rng.normal(size=(200, 500)), rng.normal(size=(200, 500))
    shifted = rng.normal(size=(200, 500)) + 1.5
    null = klom_from_margins(a, b)
    signal = klom_from_margins(a, shifted)
    assert np.all(null >= 0) and null.mean() < 0.25
    assert signal.mean() > 5 * null.mean()
    assert signal.min() > np.percentile(null, 95)


def test_margins_are_clipped_before_binning():
    # 150 and 200 both clip to 100: identical to an oracle at 100.
    unlearned = np.array([[150.0], [200.0]])
    oracle = np.array([[100.0], [100.0], [100.0]])
    np.testing.assert_allclose(klom_from_margins(unlearned, oracle), 0.0, atol=EXACT)
    assert klom_from_margins(unlearned, oracle, clip=1000.0)[0] > 1.0


def test_klom_from_logits_uses_the_margin():
    rng = np.random.default_rng(1)
    u_logits, o_logits = rng.normal(size=(6, 4, 3)), rng.normal(size=(9, 4, 3)) * 2
    labels = np.array([0, 2, 1, 1])
    got = klom(u_logits, o_logits, labels)

    # margin = z_y - logsumexp over the other classes, written out for 3 classes
    def margin(z):
        z_y = np.take_along_axis(z, np.broadcast_to(labels, z.shape[:2])[..., None], -1)[..., 0]
        total = np.log(np.sum(np.exp(z), -1))
        return z_y - np.log(np.exp(total) - np.exp(z_y))

    want = klom_from_margins(margin(u_logits), margin(o_logits))
    assert got.shape == (4,)
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(margin(u_logits), mia.logit_margins(u_logits, labels), atol=1e-9)


def test_klom_summary_by_hand():
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    forget = np.array([True, True, True, True, True, False, False])
    out = klom_summary(values, {"forget": forget, "test": [5, 6]}, percentiles=(50, 95))
    assert set(out) == {
        "klom/unlearned||oracle/forget/mean",
        "klom/unlearned||oracle/forget/p50",
        "klom/unlearned||oracle/forget/p95",
        "klom/unlearned||oracle/test/mean",
        "klom/unlearned||oracle/test/p50",
        "klom/unlearned||oracle/test/p95",
    }
    assert out["klom/unlearned||oracle/forget/mean"] == pytest.approx(2.0)
    assert out["klom/unlearned||oracle/forget/p50"] == pytest.approx(2.0)
    # linear: 0.95 * 4 = 3.8 -> 3 + 0.8 * 1
    assert out["klom/unlearned||oracle/forget/p95"] == pytest.approx(3.8)
    assert out["klom/unlearned||oracle/test/mean"] == pytest.approx(15.0)
    assert out["klom/unlearned||oracle/test/p95"] == pytest.approx(19.5)
    reverse = klom_summary(values, {"forget": forget}, direction="oracle||unlearned")
    assert set(reverse) == {
        "klom/oracle||unlearned/forget/mean",
        "klom/oracle||unlearned/forget/p50",
        "klom/oracle||unlearned/forget/p95",
        "klom/oracle||unlearned/forget/p99",
    }
    assert reverse["klom/oracle||unlearned/forget/p99"] == pytest.approx(3.96)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="share the example axis"):
        klom_from_margins(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        klom_from_margins(np.array([[np.nan]]), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="empty"):
        klom_from_margins(np.zeros((0, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="agree on examples and classes"):
        klom(np.zeros((2, 4, 3)), np.zeros((2, 4, 5)), np.zeros(4, int))
    with pytest.raises(ValueError, match="selects no examples"):
        klom_summary(np.ones(3), {"forget": np.zeros(3, bool)})
    with pytest.raises(ValueError, match="out of range"):
        klom_summary(np.ones(3), {"forget": [0, 3]})
    with pytest.raises(ValueError, match="mask has shape"):
        klom_summary(np.ones(3), {"forget": np.ones(4, bool)})
    with pytest.raises(ValueError, match="unknown direction 'oracle->unlearned'"):
        klom_from_margins(np.zeros((3, 1)), np.zeros((3, 1)), direction="oracle->unlearned")
    with pytest.raises(ValueError, match="unknown direction"):
        klom_summary(np.ones(3), {"forget": [0]}, direction="forward")
