"""Language-model metrics against hand computations, scipy and token-by-token loops."""

import doctest
import functools
import itertools
import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from unlearn_jax.core.task import Task, flax_task
from unlearn_jax.evaluation import lm

LN2 = math.log(2.0)
VOCAB = 11
EOS = 1


class TinyCausal(nn.Module):
    """Embeddings averaged over the prefix (causal), a tanh layer, logits: ``[B, T, V]``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(VOCAB, 8, name="embed")(x)
        h = jnp.cumsum(h, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
        h = jnp.tanh(nn.Dense(8, name="hidden")(h))
        return nn.Dense(VOCAB, name="out")(h)


@functools.cache
def tiny_model():
    # Parameters drawn with numpy (no jitted flax init to compile), with larger scales than a
    # default initialisation so that arg-max and Min-K% are not near ties.
    rng = np.random.default_rng(0)
    shapes = {
        "embed": {"embedding": (VOCAB, 8)},
        "hidden": {"kernel": (8, 8), "bias": (8,)},
        "out": {"kernel": (8, VOCAB), "bias": (VOCAB,)},
    }
    params = jax.tree_util.tree_map(
        lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )
    return flax_task(TinyCausal(), kind="sequence"), params


def numpy_forward(params, x):
    """TinyCausal in numpy (float64): the reference for the jitted model."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = p["embed"]["embedding"][np.asarray(x)]
    h = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)[None, :, None]
    h = np.tanh(h @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def tiny_batch():
    rng = np.random.default_rng(1)
    x = rng.integers(2, VOCAB, size=(5, 6)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    weights = np.zeros((5, 6), np.float32)
    for b, (start, stop) in enumerate([(2, 6), (1, 4), (3, 5), (0, 6), (4, 5)]):
        weights[b, start:stop] = 1.0
    return {"x": x, "y": y, "weights": weights}


def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---- likelihoods -------------------------------------------------------------------------------
def test_masked_sequence_log_prob_equals_token_loop():
    task, params = tiny_model()
    batch = tiny_batch()
    # batch_size 2: three chunks, the last padded.
    lp = lm.token_log_probs(task, params, batch, batch_size=2)
    got = lm.sequence_log_probs(lp, batch["weights"])
    expected = np.zeros(5)
    for t in range(6):  # the model on the prefix x[:, :t+1] only: also checks causality
        logits = numpy_forward(params, batch["x"][:, : t + 1])[:, -1]
        step = log_softmax(logits)[np.arange(5), batch["y"][:, t]]
        expected += batch["weights"][:, t] * step
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        lm.answer_mean_log_probs(task, params, batch, batch_size=2),
        expected / batch["weights"].sum(1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_likelihood_reductions_by_hand():
    lp = np.array([[-1.0, -2.0, -4.0], [-0.5, -0.5, -9.0]])
    w = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(lm.sequence_log_probs(lp, w), [-6.0, -1.0])
    np.testing.assert_allclose(lm.mean_log_probs(lp, w), [-3.0, -0.5])
    np.testing.assert_allclose(lm.normalized_probs(lp, w), np.exp([-3.0, -0.5]))
    with pytest.raises(ValueError, match="no answer token"):
        lm.mean_log_probs(lp, np.zeros_like(w))
    with pytest.raises(ValueError, match="shape"):
        lm.sequence_log_probs(lp, w[:, :2])


def test_next_token_moments_by_hand():
    # p = (1/2, 1/4, 1/4): log p = (-ln2, -2ln2, -2ln2), mu = -1.5 ln2, sigma = 0.5 ln2.
    logits = np.log([[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]]).astype(np.float32)

    @jax.jit  # one compilation instead of one per eager operation
    def moments_and_log_probs(logits, targets):
        mu, sigma = lm.next_token_moments(logits)
        return mu, sigma, lm.token_log_probs_from_logits(logits, targets)

    mu, sigma, lp = moments_and_log_probs(logits, np.array([[0, 1]]))
    np.testing.assert_allclose(mu, [[-1.5 * LN2] * 2], rtol=1e-6)
    np.testing.assert_allclose(sigma, [[0.5 * LN2] * 2], rtol=1e-5)
    np.testing.assert_allclose(lp, [[-LN2, -2 * LN2]], rtol=1e-6)
    # Standardised: token 0 at +1, token 1 at -1; Min-K%++ with k = 1/2 keeps the lowest, -1.
    score = lm.min_k_plus_plus_scores(lp, mu, sigma, np.ones((1, 2)), k=0.5)
    np.testing.assert_allclose(score, [-1.0], rtol=1e-5)
    np.testing.assert_allclose(
        lm.min_k_plus_plus_scores(lp, mu, sigma, np.ones((1, 2)), k=1.0), [0.0], atol=1e-5
    )


# ---- ROUGE-L -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prediction, reference, lcs, n_pred, n_ref",
    [
        ("the cat sat on the mat", "the cat sat on the mat", 6, 6, 6),
        ("the cat is on the mat", "the cat sat on the mat", 5, 6, 6),
        ("a b c d", "d c b a", 1, 4, 4),
        ("Ilse's Father.", "ilse s father", 3, 3, 3),  # case and punctuation ignored
        ("born in Korvath", "Ilse was born in 1962 in Korvath", 3, 3, 7),
        ("x y z", "a b", 0, 3, 2),
    ],
)
def test_rouge_l_by_hand(prediction, reference, lcs, n_pred, n_ref):
    score = lm.rouge_l(prediction, reference)
    precision, recall = lcs / n_pred, lcs / n_ref
    f1 = 0.0 if lcs == 0 else 2 * precision * recall / (precision + recall)
    assert score == pytest.approx((precision, recall, f1))


def test_rouge_l_empty_sides_and_batch():
    assert lm.rouge_l("", "a b") == (0.0, 0.0, 0.0)
    assert lm.rouge_l("a b", "!!") == (0.0, 0.0, 0.0)
    scores = lm.rouge_l_scores(["a b", "c"], ["a x b", "d"])
    np.testing.assert_allclose(scores["recall"], [2 / 3, 0.0])
    np.testing.assert_allclose(scores["precision"], [1.0, 0.0])
    with pytest.raises(ValueError, match="references"):
        lm.rouge_l_scores(["a"], [])


def test_lcs_length_against_brute_force():
    rng = np.random.default_rng(0)

    def brute(a, b):
        for size in range(min(len(a), len(b)), 0, -1):
            subs = set(itertools.combinations(b, size))
            if any(c in subs for c in itertools.combinations(a, size)):
                return size
        return 0

    for _ in range(40):
        a = rng.integers(0, 3, size=rng.integers(0, 7)).tolist()
        b = rng.integers(0, 3, size=rng.integers(0, 7)).tolist()
        assert lm.lcs_length(a, b) == brute(a, b)


# ---- TOFU --------------------------------------------------------------------------------------
def test_truth_ratio_by_hand():
    para = np.log([0.5, 0.2])
    pert = np.log([[0.25, 0.01], [0.2, 0.2]])
    # R_0 = sqrt(0.25 * 0.01) / 0.5 = 0.1, R_1 = 0.2 / 0.2 = 1.
    ratios = lm.truth_ratios(para, pert)
    np.testing.assert_allclose(ratios, [0.1, 1.0])
    assert lm.truth_ratio_score(ratios, "forget") == pytest.approx((0.1 + 1.0) / 2)
    assert lm.truth_ratio_score(ratios, "retain") == pytest.approx((0.9 + 0.0) / 2)
    assert lm.truth_ratio_score([4.0], "retain") == 0.0 and lm.truth_ratio_score(
        [4.0], "forget"
    ) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="split"):
        lm.truth_ratio_score(ratios, "test")
    with pytest.raises(ValueError, match=r"\[2, K\]"):
        lm.truth_ratios(para, pert[:1])


def test_choice_probs_by_hand():
    got = lm.choice_probs(np.log([0.5, 0.1]), np.log([[0.25, 0.25], [0.3, 0.6]]))
    np.testing.assert_allclose(got, [0.5, 0.1 / 1.0])


def test_forget_quality_is_scipys_ks_pvalue():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=30), rng.lognormal(0.5, size=25)
    assert lm.forget_quality(a, b) == scipy.stats.ks_2samp(a, b).pvalue
    # By hand: fully separated samples of 3 and 3: D = 1 and the exact two-sided p-value is
    # 2 / C(6, 3) = 0.1 (2 of the 20 equally likely orderings are as extreme).
    assert lm.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert lm.forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_harmonic_mean_and_model_utility():
    assert lm.harmonic_mean([0.5, 1.0, 0.25]) == pytest.approx(3 / (2 + 1 + 4))
    assert lm.harmonic_mean([0.5, 0.0]) == 0.0
    assert lm.model_utility({"a": 0.5, "b": 1.0, "c": 0.25}) == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match=r"'b': -1\.0"):
        lm.model_utility({"a": 0.5, "b": -1.0})


def test_tofu_metrics_composes_the_rules():
    forget = {"prob": [0.2, 0.4], "rouge_l/recall": [0.5, 0.0], "truth_ratio": [0.5, 4.0]}
    retain = {"prob": [0.9, 0.7], "rouge_l/recall": [1.0, 0.8], "truth_ratio": [0.2, 0.6]}
    control = {
        "prob": [0.1, 0.1],
        "choice_prob": [0.6, 0.8],
        "rouge_l/recall": [1.0, 1.0],
        "truth_ratio": [0.5, 0.5],
    }
    out = lm.tofu_metrics(forget, retain, control, oracle_forget_truth_ratios=[1.0, 2.0, 0.9])
    expected = {
        "forget/prob": 0.3,
        "forget/rouge_l": 0.25,
        "forget/truth_ratio": 0.375,  # mean(min(R, 1/R)) = (0.5 + 0.25) / 2
        "retain/prob": 0.8,
        "retain/rouge_l": 0.9,
        "retain/truth_ratio": 0.6,  # mean(1 - R) = (0.8 + 0.4) / 2
        "control/prob": 0.7,  # the choice-normalised probability
        "control/rouge_l": 1.0,
        "control/truth_ratio": 0.5,
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key
    six = [0.8, 0.9, 0.6, 0.7, 1.0, 0.5]
    assert out["model_utility"] == pytest.approx(6 / sum(1 / v for v in six))
    assert out["forget_quality"] == scipy.stats.ks_2samp([0.5, 4.0], [1.0, 2.0, 0.9]).pvalue
    with pytest.raises(ValueError, match="choice_prob"):
        lm.tofu_metrics(forget, retain, retain)


# ---- membership scores and MUSE ----------------------------------------------------------------
def test_min_k_on_a_planted_row():
    lp = np.array([[-0.1, -5.0, -0.2, -3.0, -0.05]])
    w = np.array([[0.0, 1.0, 1.0, 1.0, 1.0]])  # the -0.1 is prompt: never counted
    assert lm.min_k_scores(lp, w, k=0.5)[0] == pytest.approx(-4.0)  # 2 of 4 tokens: -5, -3
    assert lm.min_k_scores(lp, w, k=0.2)[0] == pytest.approx(-5.0)  # floor(0.8) -> at least 1
    assert lm.min_k_scores(lp, w, k=1.0)[0] == pytest.approx(-8.25 / 4)
    with pytest.raises(ValueError, match="k must lie"):
        lm.min_k_scores(lp, w, k=0.0)


def test_zlib_and_loss_scores():
    text = "abcabcabcabcabcabc"
    assert lm.zlib_length(text) == len(zlib.compress(text.encode()))
    lp = np.array([[-1.0, -3.0], [-0.5, -0.5]])
    w = np.ones((2, 2))
    np.testing.assert_allclose(lm.loss_scores(lp, w), [-2.0, -0.5])
    np.testing.assert_allclose(lm.zlib_scores(lp, w, [10, 5]), [-0.2, -0.1])
    with pytest.raises(ValueError, match="zlib_lengths"):
        lm.zlib_scores(lp, w, [10, 0])


def test_mia_auc_and_privleak():
    assert lm.mia_auc([0.9, 0.8], [0.1, 0.85]) == pytest.approx(3 / 4)
    # MUSE: PrivLeak = ((1 - A_u) - (1 - A_o)) / (1 - A_o).
    assert lm.privleak(0.9, 0.5) == pytest.approx((0.1 - 0.5) / 0.5)
    assert lm.privleak(0.3, 0.6) == pytest.approx((0.7 - 0.4) / 0.4)
    assert lm.privleak(0.6, 0.6) == 0.0
    assert lm.privleak(1.0, 0.5) == pytest.approx(-1.0)  # a model that still remembers
    with pytest.raises(ValueError, match="undefined"):
        lm.privleak(0.5, 1.0)
    out = lm.muse_metrics(
        verbmem_forget=[0.5, 1.0],
        knowmem_forget=[0.0],
        knowmem_retain=[1.0, 0.5],
        auc_unlearned=0.9,
        auc_oracle=0.5,
    )
    assert out == pytest.approx(
        {"verbmem/forget": 0.75, "knowmem/forget": 0.0, "knowmem/retain": 0.75, "privleak": -0.8}
    )


def test_lm_membership_scores_match_numpy():
    task, params = tiny_model()
    batch = tiny_batch()
    log_p = log_softmax(numpy_forward(params, batch["x"]))
    lp = np.take_along_axis(log_p, batch["y"][..., None], axis=-1)[..., 0]
    p = np.exp(log_p)
    mu = (p * log_p).sum(-1)
    sigma = np.sqrt((p * (log_p - mu[..., None]) ** 2).sum(-1))
    w = batch["weights"]
    got = lm.lm_membership_scores(
        task, params, batch, decode=lambda ids: " ".join(map(str, ids)), k=0.5, batch_size=4
    )
    lengths = [
        len(zlib.compress(" ".join(map(str, batch["y"][b][w[b] > 0])).encode())) for b in range(5)
    ]
    expected = {
        "loss": (w * lp).sum(1) / w.sum(1),
        "min_k": [
            np.sort(lp[b][w[b] > 0])[: max(1, int(0.5 * w[b].sum()))].mean() for b in range(5)
        ],
        "min_k++": [
            np.sort(((lp - mu) / sigma)[b][w[b] > 0])[: max(1, int(0.5 * w[b].sum()))].mean()
            for b in range(5)
        ],
        "zlib": (w * lp).sum(1) / w.sum(1) / np.array(lengths),
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


# ---- generation --------------------------------------------------------------------------------
def greedy_reference(params, prompt, max_new, eos):
    seq = list(prompt)
    out = []
    for _ in range(max_new):
        logits = numpy_forward(params, [seq])[0, -1]
        token = int(np.argmax(logits))
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


def test_greedy_decode_equals_a_python_loop_and_compiles_once():
    task, params = tiny_model()
    rng = np.random.default_rng(2)
    prompts = rng.integers(2, VOCAB, size=(5, 9)).astype(np.int32)
    lengths = np.array([1, 3, 2, 4, 3])
    got = lm.greedy_decode(
        task, params, prompts, lengths, max_new_tokens=5, eos_id=EOS, batch_size=2
    )
    assert got.shape == (5, 5) and got.dtype == np.int32
    for b in range(5):
        expected = greedy_reference(params, prompts[b, : lengths[b]], 5, EOS)
        expected += [0] * (5 - len(expected))  # pad after EOS
        assert got[b].tolist() == expected, b
    fn = lm._greedy_fn(task, 5)
    before = fn._cache_size()
    lm.greedy_decode(
        task, params, prompts[:2], lengths[:2], max_new_tokens=5, eos_id=3, batch_size=2
    )
    assert fn._cache_size() == before  # new rows and a new EOS id: no new compilation


@functools.cache  # one Task object: its compiled functions are shared by the tests
def counting_task():
    """A causal 'model' that predicts token (x_t + 1) mod V at every position."""

    def apply(params, x):
        del params
        return 10.0 * jax.nn.one_hot((x + 1) % VOCAB, VOCAB)

    return Task(apply=apply, kind="sequence")


def counting_decode(ids):
    """Token ids as text up to the EOS 9, padding 0 dropped."""
    return " ".join(str(t) for t in itertools.takewhile(lambda t: t != 9, ids) if t != 0)


def test_greedy_stops_at_eos_and_at_the_end_of_the_buffer():
    task = counting_task()
    prompts = np.array([[7, 5, 5, 5, 5, 5, 5], [2, 3, 0, 0, 0, 0, 4]], np.int32)
    got = lm.greedy_decode(task, None, prompts, np.array([1, 6]), max_new_tokens=6, eos_id=9)
    # Row 0: 8, 9 (EOS), then padding (the 5s past the prompt's length are ignored). Row 1
    # (length 6 in width 7): one token fits, after the 0 at position 5: 0 + 1 = 1.
    assert got.tolist() == [[8, 9, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]


def test_generate_answers_prompts_and_references():
    task = counting_task()
    decode = counting_decode
    # Row 0: prompt 1 2 3, answer 4 5 6 EOS; counting goes on past 6 (7, then the buffer ends).
    x = np.array([[1, 2, 3, 4, 5, 6, 0], [5, 6, 7, 0, 0, 0, 0]], np.int32)
    y = np.array([[2, 3, 4, 5, 6, 9, 0], [6, 7, 9, 0, 0, 0, 0]], np.int32)
    w = np.array([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]], np.float32)
    batch = {"x": x, "y": y, "weights": w}
    preds, refs = lm.generate_answers(task, None, batch, decode=decode, eos_id=9)
    assert refs == ["4 5 6", "7"]
    assert preds == ["4 5 6 7", "7 8"]  # counting up to the buffer's end, or to the EOS 9
    preds, refs = lm.generate_answers(task, None, batch, decode=decode, eos_id=9, answer_prefix=1)
    assert refs == ["5 6", ""] and preds == ["5 6 7", "8"]
    with pytest.raises(ValueError, match="nothing to generate"):
        lm.generate_answers(task, None, batch, decode=decode, eos_id=9, answer_prefix=2)
    assert lm.answer_texts(batch, decode=decode) == ["4 5 6", "7"]


def test_qa_statistics_on_a_perfect_counter():
    task = counting_task()
    decode = counting_decode
    # Width 7 like the other counting tests: the compiled generation is shared.
    x = np.array([[1, 2, 3, 4, 0, 0, 0]], np.int32)
    w = np.array([[0, 0, 1, 1, 0, 0, 0]], np.float32)
    qa = {"x": x, "y": np.array([[2, 3, 4, 5, 0, 0, 0]], np.int32), "weights": w}  # "4 5"
    para = {"x": x, "y": np.array([[2, 3, 4, 7, 0, 0, 0]], np.int32), "weights": w}  # 7 wrong
    pert = [{"x": x, "y": np.array([[2, 3, 6, 7, 0, 0, 0]], np.int32), "weights": w}]
    stats = lm.qa_statistics(
        task, None, qa, decode=decode, eos_id=9, paraphrased_answer=para, perturbed=pert
    )
    # log p(right) = 10 - log(e^10 + 10) = -a, log p(wrong) = -10 - a, a = log(1 + 10 e^-10).
    a = math.log1p(10 * math.exp(-10))
    assert stats["mean_log_prob"][0] == pytest.approx(-a, abs=1e-6)  # float32 logits
    assert stats["truth_ratio"][0] == pytest.approx(math.exp((-10 - a) - (-5 - a)))
    assert stats["choice_prob"][0] == pytest.approx(1 / (1 + math.exp(-10)))
    # The greedy answer "4 5 6 7" (counting to the buffer's end) contains the reference "4 5".
    assert stats["rouge_l/recall"][0] == 1.0 and stats["rouge_l/f1"][0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="both"):
        lm.qa_statistics(task, None, qa, decode=decode, eos_id=9, paraphrased_answer=para)


def test_bad_inputs():
    task, params = tiny_model()
    with pytest.raises(ValueError, match="'weights'"):
        lm.token_log_probs(task, params, {"x": np.zeros((1, 3), int), "y": np.zeros((1, 3), int)})
    with pytest.raises(ValueError, match="sequence task"):
        lm.token_log_probs(Task(apply=lambda p, x: x), params, tiny_batch())
    with pytest.raises(ValueError, match="prompt_lengths"):
        lm.greedy_decode(task, params, np.zeros((2, 3), int), np.array([0, 1]), max_new_tokens=1)


def test_docstring_examples_run():
    result = doctest.testmod(lm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
