"""A small convolutional network for small grey-scale or colour images (8x8 digits, 28x28 MNIST)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax

from unlearn_jax import _validate
from unlearn_jax.models import _common


class CNN(nn.Module):
    r"""``[conv 3x3 -> ReLU -> max-pool 2x2] x len(channels) -> dense -> ReLU -> head``.

    Each convolution keeps the spatial size (``SAME`` padding) and each pooling halves it, rounding
    up, so an ``H x W`` image reaches the dense layer as
    ``ceil(H / 2^L) x ceil(W / 2^L) x channels[-1]`` with ``L = len(channels)``: with the defaults,
    ``2 x 2 x 64`` for 8x8 digits and ``7 x 7 x 64`` for 28x28 MNIST.

    ``features`` returns the dense layer's activations ``[B, dense_size]``; ``params["head"]`` is the
    linear layer on top of them.

    Shapes: ``x [B, H, W]`` or ``[B, H, W, C]`` (channels last) ``-> logits [B, num_outputs]``.

    The defaults reach about 98% test accuracy on the scikit-learn digits (97.5-98.3% over six
    seeds) with 15 epochs of Adam, learning rate 3e-3, batch 64: about 2 s of CPU time once compiled.

    Attributes:
      num_outputs: ``K``, the number of classes.
      channels: output channels of the convolution blocks, in order (at least one block).
      dense_size: width of the dense layer between the convolutions and the head.
    """

    num_outputs: int
    channels: Sequence[int] = (32, 64)
    dense_size: int = 256
    kind: ClassVar[str] = "classification"

    def setup(self):
        _validate.positive_int(num_outputs=self.num_outputs, dense_size=self.dense_size)
        channels = _common.check_sizes("channels", self.channels, allow_empty=False)
        self.convs = [nn.Conv(c, kernel_size=(3, 3), padding="SAME") for c in channels]
        self.dense = nn.Dense(self.dense_size)
        self.head = nn.Dense(self.num_outputs)

    def features(self, x: jax.Array) -> jax.Array:
        """Activations of the dense layer, ``[B, dense_size]``, for images ``x [B, H, W(, C)]``."""
        h = _common.as_images(_common.to_float(x), "CNN")
        for conv in self.convs:
            h = nn.max_pool(nn.relu(conv(h)), window_shape=(2, 2), strides=(2, 2), padding="SAME")
        return nn.relu(self.dense(_common.flatten(h)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[B, K]`` of a batch of images."""
        return self.head(self.features(x))
