r"""A small residual network normalised per example (GroupNorm / LayerNorm), never with BatchNorm.

Why no BatchNorm: unlearning works on per-example quantities (per-example gradients, per-example
losses for membership inference, influence of ONE example), computed by ``jax.vmap`` over a batch.
A BatchNorm output depends on the mean and variance of the whole batch, so the "output of example
``i``" is a function of the other examples too: under ``vmap`` each example would be normalised by
its own statistics (a batch of one, variance 0), which is a different function from the one trained,
and the per-example gradient :math:`\nabla_\theta \ell(f_\theta(x_i), y_i)` is not even defined
without saying which batch ``x_i`` sat in. BatchNorm also carries running averages in a second
variable collection (``batch_stats``) that every method would have to thread through and that leaks
statistics of the forgotten examples. GroupNorm and LayerNorm normalise each example with its own
statistics, so the network is an ordinary function of one input and every per-example quantity is
well defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax

from unlearn_jax import _validate
from unlearn_jax.models import _common

NORMS = ("group", "layer")


def _norm(
    kind: str, num_groups: int, channels: int, *, zero_init: bool = False, name: str | None = None
) -> nn.Module:
    """A per-example normalisation over ``[H, W, C]`` (all channels for ``"layer"``)."""
    groups = 1 if kind == "layer" else num_groups
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    if channels % groups:
        raise ValueError(
            f"GroupNorm needs num_groups to divide every width, got {num_groups=} and a layer with "
            f"{channels} channels; choose num_groups dividing all of the widths."
        )
    # GroupNorm with one group is LayerNorm over (H, W, C) of each example.
    return nn.GroupNorm(num_groups=groups, scale_init=scale_init, name=name)


class ResidualBlock(nn.Module):
    r"""``y = relu(x' + N_2(conv(relu(N_1(conv_s(x))))))`` with ``x'`` = ``x`` or a 1x1 projection.

    The second normalisation's scale starts at zero, so each block is the identity at
    initialisation (residual branches switched off), which keeps training of deeper stacks stable.
    """

    width: int
    stride: int
    norm: str
    num_groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = (self.stride, self.stride)
        h = nn.Conv(self.width, (3, 3), strides=s, padding="SAME", use_bias=False)(x)
        h = nn.relu(_norm(self.norm, self.num_groups, self.width)(h))
        h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(h)
        h = _norm(self.norm, self.num_groups, self.width, zero_init=True)(h)
        if x.shape[-1] != self.width or self.stride != 1:
            x = nn.Conv(self.width, (1, 1), strides=s, use_bias=False, name="projection")(x)
            x = _norm(self.norm, self.num_groups, self.width, name="projection_norm")(x)
        return nn.relu(x + h)


class ResNet(nn.Module):
    r"""Small pre-pooling ResNet: stem conv, stages of residual blocks, global average pool, head.

    Stage ``i`` holds ``stage_sizes[i]`` :class:`ResidualBlock` s of width ``widths[i]``; every stage
    after the first halves the spatial size in its first block (stride 2). ``features`` returns the
    globally average-pooled activations ``[B, widths[-1]]``; ``params["head"]`` is the linear layer on
    top of them.

    All normalisation is per example (see the module docstring for why BatchNorm is not offered), so
    the network has only the ``"params"`` collection and ``vmap`` over examples gives true
    per-example outputs and gradients.

    Shapes: ``x [B, H, W]`` or ``[B, H, W, C]`` ``-> logits [B, num_outputs]``.

    Attributes:
      num_outputs: ``K``, the number of classes.
      stage_sizes: residual blocks per stage.
      widths: channels per stage (same length as ``stage_sizes``).
      norm: ``"group"`` (GroupNorm with ``num_groups`` groups) or ``"layer"`` (LayerNorm over
        ``H, W, C`` of each example, i.e. GroupNorm with one group).
      num_groups: GroupNorm groups; must divide every width.
    """

    num_outputs: int
    stage_sizes: Sequence[int] = (1, 1, 1)
    widths: Sequence[int] = (16, 32, 64)
    norm: str = "group"
    num_groups: int = 8
    kind: ClassVar[str] = "classification"

    def setup(self):
        _validate.positive_int(num_outputs=self.num_outputs, num_groups=self.num_groups)
        _validate.one_of("norm", self.norm, NORMS)
        stages = _common.check_sizes("stage_sizes", self.stage_sizes, allow_empty=False)
        widths = _common.check_sizes("widths", self.widths, allow_empty=False)
        if len(stages) != len(widths):
            raise ValueError(
                f"stage_sizes and widths must have the same length (one width per stage), got "
                f"stage_sizes={stages} and widths={widths}."
            )
        self.stem = nn.Conv(widths[0], (3, 3), padding="SAME", use_bias=False)
        self.stem_norm = _norm(self.norm, self.num_groups, widths[0])
        self.blocks = [
            ResidualBlock(width, 2 if (i > 0 and j == 0) else 1, self.norm, self.num_groups)
            for i, (n, width) in enumerate(zip(stages, widths, strict=True))
            for j in range(n)
        ]
        self.head = nn.Dense(self.num_outputs)

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled activations ``[B, widths[-1]]`` of images ``x [B, H, W(, C)]``."""
        h = _common.as_images(_common.to_float(x), "ResNet")
        h = nn.relu(self.stem_norm(self.stem(h)))
        for block in self.blocks:
            h = block(h)
        return h.mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[B, K]`` of a batch of images."""
        return self.head(self.features(x))
