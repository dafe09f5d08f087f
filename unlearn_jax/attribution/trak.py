r"""TRAK scores in pure JAX: per checkpoint, averaged over checkpoints, written and read in blocks.

For checkpoints :math:`\theta_1, \dots, \theta_M` of one model (e.g. the seeds of one
:func:`~unlearn_jax.training.fit_many`) and a training set of ``n`` examples, checkpoint ``m`` has

* training features :math:`\Phi_m \in \mathbb{R}^{n \times k}` (row :math:`\phi^m_i`, the projected
  gradient of the training output function, :mod:`~unlearn_jax.attribution.features`),
* out-to-loss weights :math:`Q^m_i = -\partial\ell/\partial f` (:math:`1 - p_i` for the margin),
* :math:`A_m = (\Phi_m^\top \Phi_m + \lambda I)^{-1}`,

and a query :math:`z_j` has features :math:`\psi^m_j` (of the same output function, or of each
class's logit for per-class scores). The score of training example ``i`` for query ``j`` is

.. math:: \tau_{ij} = \bar Q_i \cdot \frac1M \sum_{m=1}^M \phi^m_i{}^\top A_m \psi^m_j,
          \qquad \bar Q_i = \frac1M \sum_m Q^m_i,

TRAK's estimator: the kernel part and the weights are averaged over checkpoints separately (as
the reference implementation's ``finalize_scores`` does; the paper's optional soft-thresholding
is not applied). ``TRAKSpec(curvature=True)`` uses :math:`A_m = (\Phi_m^\top R_m \Phi_m +
\lambda I)^{-1}` instead, :math:`R_i = p_i (1 - p_i)`: the one-step Newton step of the linearised
logistic model before TRAK's simplification :math:`R = I`. On the digits MLP both rank alike, but
only the weighted form has the scale of actual changes: the predicted change of the logits when
10% of the training set is removed regresses on the actual one (64 retrained models) with slope
1.1, against about 30 for the unweighted scores. :math:`\tau_{ij}` predicts the change of query ``j``'s output when example ``i``
is added to the training set (removing it changes the output by about :math:`-\tau_{ij}`); for a
least-squares model with the identity projection it is exactly the one-step (Newton) influence
:math:`\phi_i^\top (\Phi^\top\Phi + \lambda I)^{-1} \psi_j\,(y_i - f_i)`, which leave-one-out
refitting equals after the leverage factor :math:`1 / (1 - \phi_i^\top A \phi_i)`.

Storage. With a ``cache_dir``, each checkpoint's features, weights, output values and
:math:`\Phi^\top\Phi` are written once (memory-mapped ``.npy`` next to a ``meta.json`` holding
their configuration and digests of the parameters and the data) and found again by later
:class:`TRAK` objects over any subset of the checkpoints; the inverse is cached per
:math:`\lambda`. :meth:`TRAK.scores` computes the ``[n, n_q]`` matrix (``[n, n_q, K]`` per class) in
blocks of training rows and query columns, each block written once into a memory map, so a
:math:`10^5 \times 10^4` matrix is never in memory whole; :class:`ScoreStore` reads it back in
row blocks (row sums for datamodel predictions, masked sums for the LDS).

References:
  Park, Georgiev, Ilyas, Leclerc, Madry. TRAK: Attributing Model Behavior at Scale. ICML 2023
  (arXiv:2303.14186); its reference implementation MadryLab/trak (``finalize_scores``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from unlearn_jax import _validate
from unlearn_jax.attribution import _store
from unlearn_jax.attribution import features as _features
from unlearn_jax.attribution import outputs as _outputs
from unlearn_jax.attribution.features import FeatureSpec
from unlearn_jax.core.task import Task

Params = Any

# Elements one block of a buffer may hold (64 MiB of float32).
_BLOCK_BUDGET = 2**24


@dataclasses.dataclass(frozen=True)
class TRAKSpec:
    r"""How TRAK featurizes and regularises (the module docstring has the formulas).

    Attributes:
      features: the :class:`~unlearn_jax.attribution.features.FeatureSpec` (projection, dtype,
        seed).
      lam: :math:`\lambda \ge 0` added to the diagonal of :math:`\Phi^\top\Phi` (TRAK's default
        is 0; a projection wider than the number of training examples needs :math:`\lambda > 0`).
      relative_lam: if True, :math:`\lambda` is ``lam`` times the mean diagonal of
        :math:`\Phi_m^\top\Phi_m` (per checkpoint): one setting for every projection size.
      curvature: if True, weight the Gram matrix by the loss's curvature in the output,
        :math:`A_m = (\Phi_m^\top R_m \Phi_m + \lambda I)^{-1}` with :math:`R_i = p_i(1 - p_i)`
        for the margin (:meth:`~unlearn_jax.attribution.outputs.OutputFunction.curvature`): the
        one-step Newton influence of a logistic model, which TRAK derives and then simplifies to
        :math:`R = I` (its section 3). The simplification keeps the ranking roughly (the LDS) but
        not the scale: with :math:`p_i \approx 1` on the training set, :math:`Q_i` shrinks the
        scores while :math:`R` is no longer there to compensate. Predictions of actual changes
        (DMM's targets) need the weighted form (module docstring).
      output: the training output function (default: the task's, e.g. the margin).
      batch_size: rows per featurization step.
    """

    features: FeatureSpec = dataclasses.field(default_factory=FeatureSpec)
    lam: float = 0.0
    relative_lam: bool = False
    curvature: bool = False
    output: str | None = None
    batch_size: int = 256

    def __post_init__(self):
        if not isinstance(self.features, FeatureSpec):
            raise TypeError(f"features must be a FeatureSpec, got {type(self.features).__name__}.")
        _validate.non_negative(lam=self.lam)
        _validate.positive_int(batch_size=self.batch_size)
        if self.output is not None:
            _validate.one_of("output", self.output, _outputs.OUTPUTS)


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    features: Any  # [n, k], storage dtype
    values: np.ndarray  # [n]
    out_to_loss: np.ndarray  # [n]
    gram: np.ndarray  # [k, k] float64
    curvature_gram: np.ndarray | None  # [k, k] float64, Phi^T R Phi
    digest: str
    directory: Path | None


def _checkpoint(task, params, train, spec: TRAKSpec, output: str, root: Path | None, data_digest):
    """Featurizes one checkpoint, or finds it in the cache."""
    fspec = spec.features
    key = _store.digest(
        "trak-features-v2",
        _model_id(task),
        fspec.describe(),
        output,
        data_digest,
        _store.params_digest(params),
    )
    if root is None:
        result = _features.featurize(
            task, params, train, fspec, output=output, batch_size=spec.batch_size, gram=True
        )
        return _Checkpoint(
            result.features,
            result.values,
            result.out_to_loss,
            result.gram,
            result.curvature_gram,
            key,
            None,
        )
    directory = root / f"features-{key[:24]}"
    meta = _store.read_meta(directory)
    if meta is None:
        directory.mkdir(parents=True, exist_ok=True)
        k = _features.feature_dim(task, params, train.x, fspec)
        out = _store.create(directory / "features.npy", (len(train), k), fspec.storage_dtype)
        result = _features.featurize(
            task,
            params,
            train,
            fspec,
            output=output,
            batch_size=spec.batch_size,
            gram=True,
            out=out,
        )
        _store.commit(out, directory / "features.npy")
        del out
        _store.save(directory / "values.npy", result.values)
        _store.save(directory / "out_to_loss.npy", result.out_to_loss)
        _store.save(directory / "gram.npy", result.gram)
        if result.curvature_gram is not None:
            _store.save(directory / "curvature_gram.npy", result.curvature_gram)
        meta = {
            "kind": "trak-features",
            "digest": key,
            "features": fspec.describe(),
            "output": output,
            "data": data_digest,
            "n": len(train),
            "k": k,
        }
        _store.write_meta(directory, meta)
    return _Checkpoint(
        _store.load(directory / "features.npy", fspec.storage_dtype),
        np.asarray(_store.load(directory / "values.npy")),
        np.asarray(_store.load(directory / "out_to_loss.npy")),
        np.asarray(_store.load(directory / "gram.npy")),
        _load_optional(directory / "curvature_gram.npy"),
        key,
        directory,
    )


def _load_optional(path: Path) -> np.ndarray | None:
    return np.asarray(_store.load(path)) if path.exists() else None


def _model_id(task: Task) -> str:
    """What identifies the model besides its parameters: the Flax module's repr (its class and
    attributes), or the qualified name of ``apply`` for a task without a module."""
    if task.module is not None:
        return f"{type(task.module).__module__}.{task.module!r}|{task.kind}"
    return f"{getattr(task.apply, '__module__', '')}.{getattr(task.apply, '__qualname__', '')}"


def _unstack(checkpoints: Any, stacked: bool) -> list[Params]:
    if stacked:
        leaves = jax.tree_util.tree_leaves(checkpoints)
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"stacked checkpoints need one leading model axis on every leaf; sizes {sizes}."
            )
        (m,) = sizes
        return [jax.tree_util.tree_map(lambda a, i=i: a[i], checkpoints) for i in range(m)]
    if isinstance(checkpoints, dict) or not isinstance(checkpoints, Sequence):
        raise TypeError(
            "checkpoints must be a list of parameter pytrees, or one stacked pytree with "
            "stacked=True (e.g. fit_many(...)[0].params)."
        )
    if not checkpoints:
        raise ValueError("checkpoints is empty; TRAK needs at least one model.")
    return list(checkpoints)


class TRAK:
    """TRAK attribution of one model's checkpoints on one training set (module docstring).

    Featurizes every checkpoint on construction (or finds it in ``cache_dir``); :meth:`scores`
    then scores any queries.

    Args:
      task: the model's :class:`~unlearn_jax.Task`.
      checkpoints: a list of parameter pytrees, or one stacked pytree (``stacked=True``), e.g.
        ``fit_many(...)[0].params``.
      train: the training :class:`~unlearn_jax.data.Dataset` (its row order is the scores' row
        order).
      spec: a :class:`TRAKSpec`.
      cache_dir: a directory for the cache (``None``: everything in memory).
      stacked: ``checkpoints`` carry a leading model axis.

    Raises:
      ValueError: an empty list, an output function that does not fit the task, a singular
        :math:`\\Phi^\\top\\Phi + \\lambda I` (when the inverse is first needed).
    """

    def __init__(
        self,
        task: Task,
        checkpoints: Any,
        train: Any,
        spec: TRAKSpec = TRAKSpec(),
        *,
        cache_dir: str | Path | None = None,
        stacked: bool = False,
    ):
        if not isinstance(spec, TRAKSpec):
            raise TypeError(f"spec must be a TRAKSpec, got {type(spec).__name__}.")
        self.task = task
        self.spec = spec
        self.train = train
        self.output = spec.output or _outputs.default_output(task)
        _outputs.check_output(task, self.output)
        if spec.curvature and self.output not in (_outputs.MARGIN, _outputs.PREDICTION):
            raise ValueError(
                f"TRAKSpec(curvature=True) needs an output whose loss curves in it (the margin, a "
                f"prediction); the {self.output!r} loss is linear in it."
            )
        if len(train) == 0:
            raise ValueError(f"{train.name or 'train'} is empty.")
        self.params = _unstack(checkpoints, stacked)
        self.root = None if cache_dir is None else Path(cache_dir)
        self.data_digest = _store.dataset_digest(train)
        self._checkpoints = [
            _checkpoint(task, p, train, spec, self.output, self.root, self.data_digest)
            for p in self.params
        ]
        self._inverses: dict[int, np.ndarray] = {}

    # ---- per checkpoint ------------------------------------------------------------------------
    @property
    def num_checkpoints(self) -> int:
        return len(self._checkpoints)

    @property
    def dim(self) -> int:
        """``k``, the number of features per example."""
        return int(self._checkpoints[0].features.shape[1])

    def features(self, m: int) -> Any:
        """Training features :math:`\\Phi_m`, ``[n, k]`` (storage dtype; a memory map when cached)."""
        return self._checkpoints[m].features

    def values(self, m: int) -> np.ndarray:
        """Training output values :math:`f(z_i; \\theta_m)`, ``[n]``."""
        return self._checkpoints[m].values

    def out_to_loss(self, m: int | None = None) -> np.ndarray:
        """:math:`Q^m`, ``[n]``, or their mean :math:`\\bar Q` over checkpoints (``m=None``)."""
        if m is not None:
            return self._checkpoints[m].out_to_loss
        return np.mean([c.out_to_loss for c in self._checkpoints], axis=0, dtype=np.float64)

    def gram(self, m: int) -> np.ndarray:
        """:math:`\\Phi_m^\\top\\Phi_m`, or :math:`\\Phi_m^\\top R_m \\Phi_m` with ``curvature``,
        ``[k, k]`` float64."""
        ckpt = self._checkpoints[m]
        return ckpt.curvature_gram if self.spec.curvature else ckpt.gram

    def lam(self, m: int) -> float:
        """The :math:`\\lambda` of checkpoint ``m`` (absolute, after ``relative_lam``)."""
        if not self.spec.relative_lam:
            return float(self.spec.lam)
        return float(self.spec.lam * np.mean(np.diag(self.gram(m))))

    def inverse(self, m: int) -> np.ndarray:
        """:math:`A_m = (\\Phi_m^\\top\\Phi_m + \\lambda I)^{-1}`, ``[k, k]`` (computed in float64 by a
        Cholesky factorisation, stored in float32, or float64 for float64 features).

        Raises:
          ValueError: the matrix is not positive definite (raise ``lam``).
        """
        if m in self._inverses:
            return self._inverses[m]
        ckpt = self._checkpoints[m]
        lam = self.lam(m)
        dtype = np.float64 if self.spec.features.dtype == "float64" else np.float32
        path = None
        if ckpt.directory is not None:
            tag = _store.digest(lam, np.dtype(dtype).str, self.spec.curvature)[:16]
            path = ckpt.directory / f"inverse-{tag}.npy"
            if path.exists():
                self._inverses[m] = _store.load(path)
                return self._inverses[m]
        gram = self.gram(m)
        matrix = gram + lam * np.eye(gram.shape[0])
        try:
            factor = scipy.linalg.cho_factor(matrix, lower=True)
        except np.linalg.LinAlgError as error:
            raise ValueError(
                f"Phi^T Phi + lam I of checkpoint {m} is not positive definite (lam={lam:g}, "
                f"k={matrix.shape[0]}, n={len(self.train)}): raise TRAKSpec.lam (a projection "
                "wider than the training set needs lam > 0)."
            ) from error
        inverse = scipy.linalg.cho_solve(factor, np.eye(matrix.shape[0])).astype(dtype)
        if path is not None:
            _store.save(path, inverse)
            inverse = _store.load(path)
        self._inverses[m] = inverse
        return inverse

    # ---- scores --------------------------------------------------------------------------------
    def scores(
        self,
        queries: Any,
        *,
        per_class: bool = False,
        output: str | None = None,
        path: str | Path | None = None,
        block_train: int | None = None,
        block_queries: int | None = None,
    ) -> ScoreStore:
        r"""The scores :math:`\tau` of every training example for every query, in blocks.

        Args:
          queries: a :class:`~unlearn_jax.data.Dataset` of query examples (e.g. the test set, or
            the training set itself for datamodel predictions).
          per_class: score each class's logit instead (``[n, n_q, K]``): the per-class datamodels
            :math:`\beta_{i,j,:}` DMM predicts logits with.
          output: the queries' output function (default: the training one; ignored per class).
          path: the ``.npy`` file to write (default: in ``cache_dir``, keyed by the checkpoints,
            the spec and the queries, and reused when present; in memory without a cache).
          block_train, block_queries: rows and query columns per block (default: blocks of about
            64 MiB per buffer).

        Returns:
          A :class:`ScoreStore` over ``[n, n_q]`` (``[n, n_q, K]`` per class) float32 scores
          (float64 for float64 features), rows in the training set's order, columns in the
          queries' order.
        """
        _validate.positive_int(block_train=block_train, block_queries=block_queries)
        query_output = _outputs.LOGIT if per_class else (output or self.output)
        if not per_class:
            _outputs.check_output(self.task, query_output)
        n, k, m_count = len(self.train), self.dim, self.num_checkpoints
        n_q = len(queries)
        classes = self._classes() if per_class else 1
        if block_queries is None:
            block_queries = max(1, _BLOCK_BUDGET // (classes * k * m_count))
        block_queries = min(block_queries, n_q)
        if block_train is None:
            block_train = max(1, _BLOCK_BUDGET // max(k * m_count, block_queries * classes))
        block_train = min(block_train, n)
        shape = (n, n_q, classes) if per_class else (n, n_q)
        dtype = np.float64 if self.spec.features.dtype == "float64" else np.float32
        key = _store.digest(
            "trak-scores-v2",
            [c.digest for c in self._checkpoints],
            [self.lam(i) for i in range(m_count)],
            self.spec.curvature,
            self.spec.features.describe(),
            query_output,
            per_class,
            _store.dataset_digest(queries),
        )
        if path is None and self.root is not None:
            path = self.root / "scores" / f"scores-{key[:24]}.npy"
        if path is not None:
            path = Path(path)
            meta_path = path.with_suffix(".json")
            if path.exists() and meta_path.exists():
                meta = _store.read_meta_file(meta_path)
                if meta is not None and meta.get("digest") == key:
                    return ScoreStore(_store.load(path), self.train.ids, queries.ids, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            out = _store.create(path, shape, dtype)
        else:
            out = np.zeros(shape, dtype)
        q_bar = self.out_to_loss().astype(dtype)
        fspec = self.spec.features
        # Every block has the same shape (the last ones zero-padded): one program for all blocks.
        for q0 in range(0, n_q, block_queries):
            rows = np.arange(q0, min(q0 + block_queries, n_q))
            block = queries.take(rows)
            ys = []  # [M, block_queries * K, k]: the query side times A_m, per checkpoint
            for m, params in enumerate(self.params):
                psi = _features.featurize(
                    self.task,
                    params,
                    block,
                    fspec,
                    output=query_output,
                    per_class=per_class,
                    batch_size=self.spec.batch_size,
                ).features
                padded = np.zeros((block_queries * classes, k), dtype)
                padded[: len(rows) * classes] = np.asarray(psi, dtype).reshape(-1, k)
                ys.append(np.asarray(_matmul(padded, self.inverse(m).astype(dtype))))
            ys = jnp.asarray(np.stack(ys))
            for t0 in range(0, n, block_train):
                t1 = min(t0 + block_train, n)
                xs = np.zeros((m_count, block_train, k), dtype)
                for m, ckpt in enumerate(self._checkpoints):
                    xs[m, : t1 - t0] = ckpt.features[t0:t1]
                tau = np.asarray(_mean_products(jnp.asarray(xs), ys))[: t1 - t0]
                tau = tau[:, : len(rows) * classes] * q_bar[t0:t1, None]
                out[t0:t1, q0 : q0 + len(rows)] = tau.reshape(t1 - t0, len(rows), *shape[2:])
        if path is not None:
            _store.commit(out, path)
            del out
            _store.write_meta_file(
                path.with_suffix(".json"),
                {
                    "kind": "trak-scores",
                    "digest": key,
                    "shape": list(shape),
                    "per_class": per_class,
                    "output": query_output,
                    "checkpoints": [c.digest for c in self._checkpoints],
                },
            )
            return ScoreStore(_store.load(path), self.train.ids, queries.ids, path)
        return ScoreStore(out, self.train.ids, queries.ids, None)

    def _classes(self) -> int:
        x = jnp.asarray(self.train.x[:1])
        out = jax.eval_shape(self.task.apply, self.params[0], x)
        return int(out.shape[-1])


@jax.jit
def _matmul(a, b):
    return a @ b


@jax.jit
def _mean_products(xs, ys):
    """``(1/M) sum_m X_m Y_m^T`` of ``xs [M, t, k]`` and ``ys [M, q, k]``: ``[t, q]``."""
    return jnp.einsum("mtk,mqk->tq", xs, ys) / xs.shape[0]


class ScoreStore:
    """A score matrix ``[n, n_q]`` or ``[n, n_q, K]`` (in memory or memory-mapped), read in blocks.

    Attributes:
      array: the scores; row ``i`` is training example ``train_ids[i]``, column ``j`` query
        ``query_ids[j]``.
      train_ids: ``[n]`` int64.
      query_ids: ``[n_q]`` int64.
      path: the ``.npy`` file, or ``None`` in memory.
    """

    def __init__(self, array: Any, train_ids: Any, query_ids: Any, path: Path | None = None):
        self.array = array
        self.train_ids = np.asarray(train_ids, np.int64)
        self.query_ids = np.asarray(query_ids, np.int64)
        self.path = path
        if array.shape[:2] != (len(self.train_ids), len(self.query_ids)):
            raise ValueError(
                f"scores of shape {array.shape} do not match {len(self.train_ids)} training and "
                f"{len(self.query_ids)} query ids."
            )
        order = np.argsort(self.train_ids, kind="stable")
        self._sorted, self._order = self.train_ids[order], order

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def positions(self, train_ids: Any) -> np.ndarray:
        """Row positions of these training ids.

        Raises:
          ValueError: ids that are not rows of the scores.
        """
        ids = np.asarray(train_ids, np.int64).reshape(-1)
        where = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        known = self._sorted[where] == ids
        if not known.all():
            bad = ids[~known]
            raise ValueError(
                f"{bad.size} ids are not training examples of these scores (e.g. "
                f"{bad[:5].tolist()})."
            )
        return self._order[where]

    def sum_rows(self, train_ids: Any, *, block: int | None = None) -> np.ndarray:
        r""":math:`\sum_{i \in S} \tau_{i,:}`, ``[n_q]`` or ``[n_q, K]`` float64, reading ``block``
        rows at a time (the predicted effect of adding the examples ``S``; removing them changes
        the outputs by about the negative)."""
        rows = np.sort(self.positions(train_ids))
        width = int(np.prod(self.shape[1:]))
        block = block or max(1, _BLOCK_BUDGET // max(width, 1))
        total = np.zeros(self.shape[1:], np.float64)
        for start in range(0, rows.size, block):
            total += np.asarray(self.array[rows[start : start + block]], np.float64).sum(axis=0)
        return total

    def masked_sums(self, masks: Any, *, block: int | None = None) -> np.ndarray:
        r"""``masks @ scores``: :math:`\sum_i M_{si} \tau_{i,:}` for ``masks [S, n]`` (e.g. the
        training subsets of the LDS), ``[S, n_q(, K)]`` float64, reading ``block`` rows at a time."""
        masks = np.asarray(masks, np.float64)
        n = self.shape[0]
        if masks.ndim != 2 or masks.shape[1] != n:
            raise ValueError(f"masks must be [subsets, {n}], got shape {masks.shape}.")
        width = int(np.prod(self.shape[1:]))
        block = block or max(1, _BLOCK_BUDGET // max(width, 1))
        total = np.zeros((masks.shape[0], width), np.float64)
        for start in range(0, n, block):
            rows = np.asarray(self.array[start : start + block], np.float64).reshape(-1, width)
            total += masks[:, start : start + block] @ rows
        return total.reshape(masks.shape[0], *self.shape[1:])

    @classmethod
    def open(cls, path: str | Path, train_ids: Any, query_ids: Any) -> ScoreStore:
        """Reopens a score file written by :meth:`TRAK.scores` (read-only memory map)."""
        return cls(_store.load(Path(path)), train_ids, query_ids, Path(path))


__all__ = ["TRAK", "ScoreStore", "TRAKSpec"]
