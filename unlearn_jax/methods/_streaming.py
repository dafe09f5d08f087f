"""Streaming reductions over a whole :class:`~unlearn_jax.data.Dataset` shared by the curvature methods."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.partial(jax.jit, static_argnames=("task",))
def _weighted_grad_sum(params, batch, weights, *, task):
    """``sum_i w_i grad l(z_i)`` of one (padded) batch; padding rows have weight 0."""
    return jax.grad(lambda p: jnp.sum(weights * task.batch_losses(p, batch)))(params)


def mean_loss_grad(task, params: Any, dataset, batch_size: int) -> Any:
    r""":math:`\frac1n \sum_{i=1}^n \nabla \ell(z_i; \theta)` over a dataset, ``batch_size`` at a time.

    Every batch is padded to exactly ``batch_size`` rows (weight 0 on the padding), so one compiled
    program serves every batch, every dataset and every call with the same task and batch size. The
    result does not depend on ``batch_size`` (up to summation order).
    """
    x, y = np.asarray(dataset.x), np.asarray(dataset.y)
    n = x.shape[0]
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    total = None
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        pad = batch_size - rows
        batch = {
            "x": jnp.asarray(
                np.concatenate([x[start : start + rows], np.zeros((pad, *x.shape[1:]), x.dtype)])
            ),
            "y": jnp.asarray(
                np.concatenate([y[start : start + rows], np.zeros((pad, *y.shape[1:]), y.dtype)])
            ),
        }
        weights = jnp.asarray(np.arange(batch_size) < rows, dtype)
        part = _weighted_grad_sum(params, batch, weights, task=task)
        total = part if total is None else optax.tree.add(total, part)
    return optax.tree.scale(1.0 / n, total)
