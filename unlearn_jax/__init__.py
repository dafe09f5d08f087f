"""unlearn_jax: a JAX engine for machine unlearning.

The numerical core and the most used names are re-exported here; the subpackages hold the rest:
:mod:`unlearn_jax.core` (the numerical core), :mod:`unlearn_jax.data`, :mod:`unlearn_jax.models`,
:mod:`unlearn_jax.training`, :mod:`unlearn_jax.checkpoint`, :mod:`unlearn_jax.methods`,
:mod:`unlearn_jax.evaluation`, and :mod:`unlearn_jax.apps` (benchmark, command line).
See README.md for the map.
"""

from unlearn_jax import checkpoint, core, data, evaluation, methods, models, training
from unlearn_jax.checkpoint import restore_checkpoint, save_checkpoint
from unlearn_jax.core.curvature import (
    diag_fisher,
    diag_fisher_batch_mean,
    diag_fisher_sampled,
    ggn_vp,
    hvp,
)
from unlearn_jax.core.grads import mean_grad, per_example_grad_norms, per_example_grads
from unlearn_jax.core.solvers import InverseHVPResult, SolverDidNotConverge, inverse_hvp
from unlearn_jax.core.task import Task, flax_task
from unlearn_jax.data import Dataset, load, select_forget
from unlearn_jax.methods import Unlearner, UnlearnResult, unlearn, unlearn_many
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import create_train_state, fit, fit_many, retrain

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "InverseHVPResult",
    "SolverDidNotConverge",
    "Task",
    "UnlearnResult",
    "Unlearner",
    "__version__",
    "checkpoint",
    "core",
    "create_train_state",
    "data",
    "diag_fisher",
    "diag_fisher_batch_mean",
    "diag_fisher_sampled",
    "evaluation",
    "fit",
    "fit_many",
    "flax_task",
    "get_model",
    "ggn_vp",
    "hvp",
    "inverse_hvp",
    "load",
    "mean_grad",
    "methods",
    "model_task",
    "models",
    "per_example_grad_norms",
    "per_example_grads",
    "restore_checkpoint",
    "retrain",
    "save_checkpoint",
    "select_forget",
    "training",
    "unlearn",
    "unlearn_many",
]
