"""Small problems shared by the attribution tests (one set of compiled programs for all of them)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.core.task import flax_task
from unlearn_jax.data import Dataset

N = 6  # rows of every featurization batch


class TinyMLP(nn.Module):
    """4 -> 5 (tanh) -> 3. Flax names the layers in construction order: ``Dense_0`` is the output
    layer, ``Dense_1`` the hidden one, which runs first."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


def mlp_params(seed=0, scale=1.0):
    """Parameters drawn with numpy (no initialiser to compile)."""
    rng = np.random.default_rng(seed)

    def dense(d_in, d_out):
        return {
            "bias": jnp.asarray(rng.normal(size=d_out) * 0.1 * scale, jnp.float32),
            "kernel": jnp.asarray(rng.normal(size=(d_in, d_out)) * scale, jnp.float32),
        }

    return {"Dense_0": dense(5, 3), "Dense_1": dense(4, 5)}


@functools.cache
def mlp_task():
    return flax_task(TinyMLP())


def dataset(n, seed, offset=0, classes=3):
    rng = np.random.default_rng(seed)
    return Dataset(
        x=rng.normal(size=(n, 4)),
        y=rng.integers(0, classes, n),
        ids=np.arange(offset, offset + n),
        num_classes=classes,
    )


def documented_matrix(key, leaf, role, rows, k):
    """The Rademacher projection matrix as ``core.layer_stats`` documents it, transcribed: rows
    ``[j R, (j + 1) R)``, ``R = 2**14 // k``, from ``bits(fold_in(fold_in(key, leaf), role * 2**24
    + j), (2**14,))``, +1 where a word's lowest bit is set, -1 elsewhere, over sqrt(k)."""
    per_block = 2**14 // k
    blocks = []
    for j in range(math.ceil(rows / per_block)):
        block_key = jax.random.fold_in(jax.random.fold_in(key, leaf), role * 2**24 + j)
        words = np.asarray(jax.random.bits(block_key, (2**14,), jnp.uint32))
        words = words[: per_block * k].reshape(per_block, k)
        blocks.append(np.where(words & 1, 1.0, -1.0))
    return np.concatenate(blocks)[:rows] / np.sqrt(k)
