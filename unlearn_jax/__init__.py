"""unlearn_jax: a JAX engine for machine unlearning.

The public API is re-exported here; see README.md for the map of modules.
"""

from unlearn_jax.curvature import (
    diag_fisher,
    diag_fisher_batch_mean,
    diag_fisher_sampled,
    ggn_vp,
    hvp,
)
from unlearn_jax.grads import mean_grad, per_example_grad_norms, per_example_grads
from unlearn_jax.solvers import InverseHVPResult, SolverDidNotConverge, inverse_hvp
from unlearn_jax.task import Task, flax_task

__version__ = "0.1.0"

__all__ = [
    "InverseHVPResult",
    "SolverDidNotConverge",
    "Task",
    "__version__",
    "diag_fisher",
    "diag_fisher_batch_mean",
    "diag_fisher_sampled",
    "flax_task",
    "ggn_vp",
    "hvp",
    "inverse_hvp",
    "mean_grad",
    "per_example_grad_norms",
    "per_example_grads",
]
