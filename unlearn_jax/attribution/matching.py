"""Oracle matching and DMM built from populations of models: the glue a benchmark needs.

:func:`~unlearn_jax.methods.matching.oracle_matching` and :func:`~unlearn_jax.methods.matching.dmm`
take target tables; this module makes them from what a benchmark holds: retrained oracles (their
mean logits on the training set) and original models (TRAK's per-class scores of the training set,
computed once per set of originals, cached on disk, then summed over each request's forget rows).

Example (the bench's populations, a cache directory)::

    context = MatchingContext(task, splits.train, originals.params, oracles.params,
                              cache_dir=cache)
    om = context.oracle_matching(models=seeds)               # mean logits of 10 oracles
    method = context.dmm(split.forget, models=seeds)         # scores computed on the first call
    unlearn_many(method, originals, task, split.forget, split.retain, key=key, batch_size=128)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.attribution.features import kronecker
from unlearn_jax.attribution.trak import TRAK, ScoreStore, TRAKSpec
from unlearn_jax.core.task import Task
from unlearn_jax.methods.matching import dmm, oracle_matching
from unlearn_jax.methods.protocol import Unlearner


@functools.cache
def _stacked_apply(task: Task):
    return jax.jit(jax.vmap(task.apply, in_axes=(0, None)))


def mean_logits(task: Task, stacked_params: Any, x: Any, *, batch_size: int = 512) -> np.ndarray:
    r"""Mean logits :math:`\frac1K \sum_k z(x; \theta_k)` of ``K`` stacked models, ``[N, C]``.

    Args:
      task: the models' task.
      stacked_params: parameters with a leading model axis ``K``.
      x: inputs ``[N, ...]``, evaluated ``batch_size`` rows at a time.
    """
    _validate.positive_int(batch_size=batch_size)
    x = np.asarray(x)
    apply = _stacked_apply(task)
    parts = [
        np.asarray(apply(stacked_params, x[start : start + batch_size]), np.float64).mean(axis=0)
        for start in range(0, x.shape[0], batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


class MatchingContext:
    """Builds OM and DMM for requests on one training set (module docstring).

    Args:
      task: the models' task (a classifier).
      train: the training :class:`~unlearn_jax.data.Dataset` (targets cover all of it).
      originals: stacked parameters of the original models (TRAK's checkpoints for DMM).
      oracles: stacked parameters of models retrained without the forget set (OM), or ``None``.
      num_oracles: OM's ``K``, the oracles whose mean logits are the targets (10 in the paper).
      num_checkpoints: TRAK's checkpoints, the first originals (16).
      spec: TRAK's :class:`~unlearn_jax.attribution.TRAKSpec` (default: 16 x 16 Kronecker
        projections per layer, lambda = 0.1 mean diag, the curvature-weighted (Newton) form,
        whose predicted effects have the scale of actual ones, so DMM's c = 1 applies).
      cache_dir: TRAK's cache (``None``: in memory; the per-class score matrix is ``n x n x C``
        float32, 83 MB for digits).
    """

    def __init__(
        self,
        task: Task,
        train: Any,
        originals: Any,
        oracles: Any = None,
        *,
        num_oracles: int = 10,
        num_checkpoints: int = 16,
        spec: TRAKSpec | None = None,
        cache_dir: str | Path | None = None,
    ):
        _validate.positive_int(num_oracles=num_oracles, num_checkpoints=num_checkpoints)
        self.task, self.train = task, train
        self.originals, self.oracles = originals, oracles
        self.num_oracles, self.num_checkpoints = num_oracles, num_checkpoints
        self.spec = spec or TRAKSpec(kronecker(16, 16), lam=0.1, relative_lam=True, curvature=True)
        self.cache_dir = cache_dir

    @functools.cached_property
    def oracle_logits(self) -> np.ndarray:
        """``[n, C]`` mean logits of the first ``num_oracles`` oracles on the training set."""
        if self.oracles is None:
            raise ValueError("oracle matching needs retrained oracles: pass oracles=...")
        first = jax.tree_util.tree_map(lambda a: a[: self.num_oracles], self.oracles)
        return mean_logits(self.task, first, self.train.x)

    @functools.cached_property
    def scores(self) -> ScoreStore:
        """Per-class TRAK scores ``[n, n, C]`` of the training set (computed on first use)."""
        first = jax.tree_util.tree_map(lambda a: a[: self.num_checkpoints], self.originals)
        trak = TRAK(self.task, first, self.train, self.spec, cache_dir=self.cache_dir, stacked=True)
        return trak.scores(self.train, per_class=True)

    def oracle_matching(self, *, models: int | None = None, **hparams: Any) -> Unlearner:
        """:func:`~unlearn_jax.methods.matching.oracle_matching` towards :attr:`oracle_logits`."""
        return oracle_matching((self.train.ids, self.oracle_logits), models=models, **hparams)

    def dmm(self, forget: Any, *, models: int | None = None, **hparams: Any) -> Unlearner:
        """:func:`~unlearn_jax.methods.matching.dmm` for the request ``forget`` (a dataset or ids):
        the sum of :attr:`scores` over its rows."""
        ids = np.asarray(getattr(forget, "ids", forget))
        effects = (self.scores.query_ids, self.scores.sum_rows(ids))
        return dmm(effects, forget_ids=ids, models=models, **hparams)


__all__ = ["MatchingContext", "mean_logits"]
