"""Unlearning methods: the protocol, the driver, and every method by name.

Gradient-based recipes are assembled from objective terms (:mod:`~unlearn_jax.methods.objectives`,
reached as a module because its ``npo``/``simnpo`` TERMS share names with the recipes here), gradient
transforms (:mod:`~unlearn_jax.methods.transforms`) and any optax optimizer. One-shot methods (SSD,
influence removal, WoodFisher, IAU, analytic unlearning) implement the same protocol.
"""

from unlearn_jax.methods import objectives, transforms
from unlearn_jax.methods.analytic import AnalyticHead, NotLearnedError, acu, fit_analytic_head
from unlearn_jax.methods.base import (
    NonFiniteLossError,
    RunInfo,
    Unlearner,
    UnlearnManyResult,
    UnlearnResult,
    steps_per_pass,
    unlearn,
    unlearn_many,
)
from unlearn_jax.methods.certified import CertifiedLinearModel, certified_fit, certified_remove
from unlearn_jax.methods.gradient import (
    GradientMethodState,
    GradientParts,
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
from unlearn_jax.methods.ssd import full_data_importances, lfssd, ssd
from unlearn_jax.methods.transforms import (
    GradientTransform,
    SaliencyState,
    saliency_mask,
    sharpness_aware,
    top_fraction_mask,
)
from unlearn_jax.methods.woodfisher import woodfisher

__all__ = [
    "AnalyticHead",
    "CertifiedLinearModel",
    "GradientMethodState",
    "GradientParts",
    "GradientTransform",
    "NonFiniteLossError",
    "NotLearnedError",
    "Phase",
    "RunInfo",
    "SaliencyState",
    "UnlearnManyResult",
    "UnlearnResult",
    "Unlearner",
    "acu",
    "bad_teacher",
    "certified_fit",
    "certified_remove",
    "finetune",
    "fit_analytic_head",
    "full_data_importances",
    "grad_diff",
    "gradient_ascent",
    "gradient_method",
    "gradient_restriction",
    "iau",
    "influence_removal",
    "l1_sparse",
    "lfssd",
    "npo",
    "objectives",
    "random_label",
    "saliency_mask",
    "salun",
    "sam",
    "scrub",
    "sgd",
    "sharpness_aware",
    "simnpo",
    "ssd",
    "steps_per_pass",
    "top_fraction_mask",
    "transforms",
    "unlearn",
    "unlearn_many",
    "woodfisher",
]
