r"""Model output functions for attribution: what a training example's influence is measured on.

TRAK attributes a scalar output :math:`f(z; \theta)` of the model, chosen so that the loss is a
function of it, :math:`\ell(z; \theta) = L(f(z; \theta))`. Its gradient :math:`\nabla_\theta f`
is the per-example feature, and :math:`Q = -\partial \ell / \partial f` (TRAK's "out-to-loss"
weight) scales each training example's score.

====================  ============================================================  ===============
name                  :math:`f` per example (outputs ``[B, K]`` or ``[B, T, V]``)   :math:`Q`
====================  ============================================================  ===============
``"margin"``          :math:`z_y - \log\sum_{k \ne y} e^{z_k}` (classification)     :math:`1 - p_y`
``"logit"``           :math:`z_y`, ``y`` the class to read (per-class queries)      (queries only)
``"log_likelihood"``  :math:`\sum_t w_t \log \mathrm{softmax}(z_t)_{y_t}` (sequence)  :math:`1`
``"prediction"``      :math:`f(x)` of a one-output regressor                        :math:`y - f(x)`
====================  ============================================================  ===============

For the margin, :math:`p_y = \sigma(f)` and :math:`\ell = -\log \sigma(f)`, so
:math:`Q = 1 - \sigma(f) = \sigma(-f)`; for the log-likelihood :math:`\ell = -f` and :math:`Q = 1`;
for a regressor with :math:`\ell = \tfrac12 (f - y)^2`, :math:`Q = y - f` (the residual). The
curvature :math:`R = \partial^2\ell/\partial f^2` (:meth:`OutputFunction.curvature`) is
:math:`p_y(1 - p_y)` for the margin and 1 for the prediction.

Each function is a frozen dataclass, so it is hashable and compiled statistics keyed on it
(:mod:`unlearn_jax.core.layer_stats`) are reused across calls.

References:
  Park, Georgiev, Ilyas, Leclerc, Madry. TRAK: Attributing Model Behavior at Scale. ICML 2023
  (arXiv:2303.14186), section 3 and appendix on the choice of the model output function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unlearn_jax import _validate
from unlearn_jax.core.task import CLASSIFICATION, REGRESSION, SEQUENCE, Task

Batch = dict[str, Any]

MARGIN = "margin"
LOGIT = "logit"
LOG_LIKELIHOOD = "log_likelihood"
PREDICTION = "prediction"
OUTPUTS = (MARGIN, LOGIT, LOG_LIKELIHOOD, PREDICTION)
# The task kinds each output function reads.
_KINDS = {
    MARGIN: (CLASSIFICATION,),
    LOGIT: (CLASSIFICATION,),
    LOG_LIKELIHOOD: (SEQUENCE,),
    PREDICTION: (REGRESSION,),
}


@dataclasses.dataclass(frozen=True)
class OutputFunction:
    """``f(outputs, batch) -> [B]``: the scalar model output attribution differentiates.

    Attributes:
      name: one of :data:`OUTPUTS` (module docstring).
    """

    name: str

    def __post_init__(self):
        _validate.one_of("output function", self.name, OUTPUTS)

    def __call__(self, outputs: jax.Array, batch: Batch) -> jax.Array:
        """Per-example outputs ``[B]`` from model outputs and the batch's targets ``batch["y"]``."""
        if self.name == MARGIN:
            return margins(outputs, batch["y"])
        if self.name == LOGIT:
            return jnp.take_along_axis(outputs, batch["y"][:, None], axis=-1)[:, 0]
        if self.name == LOG_LIKELIHOOD:
            token_ll = -optax.softmax_cross_entropy_with_integer_labels(outputs, batch["y"])
            weights = batch.get("weights")
            if weights is None:
                return jnp.sum(token_ll, axis=-1)
            return jnp.sum(weights.astype(token_ll.dtype) * token_ll, axis=-1)
        if outputs.ndim != 2 or outputs.shape[1] != 1:
            raise ValueError(
                f"the 'prediction' output needs a regressor with one output, [B, 1]; got outputs of "
                f"shape {tuple(outputs.shape)}."
            )
        return outputs[:, 0]

    def curvature(self, values: jax.Array, batch: Batch) -> jax.Array:
        r"""The loss's curvature in the output, :math:`R = \partial^2\ell/\partial f^2`, ``[B]``:
        :math:`p_y (1 - p_y) = Q (1 - Q)` for the margin, 1 for a regressor's prediction.

        Raises:
          ValueError: for ``"log_likelihood"`` (the loss :math:`-f` is linear in :math:`f`) and
            ``"logit"`` (no loss is a function of one logit).
        """
        del batch
        if self.name == MARGIN:
            return jax.nn.sigmoid(values) * jax.nn.sigmoid(-values)
        if self.name == PREDICTION:
            return jnp.ones_like(values)
        raise ValueError(
            f"the {self.name!r} output has no curvature weights (its loss is linear in it, or it is "
            "a query output); use TRAKSpec(curvature=False)."
        )

    def out_to_loss(self, values: jax.Array, batch: Batch) -> jax.Array:
        r"""TRAK's weights :math:`Q = -\partial\ell/\partial f`, ``[B]``, from ``values = f [B]``.

        Raises:
          ValueError: for ``"logit"``, which is a query output only (no loss is a function of it).
        """
        if self.name == MARGIN:
            return jax.nn.sigmoid(-values)
        if self.name == LOG_LIKELIHOOD:
            return jnp.ones_like(values)
        if self.name == PREDICTION:
            return jnp.reshape(batch["y"], values.shape).astype(values.dtype) - values
        raise ValueError(
            "the 'logit' output reads one class's logit for per-class queries; training features "
            "need an output the loss is a function of ('margin' for a classifier)."
        )


def margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Margins :math:`z_y - \log\sum_{k \ne y} e^{z_k}`, ``[B]``, of logits ``[B, K]`` (``K >= 2``).

    Equal to :math:`\log p_y - \log(1 - p_y)`, computed from the logits so that it stays exact where
    :math:`p_y` rounds to 0 or 1 (the same quantity as
    :func:`unlearn_jax.evaluation.mia.logit_margins`, in JAX).
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"margins need at least 2 classes, got logits of shape {logits.shape}.")
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    is_label = jnp.arange(logits.shape[-1])[None, :] == labels[:, None]
    others = jnp.where(is_label, -jnp.inf, logits)
    return z_y - jax.nn.logsumexp(others, axis=-1)


def default_output(task: Task) -> str:
    """The training output function of a task kind: margin, log-likelihood or prediction."""
    return {CLASSIFICATION: MARGIN, SEQUENCE: LOG_LIKELIHOOD, REGRESSION: PREDICTION}[task.kind]


def check_output(task: Task, name: str) -> OutputFunction:
    """The :class:`OutputFunction` ``name`` after checking that it reads ``task``'s kind.

    Raises:
      ValueError: an unknown name, or one that does not fit the task (a margin of a regressor).
    """
    function = OutputFunction(name)
    if task.kind not in _KINDS[name]:
        raise ValueError(
            f"the {name!r} output applies to {' or '.join(_KINDS[name])} tasks; the task is "
            f"{task.kind!r} (use {default_output(task)!r})."
        )
    return function


__all__ = [
    "LOGIT",
    "LOG_LIKELIHOOD",
    "MARGIN",
    "OUTPUTS",
    "PREDICTION",
    "OutputFunction",
    "check_output",
    "default_output",
    "margins",
]
