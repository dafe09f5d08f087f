"""Unlearning methods: the protocol, the driver, composition, and every method by name.

A method is an optax-like pair of pure functions (:class:`Unlearner`; :mod:`~.protocol`), run by
:func:`unlearn` / :func:`unlearn_many` (:mod:`~.driver`). Gradient-based recipes are assembled from
objective terms (:mod:`~.objectives`, reached as a module because its ``npo``/``simnpo`` TERMS share
names with the recipes here), gradient transforms (:mod:`~.transforms`, optax transforms included,
composed with :func:`chain`) and any optax optimizer (:mod:`~.gradient`). One-shot and closed-form
methods implement the same protocol: second-order (:mod:`~.ssd`, :mod:`~.influence`,
:mod:`~.woodfisher`, :mod:`~.iau`) and exact (:mod:`~.analytic`; :mod:`~.certified` for linear
models); output matching (:mod:`~.matching`: oracle matching, DMM). Whole methods compose with
:func:`sequence`.
"""

from unlearn_jax.methods import objectives, transforms
from unlearn_jax.methods.analytic import (
    AnalyticHead,
    AnalyticState,
    NotLearnedError,
    acu,
    fit_analytic_head,
)
from unlearn_jax.methods.certified import CertifiedLinearModel, certified_fit, certified_remove
from unlearn_jax.methods.compose import Sequence, sequence
from unlearn_jax.methods.driver import (
    NonFiniteLossError,
    UnlearnManyResult,
    UnlearnResult,
    compute_statistics,
    unlearn,
    unlearn_many,
)
from unlearn_jax.methods.gradient import (
    GradientMethodState,
    GradientRecipe,
    Phase,
    bad_teacher,
    finetune,
    grad_diff,
    gradient_ascent,
    gradient_method,
    l1_sparse,
    npo,
    random_label,
    salun,
    sam,
    scrub,
    sgd,
    simnpo,
)
from unlearn_jax.methods.iau import gradient_restriction, iau
from unlearn_jax.methods.influence import influence_removal
from unlearn_jax.methods.matching import MatchingTargets, dmm, matching_targets, oracle_matching
from unlearn_jax.methods.protocol import (
    Checks,
    Feeds,
    RunPlan,
    Statistic,
    Unlearner,
    with_run,
)
from unlearn_jax.methods.ssd import full_data_importances, lfssd, ssd
from unlearn_jax.methods.transforms import (
    GradientTransform,
    SaliencyState,
    chain,
    from_optax,
    saliency_mask,
    sharpness_aware,
    top_fraction_mask,
)
from unlearn_jax.methods.woodfisher import woodfisher

__all__ = [
    "AnalyticHead",
    "AnalyticState",
    "CertifiedLinearModel",
    "Checks",
    "Feeds",
    "GradientMethodState",
    "GradientRecipe",
    "GradientTransform",
    "MatchingTargets",
    "NonFiniteLossError",
    "NotLearnedError",
    "Phase",
    "RunPlan",
    "SaliencyState",
    "Sequence",
    "Statistic",
    "UnlearnManyResult",
    "UnlearnResult",
    "Unlearner",
    "acu",
    "bad_teacher",
    "certified_fit",
    "certified_remove",
    "chain",
    "compute_statistics",
    "dmm",
    "finetune",
    "fit_analytic_head",
    "from_optax",
    "full_data_importances",
    "grad_diff",
    "gradient_ascent",
    "gradient_method",
    "gradient_restriction",
    "iau",
    "influence_removal",
    "l1_sparse",
    "lfssd",
    "matching_targets",
    "npo",
    "objectives",
    "oracle_matching",
    "random_label",
    "saliency_mask",
    "salun",
    "sam",
    "scrub",
    "sequence",
    "sgd",
    "sharpness_aware",
    "simnpo",
    "ssd",
    "top_fraction_mask",
    "transforms",
    "unlearn",
    "unlearn_many",
    "with_run",
    "woodfisher",
]
