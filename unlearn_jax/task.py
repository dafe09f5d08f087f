"""The small bundle that tells methods and evaluation how to read a model: outputs, loss, targets.

A Flax ``TrainState`` does not know its loss. Everything above the numerical core receives a
:class:`Task` explicitly: how to map parameters and a batch of inputs to outputs (logits for a
classifier, predictions for a regressor), and the loss of those outputs against targets.

Examples and batches are dicts with keys ``"x"`` (inputs), ``"y"`` (targets) and, when they come from
:mod:`unlearn_jax.data`, ``"id"`` (the example's stable id). A batch has a leading batch axis on every
leaf; an example has none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate

Params = Any
Batch = dict[str, jax.Array]

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclasses.dataclass(frozen=True)
class Task:
    """How to turn parameters and inputs into outputs and losses.

    Attributes:
      apply: ``apply(params, x) -> outputs`` on a batch of inputs ``x [B, ...]``, returning
        ``[B, K]`` (logits for classification, predictions for regression). For a Flax module this is
        ``lambda p, x: module.apply({"params": p}, x)``.
      kind: ``"classification"`` (softmax cross-entropy on integer labels ``y [B]``) or
        ``"regression"`` (half squared error ``0.5 * ||f(x) - y||^2`` summed over outputs).

    Methods come in two flavours: ``loss``/``outputs`` act on ONE example (the convention of the
    numerical core, ready for ``vmap``), ``batch_*`` on a batch.
    """

    apply: Callable[[Params, jax.Array], jax.Array]
    kind: str = CLASSIFICATION

    def __post_init__(self):
        _validate.one_of("task kind", self.kind, (CLASSIFICATION, REGRESSION))

    # ---- losses on outputs -------------------------------------------------------------------
    def output_losses(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """Per-example losses ``[B]`` of ``outputs [B, K]`` against ``targets``."""
        if self.kind == CLASSIFICATION:
            return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
        targets = targets.reshape(outputs.shape)
        return 0.5 * jnp.sum(jnp.square(outputs - targets).reshape(outputs.shape[0], -1), axis=-1)

    # ---- batches -----------------------------------------------------------------------------
    def batch_outputs(self, params: Params, batch: Batch) -> jax.Array:
        """Outputs ``[B, K]`` of a batch."""
        return self.apply(params, batch["x"])

    def batch_losses(self, params: Params, batch: Batch) -> jax.Array:
        """Per-example losses ``[B]`` of a batch."""
        return self.output_losses(self.batch_outputs(params, batch), batch["y"])

    def batch_loss(self, params: Params, batch: Batch) -> jax.Array:
        """Mean loss of a batch (a scalar)."""
        return jnp.mean(self.batch_losses(params, batch))

    # ---- single examples (the numerical core's convention) -----------------------------------
    def outputs(self, params: Params, example: Batch) -> jax.Array:
        """Outputs ``[K]`` of ONE example (no batch axis)."""
        return self.apply(params, example["x"][None])[0]

    def loss(self, params: Params, example: Batch) -> jax.Array:
        """Loss of ONE example: a scalar. Pass this to :func:`unlearn_jax.per_example_grads`."""
        batch = jax.tree_util.tree_map(lambda a: a[None], example)
        return self.batch_losses(params, batch)[0]

    # ---- metrics -----------------------------------------------------------------------------
    def batch_correct(self, params: Params, batch: Batch) -> jax.Array:
        """Per-example correctness ``[B]`` as 0/1 floats (classification tasks only)."""
        if self.kind != CLASSIFICATION:
            raise ValueError(
                "batch_correct needs a classification task; use batch_losses for regression."
            )
        outputs = self.batch_outputs(params, batch)
        return (jnp.argmax(outputs, axis=-1) == batch["y"]).astype(jnp.float32)


def flax_task(module: Any, kind: str = CLASSIFICATION) -> Task:
    """A :class:`Task` for a Flax linen module whose parameters are the ``"params"`` collection."""
    return Task(apply=lambda params, x: module.apply({"params": params}, x), kind=kind)
