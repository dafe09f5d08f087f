"""The numerical core: per-example gradients, curvature products, inverse-HVP solvers and the
:class:`Task` that tells everything above how to read a model.

Pure functions on pytrees; nothing here knows a data set or a method. Modules:

* :mod:`~unlearn_jax.core.task`: :class:`Task` (outputs, per-example losses, masked batch losses);
* :mod:`~unlearn_jax.core.grads`: per-example gradients, their norms, chunked maps and sums;
* :mod:`~unlearn_jax.core.cpu_rewrites`: exact jaxpr rewrites that speed up per-example work on CPU;
* :mod:`~unlearn_jax.core.curvature`: diagonal Fisher estimates, Hessian- and GGN-vector products;
* :mod:`~unlearn_jax.core.solvers`: ``(A + damping I) x = b`` by CG, LiSSA or a dense solve.
"""

from unlearn_jax.core.curvature import (
    diag_fisher,
    diag_fisher_batch_mean,
    diag_fisher_sampled,
    ggn_vp,
    hvp,
)
from unlearn_jax.core.grads import mean_grad, per_example_grad_norms, per_example_grads
from unlearn_jax.core.solvers import (
    InverseHVPResult,
    SolverDidNotConverge,
    inverse_hvp,
    inverse_hvp_many,
    top_eigenvalue,
)
from unlearn_jax.core.task import CLASSIFICATION, REGRESSION, Task, flax_task

__all__ = [
    "CLASSIFICATION",
    "REGRESSION",
    "InverseHVPResult",
    "SolverDidNotConverge",
    "Task",
    "diag_fisher",
    "diag_fisher_batch_mean",
    "diag_fisher_sampled",
    "flax_task",
    "ggn_vp",
    "hvp",
    "inverse_hvp",
    "inverse_hvp_many",
    "mean_grad",
    "per_example_grad_norms",
    "per_example_grads",
    "top_eigenvalue",
]
