"""Training: ``TrainState`` creation, fit one model or many at once (``vmap``), retrain, convex fits.

:mod:`~unlearn_jax.training.minibatch` holds the mini-batch recipe shared by originals, oracles and shadow
models; :mod:`~unlearn_jax.training.convex` the full-batch L-BFGS fit of convex objectives.
"""

from unlearn_jax.training.convex import fit_full_batch
from unlearn_jax.training.minibatch import (
    RetrainResult,
    TrainState,
    create_train_state,
    evaluate_accuracy,
    fit,
    fit_many,
    retrain,
    train_original,
)

__all__ = [
    "RetrainResult",
    "TrainState",
    "create_train_state",
    "evaluate_accuracy",
    "fit",
    "fit_full_batch",
    "fit_many",
    "retrain",
    "train_original",
]
