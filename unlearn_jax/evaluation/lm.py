r"""Language-model unlearning metrics: answer likelihoods, greedy answers, ROUGE-L, TOFU, MUSE, MIAs.

Sequences follow :mod:`unlearn_jax.core.task`: a batch holds input tokens ``x [B, T]``, next-token
targets ``y [B, T]`` and token ``weights [B, T]``, 1 on the answer tokens (and the final EOS) of a
question-answer pair, 0 on prompt and padding (:func:`unlearn_jax.data.facts.encode_qa` builds
them). With :math:`\ell_t = \log p_\theta(y_t \mid x_{\le t})`:

* answer log-likelihood :math:`\log P(a|q) = \sum_t w_t \ell_t`; length-normalised
  :math:`\bar\ell = \sum_t w_t \ell_t / \sum_t w_t` and probability :math:`P(a|q)^{1/|a|} =
  e^{\bar\ell}` (TOFU's "probability");
* truth ratio (TOFU): :math:`R = e^{\frac1K\sum_k \bar\ell(\hat a_k)} / e^{\bar\ell(\tilde a)}`
  with :math:`\hat a_k` the perturbed and :math:`\tilde a` the paraphrased answer;
* forget quality (TOFU): the p-value of the two-sample Kolmogorov-Smirnov test between the truth
  ratios of the unlearned model and of the retain-only oracle on the forget set;
* model utility (TOFU): the harmonic mean of probability, ROUGE-L recall and truth-ratio score on
  the retain and the control (world-facts) sets;
* MUSE: verbatim memorisation (ROUGE-L F1 of continuations of forget text given a prefix),
  knowledge memorisation (ROUGE-L F1 of answers), PrivLeak (the forget-vs-holdout MIA AUC relative
  to the oracle's);
* membership scores (larger = more member-like, for :func:`unlearn_jax.evaluation.roc_auc`): LOSS,
  zlib, Min-K% and Min-K%++ on the answer tokens.

Pure functions take numpy/JAX arrays (host statistics in float64); the model wrappers take
``(task, params, batch)``, evaluate in jitted chunks of ``batch_size`` rows (the last chunk padded
with copies of the last row, so each function is traced once per task and shape) and return numpy.
The evaluation layer knows no tokenizer: wrappers that produce text take ``decode(ids) -> str``
(e.g. ``Tokenizer.decode``) and the ``eos_id``.

References:
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024.
  Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024.
  Carlini et al., "Extracting Training Data from Large Language Models", 2021 (zlib).
  Shi et al., "Detecting Pretraining Data from Large Language Models", 2024 (Min-K%).
  Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from LLMs", 2024.
  Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004 (ROUGE-L).
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from unlearn_jax import _validate
from unlearn_jax.evaluation import _arrays
from unlearn_jax.evaluation.mia import roc_auc

Decode = Callable[[Sequence[int]], str]

# Keeps Min-K%++ finite where the model's next-token distribution is (numerically) a point mass.
_MIN_STD = 1e-12


# ---------------------------------------------------------------------------------------------------
# Per-token quantities from logits (JAX, jittable)
# ---------------------------------------------------------------------------------------------------
def token_log_probs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    r"""Log-probabilities of the targets: :math:`\ell_{bt} = \log\mathrm{softmax}(z_{bt})_{y_{bt}}`.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` integer token ids in ``[0, V)``.

    Returns:
      ``[B, T]`` in the logits' float dtype.
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def next_token_moments(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Mean and standard deviation of :math:`\log p(z)` under :math:`z \sim p = \mathrm{softmax}`:

    .. math:: \mu = \sum_v p_v \log p_v, \qquad \sigma = \sqrt{\textstyle\sum_v p_v (\log p_v - \mu)^2}

    at every position (Min-K%++'s calibration; :math:`-\mu` is the entropy).

    Args:
      logits: ``[B, T, V]``.

    Returns:
      ``(mu, sigma)``, each ``[B, T]``.
    """
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    mu = jnp.sum(p * log_p, axis=-1)
    sigma = jnp.sqrt(jnp.sum(p * jnp.square(log_p - mu[..., None]), axis=-1))
    return mu, sigma


# ---------------------------------------------------------------------------------------------------
# Answer likelihoods (host)
# ---------------------------------------------------------------------------------------------------
def _token_arrays(token_log_probs: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
    lp = _arrays.float_array(token_log_probs, "token_log_probs", ndim=2)
    w = _arrays.float_array(weights, "weights", ndim=2)
    if w.shape != lp.shape:
        raise ValueError(
            f"weights must have the shape of token_log_probs {lp.shape}, got {w.shape}."
        )
    if np.any(w < 0):
        raise ValueError("weights must be >= 0 (1 on answer tokens, 0 elsewhere).")
    return lp, w


def sequence_log_probs(token_log_probs: Any, weights: Any) -> np.ndarray:
    r"""Answer log-likelihoods :math:`\log P(a|q) = \sum_t w_t \ell_t`.

    Args:
      token_log_probs: ``[B, T]`` :math:`\ell_t`. weights: ``[B, T]`` token weights ``>= 0``.

    Returns:
      ``[B]`` float64.
    """
    lp, w = _token_arrays(token_log_probs, weights)
    return np.sum(w * lp, axis=1)


def mean_log_probs(token_log_probs: Any, weights: Any) -> np.ndarray:
    r"""Length-normalised answer log-likelihoods :math:`\bar\ell = \sum_t w_t \ell_t / \sum_t w_t`.

    Args:
      token_log_probs: ``[B, T]``. weights: ``[B, T]``, each row with a positive sum.

    Returns:
      ``[B]`` float64; ``exp`` of it is TOFU's probability :math:`P(a|q)^{1/|a|}`.

    Raises:
      ValueError: if a row's weights sum to 0 (no answer token).
    """
    lp, w = _token_arrays(token_log_probs, weights)
    total = w.sum(axis=1)
    if np.any(total <= 0):
        raise ValueError(
            f"rows {_arrays.describe(np.flatnonzero(total <= 0))} have no answer token "
            "(weights sum to 0); a length-normalised likelihood needs at least one."
        )
    return np.sum(w * lp, axis=1) / total


def normalized_probs(token_log_probs: Any, weights: Any) -> np.ndarray:
    r"""TOFU's probability :math:`P(a|q)^{1/|a|} = e^{\bar\ell}`, ``[B]`` in ``[0, 1]``."""
    return np.exp(mean_log_probs(token_log_probs, weights))


def choice_probs(correct_mean_log_probs: Any, wrong_mean_log_probs: Any) -> np.ndarray:
    r"""TOFU's probability on multiple-choice sets (real authors, world facts):

    .. math:: \frac{P(a|q)^{1/|a|}}{P(a|q)^{1/|a|} + \sum_k P(\hat a_k|q)^{1/|\hat a_k|}}

    Args:
      correct_mean_log_probs: ``[N]`` :math:`\bar\ell` of the correct answers.
      wrong_mean_log_probs: ``[N, K]`` :math:`\bar\ell` of the wrong (perturbed) answers.

    Returns:
      ``[N]`` in ``(0, 1)``.
    """
    correct = _arrays.float_array(correct_mean_log_probs, "correct_mean_log_probs", ndim=1)
    wrong = _wrong_matrix(wrong_mean_log_probs, correct.shape[0], "wrong_mean_log_probs")
    both = np.concatenate([correct[:, None], wrong], axis=1)
    return np.exp(correct - _arrays.logsumexp(both, axis=1))


def _wrong_matrix(values: Any, n: int, name: str) -> np.ndarray:
    arr = _arrays.float_array(values, name, ndim=2)
    if arr.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}, K], got {arr.shape}.")
    return arr


# ---------------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------------
class RougeL(NamedTuple):
    """ROUGE-L of one prediction against one reference: LCS-based precision, recall and F1."""

    precision: float
    recall: float
    f1: float


def rouge_words(text: str) -> list[str]:
    """The words ROUGE compares: lower-cased runs of ASCII letters and digits (``rouge_score``'s
    tokenisation, without stemming).

    Examples:
      >>> rouge_words("Ilse's father was a Baker, in 1962!")
      ['ilse', 's', 'father', 'was', 'a', 'baker', 'in', '1962']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The length of the longest common subsequence of ``a`` and ``b`` (dynamic programming,
    ``O(|a| |b|)`` time, ``O(|b|)`` memory)."""
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> RougeL:
    r"""ROUGE-L on words: with :math:`L = \mathrm{LCS}(\text{prediction}, \text{reference})`,

    .. math:: P = L / |\text{prediction}|, \quad R = L / |\text{reference}|, \quad F_1 = 2PR/(P+R)

    (0 when a side has no words or nothing matches). TOFU reports the recall, MUSE the F1.

    Examples:
      >>> rouge_l("Ilse was born in Korvath", "Ilse Dunmere was born in Korvath.")
      RougeL(precision=1.0, recall=0.8333333333333334, f1=0.9090909090909091)
    """
    pred, ref = rouge_words(prediction), rouge_words(reference)
    if not pred or not ref:
        return RougeL(0.0, 0.0, 0.0)
    common = lcs_length(pred, ref)
    if common == 0:
        return RougeL(0.0, 0.0, 0.0)
    precision, recall = common / len(pred), common / len(ref)
    return RougeL(precision, recall, 2 * precision * recall / (precision + recall))


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """:func:`rouge_l` of each prediction against its reference.

    Returns:
      ``{"precision": [N], "recall": [N], "f1": [N]}`` float64.

    Raises:
      ValueError: if the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references.")
    scores = np.array([rouge_l(p, r) for p, r in zip(predictions, references, strict=True)])
    scores = scores.reshape(len(predictions), 3)
    return {"precision": scores[:, 0], "recall": scores[:, 1], "f1": scores[:, 2]}


# ---------------------------------------------------------------------------------------------------
# TOFU: truth ratio, forget quality, model utility
# ---------------------------------------------------------------------------------------------------
def truth_ratios(paraphrased_mean_log_probs: Any, perturbed_mean_log_probs: Any) -> np.ndarray:
    r"""TOFU's truth ratio of each question:

    .. math:: R = \frac{\left(\prod_{k=1}^K P(\hat a_k|q)^{1/|\hat a_k|}\right)^{1/K}}
                       {P(\tilde a|q)^{1/|\tilde a|}}
              = \exp\Big(\frac1K \sum_k \bar\ell(\hat a_k) - \bar\ell(\tilde a)\Big)

    (perturbed over paraphrased; a model that knows the fact has :math:`R \ll 1`, one that does
    not tell them apart :math:`R \approx 1`).

    Args:
      paraphrased_mean_log_probs: ``[N]`` :math:`\bar\ell(\tilde a)` (:func:`mean_log_probs`).
      perturbed_mean_log_probs: ``[N, K]`` :math:`\bar\ell(\hat a_k)`.

    Returns:
      ``[N]`` float64, positive.
    """
    para = _arrays.float_array(paraphrased_mean_log_probs, "paraphrased_mean_log_probs", ndim=1)
    pert = _wrong_matrix(perturbed_mean_log_probs, para.shape[0], "perturbed_mean_log_probs")
    return np.exp(pert.mean(axis=1) - para)


def truth_ratio_score(ratios: Any, split: str) -> float:
    r"""TOFU's summary of truth ratios, larger is better.

    * ``split="forget"``: :math:`\mathrm{mean}\,\min(R, 1/R)` (best when the model no longer
      prefers the true answer, :math:`R \approx 1`);
    * ``split="retain"`` (retain, real authors, world facts): :math:`\mathrm{mean}\max(0, 1 - R)`.

    Raises:
      ValueError: for another ``split`` or non-positive ratios.
    """
    _validate.one_of("truth ratio split", split, ("forget", "retain"))
    r = _arrays.float_array(ratios, "ratios", ndim=1)
    if np.any(r <= 0):
        raise ValueError("truth ratios must be > 0.")
    if split == "forget":
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(ratios: Any, oracle_ratios: Any) -> float:
    """TOFU's forget quality: the p-value of the two-sample Kolmogorov-Smirnov test
    (``scipy.stats.ks_2samp``, two-sided) between the forget-set truth ratios of the unlearned model
    and those of the retain-only oracle. High (near 1) means indistinguishable from the oracle.

    Args:
      ratios: ``[N]`` truth ratios of the unlearned model on the forget set.
      oracle_ratios: ``[M]`` truth ratios of the oracle on the same questions.

    Returns:
      The p-value in ``[0, 1]``.
    """
    r = _arrays.float_array(ratios, "ratios", ndim=1)
    o = _arrays.float_array(oracle_ratios, "oracle_ratios", ndim=1)
    return float(scipy.stats.ks_2samp(r, o).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    r""":math:`n / \sum_i 1/v_i` of values ``>= 0``; 0 if any value is 0 (``scipy.stats.hmean``'s
    convention).

    Raises:
      ValueError: if there are no values or one is negative or not finite.
    """
    v = _arrays.float_array(list(values), "values", ndim=1)
    if np.any(v < 0):
        raise ValueError(f"a harmonic mean needs values >= 0, got {_arrays.describe(v)}.")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def model_utility(values: Mapping[str, float]) -> float:
    """TOFU's model utility: the harmonic mean of the named utility values.

    TOFU takes nine: probability, ROUGE-L recall and truth-ratio score (``max(0, 1 - R)``) on the
    retain set, real authors and world facts; :func:`tofu_metrics` passes the six of the retain and
    control sets.

    Raises:
      ValueError: as :func:`harmonic_mean`, naming the values.
    """
    if not isinstance(values, Mapping) or not values:
        raise ValueError(f"values must be a non-empty mapping name -> value, got {values!r}.")
    bad = {k: v for k, v in values.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"utility values must be finite and >= 0, got {bad}.")
    return harmonic_mean(list(values.values()))


def tofu_metrics(
    forget: Mapping[str, Any],
    retain: Mapping[str, Any],
    control: Mapping[str, Any],
    *,
    oracle_forget_truth_ratios: Any = None,
) -> dict[str, float]:
    """TOFU's table from per-example statistics (:func:`qa_statistics` of each set).

    Keys::

      forget/prob, forget/rouge_l, forget/truth_ratio    mean P^(1/|a|), mean ROUGE-L recall,
                                                         mean min(R, 1/R)
      retain/prob, retain/rouge_l, retain/truth_ratio    ..., mean max(0, 1 - R)
      control/prob, control/rouge_l, control/truth_ratio control/prob is the choice-normalised one
      model_utility                                      harmonic mean of the six retain/control values
      forget_quality                                     KS p-value vs the oracle (if its ratios given)

    Args:
      forget, retain, control: per-example statistics with ``"prob"``, ``"rouge_l/recall"``,
        ``"truth_ratio"`` (and ``"choice_prob"`` for ``control``).
      oracle_forget_truth_ratios: ``[M]`` the retain-only oracle's forget-set truth ratios.

    Raises:
      ValueError: if a statistic is missing (the message names it).
    """
    sets = {"forget": forget, "retain": retain, "control": control}
    for name, stats in sets.items():
        needed = ["prob", "rouge_l/recall", "truth_ratio"] + (["choice_prob"] * (name == "control"))
        missing = [k for k in needed if k not in stats]
        if missing:
            raise ValueError(
                f"{name} statistics lack {missing}; compute them with qa_statistics(..., "
                "paraphrased_answer=..., perturbed=...)."
            )
    out = {}
    for name, stats in sets.items():
        prob = stats["choice_prob"] if name == "control" else stats["prob"]
        out[f"{name}/prob"] = float(np.mean(prob))
        out[f"{name}/rouge_l"] = float(np.mean(stats["rouge_l/recall"]))
        split = "forget" if name == "forget" else "retain"
        out[f"{name}/truth_ratio"] = truth_ratio_score(stats["truth_ratio"], split)
    out["model_utility"] = model_utility(
        {k: v for k, v in out.items() if k.split("/")[0] in ("retain", "control")}
    )
    if oracle_forget_truth_ratios is not None:
        out["forget_quality"] = forget_quality(forget["truth_ratio"], oracle_forget_truth_ratios)
    return out


# ---------------------------------------------------------------------------------------------------
# Membership inference scores (larger = more member-like)
# ---------------------------------------------------------------------------------------------------
def zlib_length(text: str | bytes) -> int:
    """The zlib entropy of a text: ``len(zlib.compress(utf8 bytes))`` (default level)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return len(zlib.compress(data))


def loss_scores(token_log_probs: Any, weights: Any) -> np.ndarray:
    r"""The LOSS attack: :math:`\bar\ell`, minus the mean answer-token loss, ``[B]``."""
    return mean_log_probs(token_log_probs, weights)


def zlib_scores(token_log_probs: Any, weights: Any, zlib_lengths: Any) -> np.ndarray:
    r"""The zlib attack (Carlini et al.): the loss calibrated by the text's zlib entropy,
    :math:`\bar\ell / \mathrm{zlib}(a)` (MUSE's ``PPL/zlib`` with the sign flipped so that larger
    is more member-like).

    Args:
      token_log_probs, weights: ``[B, T]``.
      zlib_lengths: ``[B]`` :func:`zlib_length` of each answer's text, > 0.
    """
    lengths = _arrays.float_array(zlib_lengths, "zlib_lengths", ndim=1)
    scores = mean_log_probs(token_log_probs, weights)
    if lengths.shape != scores.shape or np.any(lengths <= 0):
        raise ValueError(f"zlib_lengths must be [{scores.shape[0]}] positive, got {lengths.shape}.")
    return scores / lengths


def _lowest_k_mean(values: np.ndarray, weights: np.ndarray, k: float) -> np.ndarray:
    """Per row: the mean of the ``max(1, floor(k n))`` smallest values among the ``n`` tokens with
    weight > 0 (the reference code's ``int(n * k)``, never empty)."""
    _validate.in_interval("k", k, 0.0, 1.0, closed="right")
    out = np.empty(values.shape[0], np.float64)
    for i in range(values.shape[0]):
        tokens = np.sort(values[i][weights[i] > 0])
        if tokens.size == 0:
            raise ValueError(f"row {i} has no token with weight > 0.")
        count = max(1, math.floor(round(k * tokens.size, 9)))
        out[i] = tokens[:count].mean()
    return out


def min_k_scores(token_log_probs: Any, weights: Any, k: float = 0.2) -> np.ndarray:
    r"""Min-K% Prob (Shi et al.): the mean of the :math:`k` fraction of lowest :math:`\ell_t` over
    the answer tokens (those with weight > 0), at least one token.

    Args:
      token_log_probs, weights: ``[B, T]``.
      k: the fraction of tokens, in ``(0, 1]``.

    Returns:
      ``[B]`` float64.
    """
    lp, w = _token_arrays(token_log_probs, weights)
    return _lowest_k_mean(lp, w, k)


def min_k_plus_plus_scores(
    token_log_probs: Any, mu: Any, sigma: Any, weights: Any, k: float = 0.2
) -> np.ndarray:
    r"""Min-K%++ (Zhang et al.): each token's log-probability standardised under the model's own
    next-token distribution, then Min-K% of those:

    .. math:: s_t = \frac{\ell_t - \mu_t}{\sigma_t}, \qquad
              \mu_t = \mathbb E_{z \sim p(\cdot|x_{<t})} \log p(z|x_{<t}), \quad
              \sigma_t^2 = \mathrm{Var}_{z \sim p(\cdot|x_{<t})} \log p(z|x_{<t})

    (:func:`next_token_moments`); :math:`\sigma_t` is floored at 1e-12.

    Args:
      token_log_probs, mu, sigma, weights: ``[B, T]``.
      k: the fraction of tokens, in ``(0, 1]``.

    Returns:
      ``[B]`` float64.
    """
    lp, w = _token_arrays(token_log_probs, weights)
    mu = _arrays.float_array(mu, "mu", ndim=2)
    sigma = _arrays.float_array(sigma, "sigma", ndim=2)
    if mu.shape != lp.shape or sigma.shape != lp.shape:
        raise ValueError(
            f"mu and sigma must have the shape of token_log_probs {lp.shape}, got {mu.shape} and "
            f"{sigma.shape}."
        )
    return _lowest_k_mean((lp - mu) / np.maximum(sigma, _MIN_STD), w, k)


def mia_auc(forget_scores: Any, holdout_scores: Any) -> float:
    """The AUC of telling forget (members, label 1) from holdout (label 0) examples by a membership
    score (larger = more member-like): 1 = the forget set is perfectly recognised, 0.5 = chance."""
    f = _arrays.float_array(forget_scores, "forget_scores", ndim=1)
    h = _arrays.float_array(holdout_scores, "holdout_scores", ndim=1)
    labels = np.r_[np.ones(f.size, bool), np.zeros(h.size, bool)]
    return roc_auc(np.r_[f, h], labels)


def privleak(auc_unlearned: float, auc_oracle: float) -> float:
    r"""MUSE's PrivLeak: the relative gap of the forget-vs-holdout MIA AUC to the oracle's.

    MUSE reports the AUC with members ranked *below* non-members, :math:`A' = 1 - A` for the
    :func:`mia_auc` :math:`A`; so

    .. math:: \mathrm{PrivLeak} = \frac{A'_{\rm unlearn} - A'_{\rm oracle}}{A'_{\rm oracle}}
              = \frac{A_{\rm oracle} - A_{\rm unlearn}}{1 - A_{\rm oracle}}

    0 for the oracle, near -1 for a model that still recognises the forget set (under-unlearning;
    MUSE's target models score about -100%), positive for over-unlearning. A fraction: MUSE's
    tables print 100 times it.

    Raises:
      ValueError: if an AUC is outside ``[0, 1]`` or the oracle's is 1 (no reference).
    """
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_oracle", auc_oracle)):
        _validate.in_interval(name, value, 0.0, 1.0, closed="both")
    if auc_oracle >= 1.0:
        raise ValueError(
            "auc_oracle=1 leaves MUSE's 1 - AUC reference at 0; PrivLeak is undefined."
        )
    return float((auc_oracle - auc_unlearned) / (1.0 - auc_oracle))


def muse_metrics(
    *,
    verbmem_forget: Any,
    knowmem_forget: Any,
    knowmem_retain: Any,
    auc_unlearned: float,
    auc_oracle: float,
) -> dict[str, float]:
    """MUSE's table from per-example ROUGE-L F1 values and forget-vs-holdout MIA AUCs.

    Keys: ``verbmem/forget``, ``knowmem/forget``, ``knowmem/retain`` (means of the given values) and
    ``privleak`` (:func:`privleak`, a fraction).
    """
    out = {
        "verbmem/forget": verbmem_forget,
        "knowmem/forget": knowmem_forget,
        "knowmem/retain": knowmem_retain,
    }
    out = {k: float(np.mean(_arrays.float_array(v, k, ndim=1))) for k, v in out.items()}
    out["privleak"] = privleak(auc_unlearned, auc_oracle)
    return out


# ---------------------------------------------------------------------------------------------------
# Model wrappers: (task, params, batch)
# ---------------------------------------------------------------------------------------------------
def _sequence_batch(batch: Any, name: str = "batch") -> dict[str, np.ndarray]:
    """``{"x", "y", "weights"}`` host arrays of a sequence batch (a mapping or a Dataset)."""
    if hasattr(batch, "as_batch"):
        batch = batch.as_batch()
    if not isinstance(batch, Mapping) or any(k not in batch for k in ("x", "y", "weights")):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"{name} must be a sequence batch with 'x', 'y' and 'weights' [B, T] (or a sequence "
            f"Dataset), got {keys}."
        )
    out = {k: np.asarray(batch[k]) for k in ("x", "y", "weights")}
    shapes = {k: v.shape for k, v in out.items()}
    if out["x"].ndim != 2 or len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: x, y and weights must all be [B, T], got {shapes}.")
    for key in ("x", "y"):
        if not np.issubdtype(out[key].dtype, np.integer):
            raise ValueError(f"{name}: {key} must hold integer tokens, got dtype {out[key].dtype}.")
    if out["x"].shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    return out


def _check_task(task: Any) -> None:
    if getattr(task, "kind", None) != "sequence":
        raise ValueError(
            f"these metrics need a sequence task (Task kind 'sequence'), got "
            f"{getattr(task, 'kind', type(task).__name__)!r}."
        )


def _chunked(fn: Callable, params: Any, arrays: Mapping[str, np.ndarray], batch_size: int) -> dict:
    """``fn(params, chunk)`` over chunks of exactly ``batch_size`` rows (the last padded with
    copies of the last row, so sets of any size share one compilation); outputs concatenated, as
    numpy."""
    _validate.positive_int(batch_size=batch_size)
    n = next(iter(arrays.values())).shape[0]
    parts = []
    for start in range(0, n, batch_size):
        valid = min(batch_size, n - start)
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        out = fn(params, {k: v[rows] for k, v in arrays.items()})
        parts.append({k: np.asarray(v)[:valid] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _cached(factory: Callable, task: Any, *args: Any) -> Callable:
    """``factory(task, *args)``, cached per task so that nothing is traced twice; an unhashable
    task gets a fresh (uncached) function."""
    try:
        return _cached_factory(factory, task, *args)
    except TypeError:
        return factory(task, *args)


@functools.lru_cache(maxsize=64)
def _cached_factory(factory: Callable, task: Any, *args: Any) -> Callable:
    return factory(task, *args)


def _token_fn(task: Any, moments: bool) -> Callable:
    return _cached(_make_token_fn, task, moments)


def _make_token_fn(task: Any, moments: bool) -> Callable:
    def stats(params, chunk):
        logits = task.apply(params, chunk["x"])
        out = {"log_probs": token_log_probs_from_logits(logits, chunk["y"])}
        if moments:
            out["mu"], out["sigma"] = next_token_moments(logits)
        return out

    return jax.jit(stats)


def token_log_probs(task: Any, params: Any, batch: Any, *, batch_size: int = 64) -> np.ndarray:
    r"""Per-token target log-probabilities :math:`\ell_{bt} = \log p_\theta(y_{bt}|x_{b,\le t})`.

    Args:
      task: a sequence :class:`unlearn_jax.Task` (``apply(params, x [B, T]) -> [B, T, V]``).
      params: the model parameters.
      batch: ``{"x", "y", "weights"}`` ``[B, T]`` or a sequence Dataset.
      batch_size: rows per jitted chunk.

    Returns:
      ``[B, T]`` float32 (every position; weight them with ``batch["weights"]``).
    """
    _check_task(task)
    arrays = _sequence_batch(batch)
    return _chunked(
        _token_fn(task, False), params, {"x": arrays["x"], "y": arrays["y"]}, batch_size
    )["log_probs"]


def token_statistics(
    task: Any, params: Any, batch: Any, *, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """:func:`token_log_probs` and :func:`next_token_moments` in one pass.

    Returns:
      ``{"log_probs", "mu", "sigma"}``, each ``[B, T]`` float32.
    """
    _check_task(task)
    arrays = _sequence_batch(batch)
    return _chunked(_token_fn(task, True), params, {"x": arrays["x"], "y": arrays["y"]}, batch_size)


def answer_mean_log_probs(
    task: Any, params: Any, batch: Any, *, batch_size: int = 64
) -> np.ndarray:
    r""":func:`mean_log_probs` of the model on a batch: :math:`\bar\ell` ``[B]`` float64."""
    arrays = _sequence_batch(batch)
    lp = token_log_probs(task, params, arrays, batch_size=batch_size)
    return mean_log_probs(lp, arrays["weights"])


def _greedy_fn(task: Any, max_new_tokens: int) -> Callable:
    return _cached(_make_greedy_fn, task, max_new_tokens)


def _make_greedy_fn(task: Any, max_new_tokens: int) -> Callable:
    def generate(params, chunk):
        tokens, lengths = chunk["tokens"], chunk["lengths"]
        eos_id, pad_id = chunk["eos_id"][0], chunk["pad_id"][0]
        rows = jnp.arange(tokens.shape[0])
        width = tokens.shape[1]

        def step(carry):
            s, tokens, done, out = carry
            pos = lengths + s  # where the new token goes
            fits = pos < width
            # No KV cache: the whole buffer again; positions after `pos` do not reach a causal
            # model's prediction at `pos - 1`.
            logits = task.apply(params, tokens)
            logits_here = logits[rows, jnp.clip(pos - 1, 0, width - 1)]
            new = jnp.argmax(logits_here, axis=-1).astype(tokens.dtype)
            active = fits & ~done
            new = jnp.where(active, new, pad_id)
            at = jnp.clip(pos, 0, width - 1)
            tokens = tokens.at[rows, at].set(jnp.where(active, new, tokens[rows, at]))
            done = done | ~fits | (active & (new == eos_id))
            return s + 1, tokens, done, out.at[:, s].set(new)

        def more(carry):
            s, _, done, _ = carry
            return (s < max_new_tokens) & ~jnp.all(done)  # stop once every row is done

        out = jnp.full((tokens.shape[0], max_new_tokens), pad_id, tokens.dtype)
        done = jnp.zeros(tokens.shape[0], bool)
        _, _, _, out = jax.lax.while_loop(more, step, (jnp.int32(0), tokens, done, out))
        return {"generated": out}

    return jax.jit(generate)


def greedy_decode(
    task: Any,
    params: Any,
    prompts: Any,
    prompt_lengths: Any,
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_size: int = 64,
) -> np.ndarray:
    """Greedy (arg-max) continuations of right-padded prompts, jitted with fixed shapes.

    Row ``b`` starts from ``prompts[b, :prompt_lengths[b]]`` in a buffer of the prompts' width
    ``W``; step ``s`` runs the model on the whole buffer (no KV cache: fine for small models),
    takes the arg-max of the logits at position ``len_b + s - 1`` and writes it at ``len_b + s``.
    A row stops after emitting ``eos_id`` or when its buffer is full; later entries are ``pad_id``.
    The loop (``lax.while_loop``) ends when every row of a chunk has stopped.
    The model must be causal (position ``t``'s logits depend on tokens ``<= t`` only).

    Args:
      task: a sequence task. params: the parameters.
      prompts: ``[B, W]`` integer tokens (entries from ``prompt_lengths[b]`` on are ignored).
      prompt_lengths: ``[B]`` integers in ``[1, W]``.
      max_new_tokens: tokens to generate per row, >= 1 (static: one compilation per value).
      eos_id: the end-of-sequence token, or None to never stop early.
      pad_id: the token written after a row stops.
      batch_size: rows per jitted chunk.

    Returns:
      ``[B, max_new_tokens]`` int32 generated tokens (the EOS included).

    Raises:
      ValueError: on shapes or lengths outside the ranges above.
    """
    _check_task(task)
    _validate.positive_int(max_new_tokens=max_new_tokens)
    tokens = np.asarray(prompts)
    lengths = np.asarray(prompt_lengths)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"prompts must be integer tokens [B, W], got {tokens.dtype} {tokens.shape}."
        )
    width = tokens.shape[1]
    if lengths.shape != (tokens.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(
            f"prompt_lengths must be integers [{tokens.shape[0]}], got {lengths.shape}."
        )
    if np.any(lengths < 1) or np.any(lengths > width):
        raise ValueError(
            f"prompt_lengths must lie in [1, {width}], got {_arrays.describe(lengths)}."
        )
    n = tokens.shape[0]
    positions = np.arange(width)[None, :]
    tokens = np.where(positions < lengths[:, None], tokens, pad_id).astype(np.int32)
    arrays = {
        "tokens": tokens,
        "lengths": lengths.astype(np.int32),
        # Traced, not static: a new EOS/PAD id compiles nothing.
        "eos_id": np.full((n,), -1 if eos_id is None else eos_id, np.int32),
        "pad_id": np.full((n,), pad_id, np.int32),
    }
    return _chunked(_greedy_fn(task, int(max_new_tokens)), params, arrays, batch_size)["generated"]


def _answer_spans(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` ``[B]``: the answer targets are ``y[b, start:stop]`` (weights > 0)."""
    has = weights > 0
    if not np.all(has.any(axis=1)):
        raise ValueError(
            f"rows {_arrays.describe(np.flatnonzero(~has.any(axis=1)))} have no answer token."
        )
    start = np.argmax(has, axis=1)
    stop = weights.shape[1] - np.argmax(has[:, ::-1], axis=1)
    return start, stop


def generate_answers(
    task: Any,
    params: Any,
    batch: Any,
    *,
    decode: Decode,
    eos_id: int | None,
    pad_id: int = 0,
    answer_prefix: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> tuple[list[str], list[str]]:
    """Greedy answers to the prompts of a sequence batch, and the reference answers, as text.

    The prompt of row ``b`` is ``x[b, :p_b]`` with ``p_b = argmax(weights[b] > 0) + 1`` (every token
    before the answer), extended by the first ``answer_prefix`` answer tokens: 0 for question
    answering (TOFU's ROUGE, MUSE's KnowMem), > 0 to continue a given beginning (MUSE's VerbMem).
    The reference is the rest of the answer, ``y[b]`` over the weighted positions after the prefix.

    Args:
      task, params: the model.
      batch: ``{"x", "y", "weights"}`` or a sequence Dataset.
      decode: token ids -> text (e.g. ``Tokenizer.decode``, which stops at EOS).
      eos_id: the end-of-sequence token (generation stops there), or None.
      pad_id: the padding token.
      answer_prefix: answer tokens given with the prompt, >= 0.
      max_new_tokens: at most this many tokens per row; None: ``T - 1``, as many as a row can
        hold (generation stops once every row has emitted ``eos_id``, so this costs nothing when
        the model ends its answers).
      batch_size: rows per jitted chunk.

    Returns:
      ``(predictions, references)``: two lists of ``B`` strings.

    Raises:
      ValueError: if a row has no answer token or no more than ``answer_prefix`` of them.
    """
    arrays = _sequence_batch(batch)
    if isinstance(answer_prefix, bool) or not isinstance(answer_prefix, int) or answer_prefix < 0:
        raise ValueError(f"answer_prefix must be an integer >= 0, got {answer_prefix=}.")
    start, stop = _answer_spans(arrays["weights"])
    if np.any(stop - start <= answer_prefix):
        raise ValueError(
            f"{answer_prefix=} leaves nothing to generate in rows "
            f"{_arrays.describe(np.flatnonzero(stop - start <= answer_prefix))}."
        )
    lengths = start + 1 + answer_prefix
    if max_new_tokens is None:
        # One value for every set of this width: one compilation.
        max_new_tokens = int(arrays["x"].shape[1] - 1)
    generated = greedy_decode(
        task,
        params,
        arrays["x"],
        lengths,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        batch_size=batch_size,
    )
    predictions = [decode(row.tolist()) for row in generated]
    references = [
        decode(arrays["y"][b, start[b] + answer_prefix : stop[b]].tolist())
        for b in range(arrays["y"].shape[0])
    ]
    return predictions, references


def answer_texts(batch: Any, *, decode: Decode) -> list[str]:
    """The answer of every row of a sequence batch as text: ``decode(y[b, weights[b] > 0])``."""
    arrays = _sequence_batch(batch)
    start, stop = _answer_spans(arrays["weights"])
    return [decode(arrays["y"][b, start[b] : stop[b]].tolist()) for b in range(start.shape[0])]


def qa_statistics(
    task: Any,
    params: Any,
    qa: Any,
    *,
    decode: Decode,
    eos_id: int | None,
    paraphrased_answer: Any = None,
    perturbed: Sequence[Any] | None = None,
    paraphrased_question: Any = None,
    pad_id: int = 0,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    r"""Per-question statistics of one model on a set of question-answer pairs (TOFU's inputs).

    Keys (each ``[N]`` float64):

    * ``mean_log_prob``: :math:`\bar\ell(a)`; ``prob``: :math:`P(a|q)^{1/|a|}`;
    * ``rouge_l/recall``, ``rouge_l/f1``: ROUGE-L of the greedy answer against ``a``;
    * with ``paraphrased_answer`` and ``perturbed``: ``truth_ratio`` (:func:`truth_ratios`) and
      ``choice_prob`` (:func:`choice_probs` of ``a`` against the perturbed answers);
    * with ``paraphrased_question``: ``paraphrased_question/rouge_l/recall`` (answers to the
      reworded questions).

    Args:
      task, params: the model.
      qa: the pairs as trained (``{"x", "y", "weights"}`` or a sequence Dataset).
      decode, eos_id, pad_id: see :func:`generate_answers`.
      paraphrased_answer: the same questions with paraphrased answers, row-aligned with ``qa``.
      perturbed: ``K`` batches with perturbed answers, row-aligned.
      paraphrased_question: the reworded questions with the original answers, row-aligned.
      batch_size: rows per jitted chunk.

    Raises:
      ValueError: if the variants' row counts differ from ``qa``'s, or only one of
        ``paraphrased_answer`` / ``perturbed`` is given.
    """
    arrays = _sequence_batch(qa, "qa")
    n = arrays["x"].shape[0]
    if (paraphrased_answer is None) != (perturbed is None or len(perturbed) == 0):
        raise ValueError("pass both paraphrased_answer and perturbed (a truth ratio needs both).")
    out: dict[str, np.ndarray] = {}
    out["mean_log_prob"] = answer_mean_log_probs(task, params, arrays, batch_size=batch_size)
    out["prob"] = np.exp(out["mean_log_prob"])
    predictions, references = generate_answers(
        task, params, arrays, decode=decode, eos_id=eos_id, pad_id=pad_id, batch_size=batch_size
    )
    rouge = rouge_l_scores(predictions, references)
    out["rouge_l/recall"], out["rouge_l/f1"] = rouge["recall"], rouge["f1"]

    def variant(data: Any, name: str) -> dict[str, np.ndarray]:
        v = _sequence_batch(data, name)
        if v["x"].shape[0] != n:
            raise ValueError(f"{name} has {v['x'].shape[0]} rows but qa has {n}; they must align.")
        return v

    if paraphrased_answer is not None:
        para = answer_mean_log_probs(
            task, params, variant(paraphrased_answer, "paraphrased_answer"), batch_size=batch_size
        )
        pert = np.stack(
            [
                answer_mean_log_probs(
                    task, params, variant(p, f"perturbed[{k}]"), batch_size=batch_size
                )
                for k, p in enumerate(perturbed)
            ],
            axis=1,
        )
        out["truth_ratio"] = truth_ratios(para, pert)
        out["choice_prob"] = choice_probs(out["mean_log_prob"], pert)
    if paraphrased_question is not None:
        preds, refs = generate_answers(
            task,
            params,
            variant(paraphrased_question, "paraphrased_question"),
            decode=decode,
            eos_id=eos_id,
            pad_id=pad_id,
            batch_size=batch_size,
        )
        out["paraphrased_question/rouge_l/recall"] = rouge_l_scores(preds, refs)["recall"]
    return out


def lm_membership_scores(
    task: Any,
    params: Any,
    batch: Any,
    *,
    decode: Decode | None = None,
    zlib_lengths: Any = None,
    k: float = 0.2,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """The LOSS, zlib, Min-K% and Min-K%++ scores of every row's answer (larger = member-like).

    Args:
      task, params: the model.
      batch: ``{"x", "y", "weights"}`` or a sequence Dataset.
      decode: token ids -> text, for the zlib length of each answer (or pass ``zlib_lengths``).
      zlib_lengths: ``[B]`` zlib lengths of the answers; overrides ``decode``.
      k: Min-K%'s fraction of tokens.
      batch_size: rows per jitted chunk.

    Returns:
      ``{"loss", "zlib", "min_k", "min_k++"}`` (``"zlib"`` only with ``decode`` or
      ``zlib_lengths``), each ``[B]`` float64.
    """
    arrays = _sequence_batch(batch)
    stats = token_statistics(task, params, arrays, batch_size=batch_size)
    w = arrays["weights"]
    out = {
        "loss": loss_scores(stats["log_probs"], w),
        "min_k": min_k_scores(stats["log_probs"], w, k),
        "min_k++": min_k_plus_plus_scores(stats["log_probs"], stats["mu"], stats["sigma"], w, k),
    }
    if zlib_lengths is None and decode is not None:
        zlib_lengths = [zlib_length(text) for text in answer_texts(arrays, decode=decode)]
    if zlib_lengths is not None:
        out["zlib"] = zlib_scores(stats["log_probs"], w, zlib_lengths)
    return out
