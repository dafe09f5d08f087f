"""The small bundle that tells methods and evaluation how to read a model: outputs, loss, targets.

A Flax ``TrainState`` does not know its loss. Everything above the numerical core receives a
:class:`Task` explicitly: how to map parameters and a batch of inputs to outputs (logits for a
classifier, predictions for a regressor, per-position logits for a sequence model), and the loss of
those outputs against targets.

Batches are dicts. The keys every layer understands:

* ``"x"``: inputs ``[B, ...]`` (token ids ``[B, T]`` for a sequence model);
* ``"y"``: targets: labels ``[B]``, regression targets ``[B]`` / ``[B, K]``, or next tokens ``[B, T]``;
* ``"id"``: ``[B]`` int32 stable example ids (from :mod:`unlearn_jax.data`; ``-1`` on padding rows);
* ``"mask"`` (optional): ``[B]`` float row weights, 0 on padding rows. Batches padded to a fixed size
  (so that one compiled step serves every request) carry it; every batch-level reduction of this
  module weights by it. Absent means all ones;
* ``"weights"`` (sequence tasks only): ``[B, T]`` float token weights, 1 on the tokens whose
  likelihood counts (the answer of a question-answer pair), 0 elsewhere (prompt, padding).

An example is the same dict without the batch axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate
from unlearn_jax.core.batch import masked_mean, row_mask

Params = Any
Batch = dict[str, jax.Array]

CLASSIFICATION = "classification"
REGRESSION = "regression"
SEQUENCE = "sequence"
KINDS = (CLASSIFICATION, REGRESSION, SEQUENCE)


@dataclasses.dataclass(frozen=True)
class Task:
    """How to turn parameters and inputs into outputs and losses.

    Attributes:
      apply: ``apply(params, x) -> outputs`` on a batch of inputs ``x [B, ...]``, returning
        ``[B, K]`` (logits for classification, predictions for regression) or ``[B, T, V]``
        (per-position logits of a sequence model). For a Flax module this is
        ``lambda p, x: module.apply({"params": p}, x)``.
      kind: ``"classification"`` (softmax cross-entropy on integer labels ``y [B]``),
        ``"regression"`` (half squared error ``0.5 * ||f(x) - y||^2`` summed over outputs) or
        ``"sequence"`` (the negative log-likelihood of the target tokens ``y [B, T]`` summed over the
        positions with ``weights [B, T]``: :math:`-\\sum_t w_t \\log p_\\theta(y_t | x_{\\le t})`).
      module: the Flax module behind ``apply`` when known (set by :func:`flax_task`); the per-layer
        statistics read it. Not part of equality.

    Methods come in two flavours: ``loss``/``outputs`` act on ONE example (the convention of the
    numerical core, ready for ``vmap``), ``batch_*`` on a batch. Batch-level means weight rows by
    ``batch["mask"]`` when present (padding rows count for nothing).
    """

    apply: Callable[[Params, jax.Array], jax.Array]
    kind: str = CLASSIFICATION
    module: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _validate.one_of("task kind", self.kind, KINDS)

    # ---- losses on outputs -------------------------------------------------------------------
    def output_losses(
        self, outputs: jax.Array, targets: jax.Array, weights: jax.Array | None = None
    ) -> jax.Array:
        """Per-example losses ``[B]`` of ``outputs`` against ``targets``.

        Args:
          outputs: ``[B, K]`` (classification, regression) or ``[B, T, V]`` (sequence).
          targets: labels ``[B]``, targets ``[B]`` / ``[B, K]``, or tokens ``[B, T]``.
          weights: sequence tasks: ``[B, T]`` token weights (``None``: every position counts).
        """
        if self.kind == CLASSIFICATION:
            return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
        if self.kind == SEQUENCE:
            token_nll = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
            if weights is None:
                return jnp.sum(token_nll, axis=-1)
            return jnp.sum(weights.astype(token_nll.dtype) * token_nll, axis=-1)
        targets = targets.reshape(outputs.shape)
        return 0.5 * jnp.sum(jnp.square(outputs - targets).reshape(outputs.shape[0], -1), axis=-1)

    # ---- batches -----------------------------------------------------------------------------
    def batch_outputs(self, params: Params, batch: Batch) -> jax.Array:
        """Outputs of a batch: ``[B, K]``, or ``[B, T, V]`` for a sequence model."""
        return self.apply(params, batch["x"])

    def batch_losses(self, params: Params, batch: Batch) -> jax.Array:
        """Per-example losses ``[B]`` of a batch (padding rows included; weight them by the mask)."""
        return self.output_losses(
            self.batch_outputs(params, batch), batch["y"], batch.get("weights")
        )

    def batch_loss(self, params: Params, batch: Batch) -> jax.Array:
        """Mean loss over the real rows of a batch (a scalar): :func:`masked_mean` of the losses."""
        losses = self.batch_losses(params, batch)
        return masked_mean(losses, row_mask(batch, losses.dtype))

    def batch_lengths(self, batch: Batch) -> jax.Array:
        """``[B]`` lengths :math:`|y|` of the targets: summed token weights for a sequence task
        (the number of positions when there are none), 1 otherwise."""
        if self.kind == SEQUENCE:
            if "weights" in batch:
                return jnp.sum(jnp.asarray(batch["weights"], jnp.float32), axis=-1)
            return jnp.full(batch["y"].shape[:1], batch["y"].shape[1], jnp.float32)
        return jnp.ones(batch["y"].shape[:1], jnp.float32)

    # ---- single examples (the numerical core's convention) -----------------------------------
    def outputs(self, params: Params, example: Batch) -> jax.Array:
        """Outputs of ONE example (no batch axis): ``[K]``, or ``[T, V]``."""
        return self.apply(params, example["x"][None])[0]

    def loss(self, params: Params, example: Batch) -> jax.Array:
        """Loss of ONE example: a scalar. Pass this to :func:`unlearn_jax.per_example_grads`.

        The row weight ``example["mask"]`` (if any) is NOT applied: a per-example loss is that
        example's own; reductions over batches weight by the mask themselves.
        """
        batch = {k: v[None] for k, v in example.items() if k != "mask"}
        return self.batch_losses(params, batch)[0]

    # ---- metrics -----------------------------------------------------------------------------
    def batch_correct(self, params: Params, batch: Batch) -> jax.Array:
        """Per-example correctness ``[B]`` as 0/1 floats (classification tasks only)."""
        if self.kind != CLASSIFICATION:
            raise ValueError(
                "batch_correct needs a classification task; use batch_losses for "
                f"{self.kind} tasks."
            )
        outputs = self.batch_outputs(params, batch)
        return (jnp.argmax(outputs, axis=-1) == batch["y"]).astype(jnp.float32)


def flax_task_of(fn: Any) -> Task | None:
    """The :class:`~unlearn_jax.core.task.Task` behind ``fn`` when the per-layer statistics apply:
    ``fn`` is such a task with a Flax module, or its bound ``loss`` / ``outputs``; else ``None``."""
    if isinstance(fn, Task):
        return fn if fn.module is not None else None
    owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    if isinstance(owner, Task) and owner.module is not None and func in (Task.loss, Task.outputs):
        return owner
    return None


def flax_task(module: Any, kind: str = CLASSIFICATION) -> Task:
    """A :class:`Task` for a Flax linen module whose parameters are the ``"params"`` collection."""
    return Task(
        apply=lambda params, x: module.apply({"params": params}, x), kind=kind, module=module
    )
