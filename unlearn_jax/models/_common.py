"""Pieces shared by the model definitions: input shaping and hyper-parameter checks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from unlearn_jax import _validate


def flatten(x: jax.Array) -> jax.Array:
    """``[B, d1, d2, ...] -> [B, d1 * d2 * ...]``; a ``[B]`` input becomes ``[B, 1]``."""
    if x.ndim == 0:
        raise ValueError(
            "model input is a scalar; expected a batch of inputs with a leading batch axis, "
            "e.g. x[None] for one example."
        )
    return x.reshape(x.shape[0], -1)


def as_images(x: jax.Array, model_name: str) -> jax.Array:
    """``[B, H, W] -> [B, H, W, 1]``; ``[B, H, W, C]`` passes through; anything else is an error."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        return x
    raise ValueError(
        f"{model_name} expects images of shape [B, H, W] or [B, H, W, C] (channels last), got an "
        f"input of shape {tuple(x.shape)}. Flat inputs [B, D] need a reshape to [B, H, W, C] first, "
        "or use the 'mlp' or 'linear' model."
    )


def check_sizes(name: str, sizes: Sequence[int], *, allow_empty: bool) -> tuple[int, ...]:
    """Validates a sequence of layer sizes (each an int >= 1) and returns it as a tuple."""
    sizes = tuple(sizes)
    if not sizes and not allow_empty:
        raise ValueError(f"{name} must hold at least one size, got {name}={sizes!r}.")
    for i, s in enumerate(sizes):
        _validate.positive_int(**{f"{name}[{i}]": s})
    return sizes


def to_float(x: jax.Array) -> jax.Array:
    """Integer or boolean inputs (e.g. raw pixel values) become float32; floats pass through."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.float32)
    return x
