"""unlearn_jax: a JAX engine for machine unlearning."""

from unlearn_jax.task import Task, flax_task

__version__ = "0.1.0"

__all__ = ["Task", "__version__", "flax_task"]
