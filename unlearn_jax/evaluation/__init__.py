"""Evaluation of unlearning: accuracies, membership inference, KLoM, the challenge score, reports.

Everything here works on arrays (logits, labels, scores) or on a :class:`unlearn_jax.Task` with
parameters and datasets; nothing depends on the data or training modules.

Units: ``*/acc`` and attack metrics (AUC, TPR) are fractions; the table-facing ``UA``, ``RA``, ``TA``
and ``MIA-Efficacy`` are percentages, as in the SalUn tables.
"""

from unlearn_jax.evaluation.challenge import challenge_epsilons, challenge_points, challenge_score
from unlearn_jax.evaluation.klom import klom, klom_from_margins, klom_summary
from unlearn_jax.evaluation.metrics import (
    TABLE_KEYS,
    accuracy_metrics,
    compute_outputs,
    evaluate_unlearning,
    gap_to_retrain,
    speedup,
)
from unlearn_jax.evaluation.mia import (
    FEATURES,
    LearnedAttack,
    attack_metrics,
    confidences,
    entropies,
    feature_matrix,
    learned_attack,
    lira,
    logit_margins,
    membership_scores,
    mia_efficacy,
    modified_entropies,
    per_example_losses,
    roc_auc,
    roc_curve,
    threshold_attacks,
    tpr_at_fpr,
)
from unlearn_jax.evaluation.relearn import RelearnResult, relearning_attack
from unlearn_jax.evaluation.report import (
    format_table,
    plot_gap_bars,
    plot_roc_curves,
    to_jsonable,
    write_json,
)

__all__ = [
    "FEATURES",
    "TABLE_KEYS",
    "LearnedAttack",
    "RelearnResult",
    "accuracy_metrics",
    "attack_metrics",
    "challenge_epsilons",
    "challenge_points",
    "challenge_score",
    "compute_outputs",
    "confidences",
    "entropies",
    "evaluate_unlearning",
    "feature_matrix",
    "format_table",
    "gap_to_retrain",
    "klom",
    "klom_from_margins",
    "klom_summary",
    "learned_attack",
    "lira",
    "logit_margins",
    "membership_scores",
    "mia_efficacy",
    "modified_entropies",
    "per_example_losses",
    "plot_gap_bars",
    "plot_roc_curves",
    "relearning_attack",
    "roc_auc",
    "roc_curve",
    "speedup",
    "threshold_attacks",
    "to_jsonable",
    "tpr_at_fpr",
    "write_json",
]
