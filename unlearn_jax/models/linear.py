"""Linear model (multinomial logistic regression for classification, least squares for regression)."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from unlearn_jax import _validate
from unlearn_jax.models import _common


class Linear(nn.Module):
    r"""One dense layer on the flattened input: :math:`f(x) = W^\top \operatorname{vec}(x) + b`.

    With a classification task this is multinomial logistic regression (softmax cross-entropy on
    the logits ``f(x)``); with a regression task, linear least squares. Its loss is convex in the
    parameters, which makes it the reference model for the exact and certified unlearning methods
    (Newton removal, influence functions).

    Shapes: ``x [B, ...] -> logits [B, num_outputs]``; parameters ``head/kernel [D, K]`` and
    ``head/bias [K]`` with ``D = prod(x.shape[1:])``.

    Attributes:
      num_outputs: ``K``, the number of classes (or regression targets).
    """

    num_outputs: int
    kind: ClassVar[str] = "classification"

    def setup(self):
        _validate.positive_int(num_outputs=self.num_outputs)
        self.head = nn.Dense(self.num_outputs)

    def features(self, x: jax.Array) -> jax.Array:
        """The input the head sees: the flattened input ``[B, D]`` (no trainable backbone)."""
        return _common.flatten(_common.to_float(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[B, K]`` of a batch of inputs ``x [B, ...]``."""
        return self.head(self.features(x))
