"""Membership-inference attacks on per-example statistics of a classifier's logits.

Everything here is array-level: inputs are logits ``[..., C]`` and integer labels, or ready-made
scores, as numpy or JAX arrays; computations run on the host in float64 with log-softmax arithmetic,
so probabilities that round to 0 or 1 never produce ``log(0)``.

Conventions:
  * A *score* is oriented so that LARGER means MORE MEMBER-LIKE; an attack predicts "member" when the
    score exceeds a threshold. Labels for ROC computations are 1 for members, 0 for non-members.
  * AUC is the Mann-Whitney statistic with tied scores counted one half (the rank formula).
  * ``TPR at FPR = t`` is read off the empirical ROC curve (which includes ``(0, 0)`` and ``(1, 1)``)
    by linear interpolation between the two ROC points that bracket ``t``; where several points share
    an FPR, the highest TPR among those with ``FPR <= t`` is used. Linear interpolation is exactly the
    TPR of the best randomised mixture of two adjacent thresholds at FPR ``t``; with no ties between
    members and non-members the ROC is a staircase and this is simply the largest TPR of a threshold
    whose FPR is at most ``t``.
  * Table-facing ``"MIA-Efficacy"`` is a PERCENTAGE (as in the SalUn tables, so it can be averaged
    with UA/RA/TA into the Avg. Gap); AUC, TPR and accuracies under ``"mia/..."`` are fractions.

References:
  Yeom et al., "Privacy risk in machine learning", CSF 2018 (loss attack).
  Song & Mittal, "Systematic evaluation of privacy risks of machine learning models", USENIX Security
  2021 (confidence, entropy and modified-entropy attacks).
  Carlini et al., "Membership inference attacks from first principles", S&P 2022 (LiRA, TPR at low
  FPR).
  Fan et al., "SalUn: empowering machine unlearning via gradient-based weight saliency", ICLR 2024
  (MIA-Efficacy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import special

from unlearn_jax import _validate
from unlearn_jax.evaluation import _arrays

FEATURES = ("loss", "confidence", "entropy", "modified_entropy")
"""The per-example statistics the threshold and learned attacks use, in their default order."""

DEFAULT_TARGET_FPRS = (0.01, 0.001)


# ---------------------------------------------------------------------------------------------------
# Per-example features
# ---------------------------------------------------------------------------------------------------
def logit_margins(logits: Any, labels: Any) -> np.ndarray:
    """Logit-scaled confidence ``phi = log p_y - log(1 - p_y) = z_y - logsumexp_{k != y} z_k``.

    This is LiRA's statistic, the KLoM margin and the challenge's "confidence": one function for all.
    Computed from the logits directly, it stays exact where ``p_y`` rounds to 0 or 1.

    Args:
      logits: ``[..., C]`` logits with ``C >= 2`` (e.g. ``[N, C]``, or ``[M, N, C]`` for M models).
      labels: integer labels broadcastable to ``logits.shape[:-1]`` (e.g. ``[N]``).

    Returns:
      ``[...]`` float64 margins (``logits.shape[:-1]``).

    Raises:
      ValueError: on empty or non-finite logits, fewer than 2 classes, or labels that are not integers
        in ``[0, C)`` or do not match the logits' shape.

    Examples:
      >>> import numpy as np
      >>> round(float(logit_margins(np.log([[0.8, 0.1, 0.1]]), [0])[0]), 4)  # log(0.8 / 0.2)
      1.3863
    """
    z = _arrays.logits_array(logits, "logits")
    y = _arrays.label_array(labels, "labels", z.shape[:-1], z.shape[-1])
    return _margins(z, y)


def _margins(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    z_y = np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, y[..., None], -np.inf, axis=-1)
    return z_y - _arrays.logsumexp(others)


def per_example_losses(logits: Any, labels: Any) -> np.ndarray:
    """Cross-entropy ``l = -log p_y = log(1 + exp(-phi))`` per example, ``[...]`` float64.

    Shapes and errors as in :func:`logit_margins`.
    """
    return np.logaddexp(0.0, -logit_margins(logits, labels))


def confidences(logits: Any, labels: Any) -> np.ndarray:
    """Probability of the true class ``p_y = softmax(z)_y = sigmoid(phi)``, ``[...]`` float64.

    Shapes and errors as in :func:`logit_margins`.
    """
    return special.expit(logit_margins(logits, labels))


def entropies(logits: Any) -> np.ndarray:
    """Prediction entropy ``H = -sum_k p_k log p_k`` (nats) per example, ``[...]`` float64.

    Args:
      logits: ``[..., C]`` logits, ``C >= 2``.
    """
    logp = _arrays.log_softmax(_arrays.logits_array(logits, "logits"))
    return -np.sum(np.exp(logp) * logp, axis=-1)


def modified_entropies(logits: Any, labels: Any) -> np.ndarray:
    """Song & Mittal's modified entropy, per example, ``[...]`` float64::

      Mentr(p, y) = -(1 - p_y) log p_y - sum_{k != y} p_k log(1 - p_k)

    It is small for confident correct predictions (members) and large for confident wrong ones,
    which the plain entropy cannot tell apart. ``log p_y`` and ``1 - p_y`` come from the margin,
    ``log(1 - p_k)`` from :func:`_arrays.log1m_softmax`, so no probability is clipped.

    Shapes and errors as in :func:`logit_margins`.
    """
    z = _arrays.logits_array(logits, "logits")
    y = _arrays.label_array(labels, "labels", z.shape[:-1], z.shape[-1])
    phi = _margins(z, y)
    log_p_y = -np.logaddexp(0.0, -phi)
    one_minus_p_y = special.expit(-phi)
    p = np.exp(_arrays.log_softmax(z))
    terms = p * _arrays.log1m_softmax(z)
    np.put_along_axis(terms, y[..., None], 0.0, axis=-1)
    return -one_minus_p_y * log_p_y - np.sum(terms, axis=-1)


def membership_scores(logits: Any, labels: Any, feature: str) -> np.ndarray:
    """Scores oriented so that larger means more member-like, for a threshold attack.

    ``"loss"``: ``-l``; ``"confidence"``: ``phi`` (a strictly increasing function of ``p_y``, so the
    same ROC as thresholding ``p_y``, without the ties that ``p_y`` rounding to 1.0 would create);
    ``"entropy"``: ``-H``; ``"modified_entropy"``: ``-Mentr``.

    Args:
      logits: ``[N, C]`` logits. labels: ``[N]`` integer labels. feature: one of :data:`FEATURES`.

    Returns:
      ``[N]`` float64 scores.
    """
    _validate.one_of("membership feature", feature, FEATURES)
    if feature == "loss":
        return -per_example_losses(logits, labels)
    if feature == "confidence":
        return logit_margins(logits, labels)
    if feature == "entropy":
        _arrays.label_array(labels, "labels", np.shape(logits)[:-1], np.shape(logits)[-1])
        return -entropies(logits)
    return -modified_entropies(logits, labels)


def feature_matrix(logits: Any, labels: Any, features: Sequence[str] = FEATURES) -> np.ndarray:
    """Stacks the raw features (loss, ``p_y``, entropy, modified entropy) into ``[N, F]``.

    Used by the learned attack; unlike :func:`membership_scores` the values are not negated and
    ``"confidence"`` is ``p_y`` itself, as in SalUn's attack.
    """
    if isinstance(features, str) or len(features) == 0:
        raise ValueError(f"features must be a non-empty sequence of names from {FEATURES}.")
    columns = []
    for name in features:
        _validate.one_of("membership feature", name, FEATURES)
        if name == "loss":
            columns.append(per_example_losses(logits, labels))
        elif name == "confidence":
            columns.append(confidences(logits, labels))
        elif name == "entropy":
            columns.append(entropies(logits))
        else:
            columns.append(modified_entropies(logits, labels))
    return np.stack(columns, axis=-1)


# ---------------------------------------------------------------------------------------------------
# ROC, AUC, TPR at low FPR
# ---------------------------------------------------------------------------------------------------
def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _arrays.float_array(scores, "scores", ndim=1)
    y = np.asarray(labels)
    if y.shape != s.shape:
        raise ValueError(f"labels must have the same shape as scores {s.shape}, got {y.shape}.")
    if y.dtype != np.bool_:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(
                f"labels must be 0/1 (1 = member), got values {_arrays.describe(np.unique(y))}."
            )
        y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"ROC needs both members and non-members; got {n_pos} member(s) and "
            f"{y.size - n_pos} non-member(s)."
        )
    return s, y


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empirical ROC curve of the attack "member iff score >= threshold".

    Args:
      scores: ``[N]`` scores, larger = more member-like.
      labels: ``[N]`` 0/1 or bool, 1 = member.

    Returns:
      ``(fpr, tpr, thresholds)``, each ``[T + 1]`` for ``T`` distinct scores: thresholds decrease
      from ``+inf`` (the point ``(0, 0)``) to the smallest score (the point ``(1, 1)``); point ``i``
      is ``FPR = #{non-members with score >= thresholds[i]} / N_0``, likewise TPR over members.

    Raises:
      ValueError: on mismatched shapes, non-finite scores, labels other than 0/1, or a single class.
    """
    s, y = _scores_and_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    thresholds = np.r_[np.inf, s[last_of_group]]
    return fpr, tpr, thresholds


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks in ascending order, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_values))[0] + 1]
    ends = np.r_[starts[1:], values.size]
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney) formula::

      AUC = (sum_{i member} rank_i - N_1 (N_1 + 1) / 2) / (N_1 N_0)

    with average ranks for ties, i.e. ``P(s_member > s_nonmember) + P(s_member = s_nonmember) / 2``.

    Args:
      scores: ``[N]`` scores, larger = more member-like. labels: ``[N]`` 0/1 or bool, 1 = member.

    Raises:
      ValueError: as :func:`roc_curve`.

    Examples:
      >>> round(roc_auc([0.9, 0.5, 0.5, 0.5, 0.1], [1, 1, 1, 0, 0]), 4)  # 5 / 6
      0.8333
    """
    s, y = _scores_and_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tpr_at_fpr(fpr: Any, tpr: Any, target_fpr: float) -> float:
    """TPR of the ROC curve at ``target_fpr``, by linear interpolation between bracketing points.

    Let ``i`` be the last ROC point with ``fpr[i] <= target_fpr`` (the highest TPR at that FPR). If
    ``fpr[i] == target_fpr`` the result is ``tpr[i]``; otherwise it is
    ``tpr[i] + (target - fpr[i]) (tpr[i+1] - tpr[i]) / (fpr[i+1] - fpr[i])``.

    Args:
      fpr, tpr: ``[T]`` a ROC curve as returned by :func:`roc_curve` (FPR non-decreasing, starting at
        0 and ending at 1).
      target_fpr: in ``[0, 1]``.

    Examples:
      >>> fpr, tpr, _ = roc_curve([0.9, 0.5, 0.5, 0.5, 0.1], [1, 1, 1, 0, 0])
      >>> round(tpr_at_fpr(fpr, tpr, 0.25), 6)   # between (0, 1/3) and (1/2, 1)
      0.666667
    """
    _validate.in_interval("target_fpr", target_fpr, 0.0, 1.0, closed="both")
    fpr = _arrays.float_array(fpr, "fpr", ndim=1)
    tpr = _arrays.float_array(tpr, "tpr", ndim=1)
    if fpr.shape != tpr.shape:
        raise ValueError(f"fpr and tpr must have the same shape, got {fpr.shape} and {tpr.shape}.")
    if np.any(np.diff(fpr) < 0) or fpr[0] != 0.0 or fpr[-1] != 1.0:
        raise ValueError("fpr must be non-decreasing from 0 to 1, as returned by roc_curve.")
    i = int(np.nonzero(fpr <= target_fpr)[0][-1])
    if fpr[i] == target_fpr or i == fpr.size - 1:
        return float(tpr[i])
    slope = (tpr[i + 1] - tpr[i]) / (fpr[i + 1] - fpr[i])
    return float(tpr[i] + (target_fpr - fpr[i]) * slope)


def _fpr_key(target: float) -> str:
    return f"tpr@{100 * target:g}%fpr"


def attack_metrics(
    member_scores: Any,
    nonmember_scores: Any,
    *,
    target_fprs: Sequence[float] = DEFAULT_TARGET_FPRS,
) -> dict[str, float]:
    """AUC, TPR at low FPR and membership advantage of a threshold attack on given scores.

    Args:
      member_scores: ``[N_1]`` scores of members (larger = more member-like).
      nonmember_scores: ``[N_0]`` scores of non-members.
      target_fprs: FPRs at which to report the TPR (fractions).

    Returns:
      ``{"auc", "tpr@1%fpr", "tpr@0.1%fpr", "advantage"}`` (fractions; the TPR keys follow
      ``target_fprs``). ``advantage = max_threshold (TPR - FPR)`` (Yeom et al.); the best balanced
      accuracy of a threshold is ``(1 + advantage) / 2``.
    """
    members = _arrays.float_array(member_scores, "member_scores", ndim=1)
    nonmembers = _arrays.float_array(nonmember_scores, "nonmember_scores", ndim=1)
    scores = np.concatenate([members, nonmembers])
    labels = np.r_[np.ones(members.size, bool), np.zeros(nonmembers.size, bool)]
    fpr, tpr, _ = roc_curve(scores, labels)
    out = {"auc": roc_auc(scores, labels)}
    for target in target_fprs:
        out[_fpr_key(target)] = tpr_at_fpr(fpr, tpr, target)
    out["advantage"] = float(np.max(tpr - fpr))
    return out


def threshold_attacks(
    member_logits: Any,
    member_labels: Any,
    nonmember_logits: Any,
    nonmember_labels: Any,
    *,
    features: Sequence[str] = FEATURES,
    target_fprs: Sequence[float] = DEFAULT_TARGET_FPRS,
) -> dict[str, float]:
    """Threshold attacks on each feature (loss, confidence, entropy, modified entropy).

    Args:
      member_logits: ``[N_1, C]`` logits of members (e.g. the retain set, or the forget set to audit).
      member_labels: ``[N_1]`` integer labels.
      nonmember_logits: ``[N_0, C]`` logits of non-members (e.g. the test set).
      nonmember_labels: ``[N_0]`` integer labels.
      features: which of :data:`FEATURES` to attack with.
      target_fprs: FPRs for the TPR keys.

    Returns:
      Flat dict ``"mia/<feature>/<metric>"`` with the metrics of :func:`attack_metrics`, e.g.
      ``"mia/modified_entropy/auc"``.
    """
    out = {}
    for feature in features:
        metrics = attack_metrics(
            membership_scores(member_logits, member_labels, feature),
            membership_scores(nonmember_logits, nonmember_labels, feature),
            target_fprs=target_fprs,
        )
        out.update({f"mia/{feature}/{k}": v for k, v in metrics.items()})
    return out


# ---------------------------------------------------------------------------------------------------
# Learned attack and MIA-Efficacy
# ---------------------------------------------------------------------------------------------------
class LearnedAttack(NamedTuple):
    """Result of :func:`learned_attack`.

    Attributes:
      target_member_prob: ``[N_t]`` the attack's probability that each target example is a member.
      target_is_member: ``[N_t]`` bool, ``target_member_prob > 0.5``.
      holdout_auc: AUC of the attack on its held-out balanced split (NaN if no hold-out).
      holdout_acc: accuracy at threshold 0.5 on the held-out split (NaN if no hold-out).
      num_per_class: examples per class after balancing (training plus hold-out).
    """

    target_member_prob: np.ndarray
    target_is_member: np.ndarray
    holdout_auc: float
    holdout_acc: float
    num_per_class: int


def _numpy_rng(key: int | jax.Array) -> np.random.Generator:
    """A numpy generator from an int seed or a JAX PRNG key (typed or raw ``uint32[2]``)."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return np.random.default_rng(int(key))
    try:
        data = jax.random.key_data(key)
    except (TypeError, ValueError):
        data = key
    data = np.asarray(data)
    if data.dtype.kind not in "ui":
        raise ValueError(f"key must be an int seed or a JAX PRNG key, got {type(key).__name__}.")
    return np.random.default_rng(data.astype(np.uint64).reshape(-1))


def learned_attack(
    member_features: Any,
    nonmember_features: Any,
    target_features: Any,
    *,
    holdout_fraction: float = 0.2,
    key: int | jax.Array = 0,
) -> LearnedAttack:
    """Logistic-regression membership attack trained on known members vs known non-members.

    Balancing: both classes are subsampled without replacement to ``n = min(N_1, N_0)`` examples (in
    the usual setting, retain members are subsampled to the number of test non-members), so the
    attack's prior is 1/2 and its 0.5 threshold is the balanced decision rule. A stratified
    ``holdout_fraction`` of each class is held out to report the attack's own AUC and accuracy; the
    classifier (standardised features, then ``sklearn.linear_model.LogisticRegression`` with its
    defaults) is fit on the rest and applied to the targets.

    Args:
      member_features: ``[N_1, F]`` features of members.
      nonmember_features: ``[N_0, F]`` features of non-members.
      target_features: ``[N_t, F]`` features of the examples to classify.
      holdout_fraction: in ``[0, 1)``; 0 trains on everything and reports NaN hold-out metrics.
      key: int seed or JAX PRNG key for the subsampling and split.

    Returns:
      A :class:`LearnedAttack`.

    Raises:
      ValueError: on empty, non-finite or mis-shaped features, or too few examples to hold out.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _validate.in_interval("holdout_fraction", holdout_fraction, 0.0, 1.0, closed="left")
    members = _arrays.float_array(member_features, "member_features", ndim=2)
    nonmembers = _arrays.float_array(nonmember_features, "nonmember_features", ndim=2)
    targets = _arrays.float_array(target_features, "target_features", ndim=2)
    widths = {a.shape[1] for a in (members, nonmembers, targets)}
    if len(widths) != 1:
        raise ValueError(
            "member, non-member and target features must have the same number of columns, got "
            f"{members.shape}, {nonmembers.shape} and {targets.shape}."
        )
    rng = _numpy_rng(key)
    n = min(members.shape[0], nonmembers.shape[0])
    n_hold = round(holdout_fraction * n)
    if n - n_hold < 1 or (holdout_fraction > 0 and n_hold < 1):
        raise ValueError(
            f"too few examples for the attack: {members.shape[0]} members and {nonmembers.shape[0]} "
            f"non-members give {n} per class after balancing, {n_hold} of them held out "
            f"(holdout_fraction={holdout_fraction}); need at least 1 to train and 1 to hold out."
        )
    members = members[rng.permutation(members.shape[0])[:n]]
    nonmembers = nonmembers[rng.permutation(nonmembers.shape[0])[:n]]
    x_train = np.concatenate([members[n_hold:], nonmembers[n_hold:]])
    y_train = np.r_[np.ones(n - n_hold), np.zeros(n - n_hold)]
    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(x_train, y_train)
    holdout_auc = holdout_acc = float("nan")
    if n_hold > 0:
        x_hold = np.concatenate([members[:n_hold], nonmembers[:n_hold]])
        y_hold = np.r_[np.ones(n_hold), np.zeros(n_hold)]
        prob = model.predict_proba(x_hold)[:, 1]
        holdout_auc = roc_auc(prob, y_hold)
        holdout_acc = float(np.mean((prob > 0.5) == (y_hold == 1)))
    target_prob = model.predict_proba(targets)[:, 1]
    return LearnedAttack(target_prob, target_prob > 0.5, holdout_auc, holdout_acc, n)


def mia_efficacy(
    forget_logits: Any,
    forget_labels: Any,
    *,
    retain_logits: Any,
    retain_labels: Any,
    test_logits: Any,
    test_labels: Any,
    features: Sequence[str] = FEATURES,
    holdout_fraction: float = 0.2,
    key: int | jax.Array = 0,
) -> dict[str, float]:
    """SalUn's MIA-Efficacy: the share of the forget set a learned attack calls NON-member.

    The attack (:func:`learned_attack`) is trained on retain examples (members) against test examples
    (non-members), balanced by subsampling to the smaller of the two, on the per-example features
    ``features`` (default: loss, ``p_y``, entropy, modified entropy; SalUn's tables use the confidence
    ``p_y`` alone with an SVM, which ``features=("confidence",)`` approximates), then applied to the
    forget set::

      MIA-Efficacy = 100 * #{forget examples predicted non-member} / N_f      (a percentage)

    Higher means the forget set looks more like unseen data; compare with a retrained model's value
    rather than with 100.

    Args:
      forget_logits, forget_labels: ``[N_f, C]`` and ``[N_f]``.
      retain_logits, retain_labels: ``[N_r, C]`` and ``[N_r]`` (members).
      test_logits, test_labels: ``[N_t, C]`` and ``[N_t]`` (non-members).
      features: which of :data:`FEATURES` the attack sees.
      holdout_fraction, key: see :func:`learned_attack`.

    Returns:
      ``{"MIA-Efficacy": percent, "mia/learned/holdout_auc": fraction,
      "mia/learned/holdout_acc": fraction}``.
    """
    attack = learned_attack(
        feature_matrix(retain_logits, retain_labels, features),
        feature_matrix(test_logits, test_labels, features),
        feature_matrix(forget_logits, forget_labels, features),
        holdout_fraction=holdout_fraction,
        key=key,
    )
    return {
        "MIA-Efficacy": 100.0 * float(np.mean(~attack.target_is_member)),
        "mia/learned/holdout_auc": attack.holdout_auc,
        "mia/learned/holdout_acc": attack.holdout_acc,
    }


# ---------------------------------------------------------------------------------------------------
# LiRA
# ---------------------------------------------------------------------------------------------------
def _gaussian_logpdf(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * np.square((x - mean) / std) - np.log(std) - 0.5 * np.log(2.0 * np.pi)


def _masked_fit(
    phi: np.ndarray, mask: np.ndarray, fix_variance: bool, min_std: float, which: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std (population, ddof=0) of ``phi`` over models where ``mask``."""
    counts = mask.sum(axis=0)
    need = 1 if fix_variance else 2
    short = np.nonzero(counts < need)[0]
    if short.size:
        hint = "" if fix_variance else " or pass fix_variance=True (one global variance)"
        raise ValueError(
            f"LiRA needs at least {need} {which.upper()} shadow model(s) per example; examples "
            f"{_arrays.describe(short)} have {_arrays.describe(counts[short])}. Train more shadow "
            f"models{hint}."
        )
    mean = np.sum(np.where(mask, phi, 0.0), axis=0) / counts
    resid2 = np.where(mask, np.square(phi - mean), 0.0)
    if fix_variance:
        std = np.full_like(mean, np.sqrt(resid2.sum() / counts.sum()))
    else:
        std = np.sqrt(resid2.sum(axis=0) / counts)
    return mean, np.maximum(std, min_std)


def lira(
    shadow_phi: Any,
    shadow_in: Any,
    target_phi: Any,
    *,
    target_in: Any = None,
    online: bool = True,
    fix_variance: bool = False,
    min_std: float = 1e-6,
    target_fprs: Sequence[float] = DEFAULT_TARGET_FPRS,
) -> tuple[np.ndarray, dict[str, float]]:
    """The likelihood-ratio attack (LiRA) of Carlini et al. on logit-scaled confidences.

    For each example ``n``, Gaussians are fit (maximum likelihood: mean and ddof-0 std) to the
    shadow models' ``phi`` when ``n`` was IN their training set and when it was OUT::

      online:  score_n = log N(phi_n; mu_in_n, s_in_n^2) - log N(phi_n; mu_out_n, s_out_n^2)
      offline: score_n = log Phi((phi_n - mu_out_n) / s_out_n)   (one-sided test against OUT only)

    With ``fix_variance`` the per-example means are kept but one global std is used for IN and one for
    OUT, pooled over all examples' residuals about their own means (the paper's fixed-variance
    variant, for few shadow models). Stds are floored at ``min_std``. Larger scores mean more member-like.

    Args:
      shadow_phi: ``[M, N]`` ``phi = log(p_y / (1 - p_y))`` of each example under each shadow model
        (see :func:`logit_margins`).
      shadow_in: ``[M, N]`` bool, whether example ``n`` was in shadow model ``m``'s training set.
      target_phi: ``[N]`` the target model's ``phi``.
      target_in: optional ``[N]`` bool true membership in the target model, for metrics.
      online: use the IN Gaussians (needs IN shadow models); ``False`` uses OUT only.
      fix_variance: one global std per side instead of per-example stds.
      min_std: floor on the stds (a positive number).
      target_fprs: FPRs for the TPR keys.

    Returns:
      ``(scores [N], metrics)``; ``metrics`` is ``{"mia/lira/auc", "mia/lira/tpr@1%fpr", ...}`` (see
      :func:`attack_metrics`) when ``target_in`` is given, else empty.

    Raises:
      ValueError: on mismatched shapes, non-finite values, or examples with too few IN/OUT shadow
        models (at least 2 per side, 1 with ``fix_variance``).
    """
    _validate.positive(min_std=min_std)
    phi = _arrays.float_array(shadow_phi, "shadow_phi", ndim=2)
    mask = np.asarray(shadow_in)
    if mask.shape != phi.shape:
        raise ValueError(
            f"shadow_in must have the shape of shadow_phi {phi.shape}, got {mask.shape}."
        )
    mask = mask.astype(bool)
    target = _arrays.float_array(target_phi, "target_phi", ndim=1)
    if target.shape[0] != phi.shape[1]:
        raise ValueError(
            f"target_phi has {target.shape[0]} examples but shadow_phi has {phi.shape[1]} "
            f"(shape {phi.shape} = [models, examples])."
        )
    mu_out, sd_out = _masked_fit(phi, ~mask, fix_variance, min_std, "out")
    if online:
        mu_in, sd_in = _masked_fit(phi, mask, fix_variance, min_std, "in")
        scores = _gaussian_logpdf(target, mu_in, sd_in) - _gaussian_logpdf(target, mu_out, sd_out)
    else:
        scores = special.log_ndtr((target - mu_out) / sd_out)
    metrics: dict[str, float] = {}
    if target_in is not None:
        membership = np.asarray(target_in)
        if membership.shape != target.shape:
            raise ValueError(
                f"target_in must have the shape of target_phi {target.shape}, got {membership.shape}."
            )
        membership = membership.astype(bool)
        result = attack_metrics(scores[membership], scores[~membership], target_fprs=target_fprs)
        metrics = {f"mia/lira/{k}": v for k, v in result.items()}
    return scores, metrics
