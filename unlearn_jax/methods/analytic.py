r"""Analytic (closed-form) exact unlearning of a ridge-regression head on frozen features (ACU).

A frozen feature extractor :math:`\phi` (any Flax model up to its penultimate layer) feeds a linear
head fitted by ridge regression. The head is kept through two sufficient statistics,

.. math::
    R = (\Phi^\top \Phi + \gamma I)^{-1} \in \mathbb{R}^{D \times D}, \qquad
    Q = \Phi^\top Y \in \mathbb{R}^{D \times K}, \qquad W = R Q,

where the rows of :math:`\Phi` are the features of the examples learned so far (with a constant 1
appended when ``fit_bias``) and the rows of :math:`Y` their targets (one-hot labels for a
classifier). Learning or unlearning a batch :math:`(X, Y_b)` (``X [B, D]``) changes
:math:`\Phi^\top \Phi` by :math:`\pm X^\top X`, so the Woodbury identity updates :math:`R` with one
``[B, B]`` solve, and :math:`Q` changes by :math:`\pm X^\top Y_b`:

.. math::
    \text{learn:}\quad R \leftarrow R - R X^\top (I_B + X R X^\top)^{-1} X R, \qquad
                      Q \leftarrow Q + X^\top Y_b,

    \text{unlearn:}\quad R \leftarrow R + R X^\top (I_B - X R X^\top)^{-1} X R, \qquad
                        Q \leftarrow Q - X^\top Y_b.

No retained data is touched: removal costs :math:`O(B D^2 + B^3)` whatever the data set size. After
any sequence of learn and unlearn calls, :math:`W = R Q` equals the ridge regression fitted from
scratch on the examples currently learned (up to floating-point error, hence the float64 default).

Two safeguards keep ``R`` honest:

* every learned example is recorded by id together with a fingerprint of its features and target,
  so removing an id that was never learned, removing it twice, or removing it with features that
  differ from those learned (e.g. a backbone that changed) raises instead of silently corrupting
  ``R`` (a downdate by data that was never added has no meaning and can make ``R`` indefinite);
* ``R`` is re-symmetrised after every update, and the ``[B, B]`` systems are solved by Cholesky;
  a system that is not positive definite (which the learned-data check makes impossible except
  through numerical breakdown) raises.

The same head is available as an :class:`~unlearn_jax.methods.protocol.Unlearner` (:func:`acu`)
that reads the features from a model's ``features`` method and writes ``W`` into its ``"head"`` layer.
Its update is pure (it downdates ``R`` and ``Q`` one forget batch at a time, sequential downdates
being exact), so it runs jitted and ``vmap``-ed over stacked models; the :class:`AnalyticHead` is its
host-side ledger: the request is checked against it before the run (:meth:`AnalyticHead.check_learned`)
and it is updated from the result afterwards (:meth:`AnalyticHead.after`).

References:
  "ACU: Analytic Continual Unlearning for Efficient and Exact Forgetting with Privacy
  Preservation", 2025; Zhuang et al. "ACIL: Analytic Class-Incremental Learning with Absolute Memorization
  and Privacy Protection", NeurIPS 2022 (the recursive analytic-learning update).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from unlearn_jax import _validate
from unlearn_jax.core.batch import row_mask
from unlearn_jax.core.reductions import Reduced, Reduction
from unlearn_jax.core.task import CLASSIFICATION, Task
from unlearn_jax.data.batching import map_batches
from unlearn_jax.methods.protocol import FORGET, TRAIN, Checks, Feeds, Statistic, Unlearner

# Relative tolerance when comparing an example's fingerprint at removal with the one recorded when it
# was learned. Features recomputed by the same float32 backbone can differ in the last bits between
# batch sizes (different XLA blockings), never by 1e-4 of their magnitude.
FINGERPRINT_RTOL = 1e-4


class NotLearnedError(ValueError):
    """Raised when unlearning examples that the head never learned (or learned differently)."""


def _resolve_dtype(dtype: Any) -> jnp.dtype:
    x64 = bool(jax.config.read("jax_enable_x64"))
    if dtype is None:
        return jnp.dtype(jnp.float64 if x64 else jnp.float32)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
    if dtype == jnp.float64 and not x64:
        raise ValueError(
            "dtype=float64 needs 64-bit JAX, which is disabled: run inside `with "
            "jax.enable_x64(True):`, set jax.config.update('jax_enable_x64', True) at start-up, or "
            "pass dtype=jnp.float32 (less accurate after many removals)."
        )
    return dtype


def _fingerprint(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[B, 3]`` float64 summary of each example: sum and weighted sum of features, weighted targets."""
    f = np.asarray(features, np.float64)
    t = np.asarray(targets, np.float64).reshape(f.shape[0], -1)
    ramp_f = np.linspace(0.5, 1.5, f.shape[1])
    ramp_t = np.linspace(0.5, 1.5, t.shape[1])
    return np.stack([f.sum(axis=1), f @ ramp_f, t @ ramp_t], axis=1)


def _bucket(size: int) -> int:
    """Batches are zero-padded to a power of two (at least 8) so few shapes are ever compiled."""
    return max(8, 1 << (size - 1).bit_length())


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    # A zero row of the (bias-augmented) design and target adds nothing to X^T X or X^T Y, and gives
    # the [B, B] system a unit diagonal entry: padding changes no result.
    return np.pad(a, ((0, rows - a.shape[0]), (0, 0)))


@jax.jit
def _learn_kernel(r, q, x, y):
    rx = r @ x.T  # [D, B]
    gram = jnp.eye(x.shape[0], dtype=r.dtype) + x @ rx  # I + X R X^T, [B, B], SPD
    chol = jnp.linalg.cholesky(gram)
    solved = jax.scipy.linalg.cho_solve((chol, True), rx.T)  # (I + X R X^T)^-1 X R, [B, D]
    r_new = r - rx @ solved
    r_new = 0.5 * (r_new + r_new.T)
    return r_new, q + x.T @ y, jnp.all(jnp.isfinite(chol))


@jax.jit
def _unlearn_kernel(r, q, x, y):
    rx = r @ x.T
    gram = jnp.eye(x.shape[0], dtype=r.dtype) - x @ rx  # I - X R X^T: SPD iff X was learned
    chol = jnp.linalg.cholesky(gram)
    solved = jax.scipy.linalg.cho_solve((chol, True), rx.T)
    r_new = r + rx @ solved
    r_new = 0.5 * (r_new + r_new.T)
    return r_new, q - x.T @ y, jnp.all(jnp.isfinite(chol))


@dataclasses.dataclass(frozen=True, eq=False)
class AnalyticHead:
    r"""A ridge-regression head that can learn and unlearn batches exactly, in any order.

    Immutable: :meth:`learn` and :meth:`unlearn` return a new head. Create one with
    :meth:`create`.

    Math: with :math:`\Phi` the (bias-augmented) features and :math:`Y` the targets of the examples
    currently learned, the head holds :math:`R = (\Phi^\top\Phi + \gamma I)^{-1}` and
    :math:`Q = \Phi^\top Y`; its weights are :math:`W = R Q`, the minimiser of
    :math:`\|\Phi W - Y\|_F^2 + \gamma \|W\|_F^2` (the bias row is regularised like the rest).

    Guarantees:
      Exact for the head: after any sequence of :meth:`learn`/:meth:`unlearn` calls, ``weights``
      equals the ridge regression fitted from scratch on the features of the examples currently
      learned (tested to 1e-5 relative error in float64 over sequences of additions and removals).
      The backbone is frozen and NOT unlearned: whatever the features encode about removed examples
      stays. No retained data is needed.

    Attributes:
      r: ``[D', D']`` the regularised inverse autocorrelation ``R`` (``D' = D + 1`` with a bias).
      q: ``[D', K]`` the cross-correlation ``Q``.
      gamma: the ridge coefficient ``gamma > 0``.
      fit_bias: whether a constant feature 1 is appended (its weight row is the bias).
      num_outputs: ``K``.
      learned_ids: ``[N]`` int64 ids of the examples learned, sorted.
      fingerprints: ``[N, 3]`` float64 fingerprints of those examples (row ``i`` for
        ``learned_ids[i]``), checked at removal.

    Examples:
      >>> import numpy as np, jax.numpy as jnp
      >>> phi = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
      >>> y = np.array([0, 1, 2, 0, 1, 2])
      >>> head = AnalyticHead.create(3, 3, gamma=0.1, dtype=jnp.float32).learn(phi, y, np.arange(6))
      >>> head.unlearn(phi[:2], y[:2], [0, 1]).num_learned
      4
    """

    r: jax.Array
    q: jax.Array
    gamma: float
    fit_bias: bool
    num_outputs: int
    learned_ids: np.ndarray
    fingerprints: np.ndarray

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        feature_dim: int,
        num_outputs: int,
        *,
        gamma: float = 0.1,
        fit_bias: bool = True,
        dtype: Any = None,
    ) -> AnalyticHead:
        """An empty head (nothing learned): ``R = I / gamma``, ``Q = 0``.

        Args:
          feature_dim: ``D``, the width of the features.
          num_outputs: ``K``, the number of classes (one-hot targets) or regression outputs.
          gamma: the ridge coefficient, > 0 (ACU's default 0.1).
          fit_bias: append a constant 1 to the features, so the head has a bias.
          dtype: the dtype of ``R`` and ``Q``. ``None``: float64 when JAX's 64-bit mode is on, else
            float32. Explicit float64 without 64-bit mode raises (JAX would silently truncate).

        Raises:
          ValueError: bad sizes, ``gamma <= 0``, or float64 requested with 64-bit mode off.
        """
        _validate.positive_int(feature_dim=feature_dim, num_outputs=num_outputs)
        _validate.positive(gamma=gamma)
        dtype = _resolve_dtype(dtype)
        dim = feature_dim + (1 if fit_bias else 0)
        return cls(
            r=jnp.eye(dim, dtype=dtype) / jnp.asarray(gamma, dtype),
            q=jnp.zeros((dim, num_outputs), dtype),
            gamma=float(gamma),
            fit_bias=bool(fit_bias),
            num_outputs=int(num_outputs),
            learned_ids=np.zeros((0,), np.int64),
            fingerprints=np.zeros((0, 3), np.float64),
        )

    # ---- properties ------------------------------------------------------------------------------
    @property
    def dtype(self) -> jnp.dtype:
        return self.r.dtype

    @property
    def feature_dim(self) -> int:
        """``D``, the width of the features (without the bias column)."""
        return int(self.r.shape[0]) - (1 if self.fit_bias else 0)

    @property
    def num_learned(self) -> int:
        return int(self.learned_ids.shape[0])

    @property
    def weights(self) -> jax.Array:
        """``W = R Q``, ``[D', K]`` (the last row is the bias when ``fit_bias``)."""
        return self.r @ self.q

    @property
    def kernel(self) -> jax.Array:
        """``[D, K]``: the weights of the features."""
        return self.weights[: self.feature_dim]

    @property
    def bias(self) -> jax.Array:
        """``[K]``: the bias (zeros when ``fit_bias`` is False)."""
        if not self.fit_bias:
            return jnp.zeros((self.num_outputs,), self.dtype)
        return self.weights[self.feature_dim]

    def predict(self, features: Any) -> jax.Array:
        """Outputs ``[B, K] = features @ kernel + bias`` for ``features [B, D]``."""
        return jnp.asarray(self._design(features)) @ self.weights

    def contains(self, ids: Any) -> np.ndarray:
        """``[M]`` bool: which of ``ids`` are currently learned."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if self.num_learned == 0:
            return np.zeros(ids.shape, bool)
        pos = np.searchsorted(self.learned_ids, ids)
        pos = np.minimum(pos, self.num_learned - 1)
        return self.learned_ids[pos] == ids

    # ---- learning and unlearning -----------------------------------------------------------------
    def learn(self, features: Any, targets: Any, ids: Any) -> AnalyticHead:
        r"""Adds a batch: :math:`R \leftarrow R - R X^\top (I + X R X^\top)^{-1} X R`, :math:`Q \mathrel{+}= X^\top Y`.

        Args:
          features: ``[B, D]`` features of the batch.
          targets: ``[B]`` integer labels (one-hot encoded to ``K`` classes) or ``[B, K]`` / ``[B]``
            (``K = 1``) real targets.
          ids: ``[B]`` distinct integer ids, none of them already learned.

        Returns:
          The updated head.

        Raises:
          ValueError: shapes that do not fit, non-finite features, repeated or already learned ids.
        """
        x, y, ids_arr = self._checked_batch(features, targets, ids, "learn")
        already = self.contains(ids_arr)
        if already.any():
            raise ValueError(
                f"learn: {int(already.sum())} of the ids are already learned (e.g. "
                f"{ids_arr[already][:5].tolist()}); learning an example twice would count it twice. "
                "Unlearn it first, or give new examples new ids."
            )
        rows = _bucket(x.shape[0])
        r, q, ok = _learn_kernel(self.r, self.q, _pad_rows(x, rows), _pad_rows(y, rows))
        if not bool(ok):
            raise FloatingPointError(
                "learn: the Cholesky factor of I + X R X^T is not finite; R has lost positive "
                f"definiteness (dtype {self.dtype}). Use float64 or a larger gamma."
            )
        fps = _fingerprint(x, y)
        all_ids = np.concatenate([self.learned_ids, ids_arr])
        all_fps = np.concatenate([self.fingerprints, fps])
        order = np.argsort(all_ids, kind="stable")
        return dataclasses.replace(
            self, r=r, q=q, learned_ids=all_ids[order], fingerprints=all_fps[order]
        )

    def check_learned(self, features: Any, targets: Any, ids: Any) -> np.ndarray:
        """Checks that every example was learned, with these features and targets; returns the
        positions of ``ids`` in :attr:`learned_ids`.

        Raises:
          NotLearnedError: an id that is not learned, or whose features/target differ from those
            learned (fingerprint mismatch).
          ValueError: shapes that do not fit, non-finite features, repeated ids.
        """
        x, y, ids_arr = self._checked_batch(features, targets, ids, "unlearn")
        known = self.contains(ids_arr)
        if not known.all():
            missing = ids_arr[~known]
            raise NotLearnedError(
                f"unlearn: {missing.size} of the {ids_arr.size} ids were never learned by this head "
                f"(e.g. {missing[:5].tolist()}); removing them would corrupt R. Only examples added "
                f"with learn() can be removed ({self.num_learned} are learned)."
            )
        pos = np.searchsorted(self.learned_ids, ids_arr)
        recorded = self.fingerprints[pos]
        given = _fingerprint(x, y)
        scale = np.maximum(np.abs(recorded), 1.0)
        bad = np.any(np.abs(given - recorded) > FINGERPRINT_RTOL * scale, axis=1)
        if bad.any():
            raise NotLearnedError(
                f"unlearn: {int(bad.sum())} examples (ids {ids_arr[bad][:5].tolist()}) have features "
                "or targets that differ from those they were learned with (fingerprint mismatch); "
                "their removal would not cancel their addition. Was the backbone changed after "
                "learning?"
            )
        return pos

    def unlearn(self, features: Any, targets: Any, ids: Any) -> AnalyticHead:
        r"""Removes a batch: :math:`R \leftarrow R + R X^\top (I - X R X^\top)^{-1} X R`, :math:`Q \mathrel{-}= X^\top Y`.

        Args:
          features: ``[B, D]`` the features of the examples to remove (as they were learned).
          targets: their targets, as given to :meth:`learn`.
          ids: ``[B]`` their ids; every one must be learned, each at most once in the batch.

        Returns:
          The updated head; ``weights`` now equals ridge regression on the remaining examples.

        Raises:
          NotLearnedError: an id that is not learned, or whose features/target differ from those
            learned (fingerprint mismatch). Nothing is changed.
          ValueError: shapes that do not fit, non-finite features, repeated ids.
        """
        pos = self.check_learned(features, targets, ids)
        x, y, _ = self._checked_batch(features, targets, ids, "unlearn")
        rows = _bucket(x.shape[0])
        r, q, ok = _unlearn_kernel(self.r, self.q, _pad_rows(x, rows), _pad_rows(y, rows))
        if not bool(ok):
            raise FloatingPointError(
                "unlearn: I - X R X^T is not positive definite although every example was learned; "
                f"R has lost accuracy (dtype {self.dtype}). Use float64 or a larger gamma."
            )
        return self._without(pos, r, q)

    def _without(self, pos: np.ndarray, r, q) -> AnalyticHead:
        keep = np.ones(self.num_learned, bool)
        keep[pos] = False
        return dataclasses.replace(
            self, r=r, q=q, learned_ids=self.learned_ids[keep], fingerprints=self.fingerprints[keep]
        )

    def after(self, state: AnalyticState, ids: Any) -> AnalyticHead:
        """The ledger after an :func:`acu` run that removed ``ids``: ``R``, ``Q`` from the run's final
        method state, the ids and their fingerprints dropped.

        Raises:
          NotLearnedError: an id that is not learned.
        """
        ids_arr = np.asarray(ids, np.int64).reshape(-1)
        known = self.contains(ids_arr)
        if not known.all():
            raise NotLearnedError(
                f"after: ids {ids_arr[~known][:5].tolist()} are not learned by this head."
            )
        pos = np.searchsorted(self.learned_ids, ids_arr)
        return self._without(
            pos, jnp.asarray(state.r, self.dtype), jnp.asarray(state.q, self.dtype)
        )

    # ---- helpers ---------------------------------------------------------------------------------
    def _design(self, features: Any) -> np.ndarray:
        """Host ``[B, D']`` design matrix in the head's dtype (bias column appended)."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must have shape [B, {self.feature_dim}], got {tuple(x.shape)}."
            )
        x = x.astype(self.dtype)
        if self.fit_bias:
            x = np.concatenate([x, np.ones((x.shape[0], 1), self.dtype)], axis=1)
        return x

    def _targets(self, targets: Any, batch: int) -> jax.Array:
        y = np.asarray(targets)
        if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            if y.size and (y.min() < 0 or y.max() >= self.num_outputs):
                raise ValueError(
                    f"integer labels must lie in [0, {self.num_outputs}), got "
                    f"[{int(y.min())}, {int(y.max())}]."
                )
            y = np.eye(self.num_outputs, dtype=np.float64)[y]
        elif y.ndim == 1 and self.num_outputs == 1:
            y = y[:, None]
        if y.shape != (batch, self.num_outputs):
            raise ValueError(
                f"targets must be [B] integer labels or [B, {self.num_outputs}] values for B={batch}, "
                f"got shape {y.shape} dtype {y.dtype}."
            )
        if not np.all(np.isfinite(y)):
            raise ValueError("targets contain NaN or infinite values.")
        return y.astype(self.dtype)

    def _checked_batch(self, features, targets, ids, what):
        x = self._design(features)
        if x.shape[0] == 0:
            raise ValueError(f"{what}: the batch is empty.")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{what}: features contain NaN or infinite values.")
        y = self._targets(targets, x.shape[0])
        ids_arr = np.asarray(ids)
        if ids_arr.ndim == 0:
            ids_arr = ids_arr.reshape(1)
        if ids_arr.shape != (x.shape[0],) or not np.issubdtype(ids_arr.dtype, np.integer):
            raise ValueError(
                f"{what}: ids must be [B={x.shape[0]}] integers, got shape {ids_arr.shape} dtype "
                f"{ids_arr.dtype}."
            )
        ids_arr = ids_arr.astype(np.int64)
        uniq, counts = np.unique(ids_arr, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"{what}: ids repeat within the batch: {uniq[counts > 1][:5].tolist()}."
            )
        return x, y, ids_arr


# ---- models: features in, head out -------------------------------------------------------------
FeaturesFn = Callable[[Any, jax.Array], jax.Array]


def model_features_fn(state: TrainState) -> FeaturesFn:
    """``features(params, x) -> [B, D]`` through the model's ``features`` method (all library models).

    Uses ``state.apply_fn(..., method="features")``; a model without such a method needs an explicit
    ``features_fn``.
    """

    def features(params, x):
        return state.apply_fn({"params": params}, x, method="features")

    return features


def _dataset_features(features_fn, params, dataset, batch_size: int) -> np.ndarray:
    """``[N, D]`` features of a dataset in fixed-size padded batches (one compilation):
    :func:`unlearn_jax.data.map_batches`."""
    fn = _jitted_features(features_fn)
    feats = map_batches(lambda b: fn(params, b["x"]), dataset, min(batch_size, len(dataset)))
    if feats.ndim != 2:
        raise ValueError(
            f"features_fn must return [B, D] features, got shape {feats.shape[1:]} per batch."
        )
    return feats


@functools.cache
def _jitted_features(features_fn):
    return jax.jit(features_fn)


def _head_targets(task: Task, y: np.ndarray) -> np.ndarray:
    return np.asarray(y) if task.kind == CLASSIFICATION else np.asarray(y, np.float64)


def fit_analytic_head(
    features_fn: FeaturesFn,
    params: Any,
    dataset: Any,
    *,
    num_outputs: int,
    kind: str = CLASSIFICATION,
    gamma: float = 0.1,
    fit_bias: bool = True,
    dtype: Any = None,
    batch_size: int = 512,
) -> AnalyticHead:
    """Learns a head on all of ``dataset`` (batch by batch), e.g. at training time.

    Args:
      features_fn: ``features(params, x [B, ...]) -> [B, D]`` (see :func:`model_features_fn`).
      params: the backbone parameters.
      dataset: an :class:`unlearn_jax.data.Dataset` (``x``, ``y``, ``ids``).
      num_outputs: ``K``.
      kind: ``"classification"`` (labels one-hot encoded) or ``"regression"``.
      gamma, fit_bias, dtype: as for :meth:`AnalyticHead.create`.
      batch_size: examples per learn call (each costs a ``[B, B]`` Cholesky).

    Returns:
      The head after learning every example of ``dataset``.
    """
    _validate.positive_int(batch_size=batch_size)
    feats = _dataset_features(features_fn, params, dataset, batch_size)
    head = AnalyticHead.create(
        feats.shape[1], num_outputs, gamma=gamma, fit_bias=fit_bias, dtype=dtype
    )
    y = np.asarray(dataset.y) if kind == CLASSIFICATION else np.asarray(dataset.y, np.float64)
    ids = np.asarray(dataset.ids)
    for s in range(0, len(ids), batch_size):
        head = head.learn(feats[s : s + batch_size], y[s : s + batch_size], ids[s : s + batch_size])
    return head


def with_head(params: Any, head: AnalyticHead, path: Sequence[str] = ("head",)) -> Any:
    """``params`` with the Dense layer at ``path`` replaced by the head's ``kernel``/``bias``.

    The kernel and bias are cast to the dtype of the layer they replace.

    Raises:
      ValueError: no Dense layer at ``path``, or shapes that do not match.
    """
    node = params
    for name in path:
        if not isinstance(node, dict) or name not in node:
            raise ValueError(f"params have no layer at {'/'.join(path)} (missing {name!r}).")
        node = node[name]
    if not (isinstance(node, dict) and "kernel" in node):
        raise ValueError(f"params[{'/'.join(path)}] is not a Dense layer with a 'kernel'.")
    kernel = node["kernel"]
    if tuple(kernel.shape) != (head.feature_dim, head.num_outputs):
        raise ValueError(
            f"the layer at {'/'.join(path)} has kernel shape {tuple(kernel.shape)}, the head "
            f"[{head.feature_dim}, {head.num_outputs}]."
        )
    new_layer = dict(node, kernel=head.kernel.astype(kernel.dtype))
    if "bias" in node:
        new_layer["bias"] = head.bias.astype(node["bias"].dtype)
    elif head.fit_bias:
        raise ValueError(f"the layer at {'/'.join(path)} has no bias but the head fits one.")

    def replace(tree, keys):
        if not keys:
            return new_layer
        return {**tree, keys[0]: replace(tree[keys[0]], keys[1:])}

    return replace(params, list(path))


class AnalyticState(NamedTuple):
    """The pure state of :func:`acu`: the head's sufficient statistics ``R`` and ``Q`` (module
    docstring), ``W = R Q``, and whether every downdate's Cholesky factor was finite."""

    r: jax.Array
    q: jax.Array
    ok: jax.Array


def _head_dims(params: Any, head_path: tuple[str, ...]) -> tuple[int, int]:
    node = params
    for name in head_path:
        node = node[name]
    feature_dim, num_outputs = node["kernel"].shape
    return int(feature_dim), int(num_outputs)


def _design_and_targets(task, features_fn, params, batch, dtype, fit_bias, num_outputs):
    """``(X [B, D'], Y [B, K])`` of a padded batch in ``dtype``; padding rows are zero rows."""
    mask = row_mask(batch, dtype)
    x = features_fn(params, batch["x"]).astype(dtype)
    if fit_bias:
        x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), dtype)], axis=1)
    if task.kind == CLASSIFICATION:
        y = jax.nn.one_hot(batch["y"], num_outputs, dtype=dtype)
    else:
        y = batch["y"].reshape(x.shape[0], num_outputs).astype(dtype)
    return x * mask[:, None], y * mask[:, None]


@functools.cache
def _ridge_reduction(task, features_fn, gamma, fit_bias, dtype, head_path) -> Reduction:
    """Streaming ``Phi^T Phi`` and ``Phi^T Y`` over the training set; finalize gives ``R, Q``."""

    def init(params):
        d, k = _head_dims(params, head_path)
        d += 1 if fit_bias else 0
        return {"gram": jnp.zeros((d, d), dtype), "cross": jnp.zeros((d, k), dtype),
                "count": jnp.zeros((), jnp.float32)}  # fmt: skip

    def accumulate(acc, params, batch, key):
        del key
        _, k = _head_dims(params, head_path)
        x, y = _design_and_targets(task, features_fn, params, batch, dtype, fit_bias, k)
        return {"gram": acc["gram"] + x.T @ x, "cross": acc["cross"] + x.T @ y,
                "count": acc["count"] + jnp.sum(row_mask(batch))}  # fmt: skip

    def finalize(acc):
        d = acc["gram"].shape[0]
        regularised = acc["gram"] + gamma * jnp.eye(d, dtype=dtype)
        chol = jnp.linalg.cholesky(regularised)
        r = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(d, dtype=dtype))
        return Reduced({"r": 0.5 * (r + r.T), "q": acc["cross"]}, acc["count"])

    return Reduction(init, accumulate, finalize, "ridge_statistics")


def acu(
    head: AnalyticHead | None = None,
    *,
    gamma: float = 0.1,
    fit_bias: bool = True,
    dtype: Any = None,
    features_fn: FeaturesFn | None = None,
    head_path: Sequence[str] = ("head",),
    batch_size: int = 512,
) -> Unlearner:
    r"""Analytic continual unlearning (ACU) as an :class:`~unlearn_jax.methods.protocol.Unlearner`.

    The model is split into a frozen backbone :math:`\phi` (``features_fn``, by default the model's
    ``features`` method) and its last Dense layer (``head_path``). The run makes ONE pass over the
    forget set; each step removes one (padded) forget batch from the head's statistics by the
    closed-form downdate (sequential downdates are exact) and writes :math:`W = R Q` into that layer.
    The final method state is an :class:`AnalyticState`; ``head.after(state, forget.ids)`` updates
    the host ledger for the next request.

    With ``head`` given (learned at training time with :func:`fit_analytic_head`), no retained data
    is read and the request is first checked against the head's ledger (every forget example learned,
    with the same features: :class:`NotLearnedError` otherwise). With ``head=None`` the head's
    statistics :math:`\Phi^\top\Phi, \Phi^\top Y` are a streaming statistic over retain +
    forget (the training set), so ``retain`` is required.

    Guarantees:
      Exact for the head: the new head equals ridge regression retrained on the retained features.
      Approximate for the model: the frozen backbone still carries what it learned from the forget
      set.

    Args:
      head: a head learned on the training set, or ``None`` (learn it from the data).
      gamma, fit_bias, dtype: for a head learned from the data (ignored when ``head`` is given).
        ``dtype=None``: float64 when JAX's 64-bit mode is on, else float32.
      features_fn: ``features(params, x) -> [B, D]``; default: the model's ``features`` method.
      head_path: where the head's Dense layer lives in the params.
      batch_size: examples per batch of the statistics pass.

    Returns:
      An :class:`Unlearner` named ``"acu"`` (metrics ``loss``, ``acu/num_removed``).

    Raises:
      NotLearnedError (from ``unlearn``): a forget example the given head never learned.
      FloatingPointError (from ``unlearn``): a downdate whose Cholesky factor was not finite.

    References:
      "ACU: Analytic Continual Unlearning for Efficient and Exact Forgetting with Privacy
      Preservation", 2025.
    """
    if head is not None and not isinstance(head, AnalyticHead):
        raise TypeError(f"head must be an AnalyticHead or None, got {type(head).__name__}.")
    _validate.positive(gamma=gamma)
    _validate.positive_int(batch_size=batch_size)
    head_path = tuple(head_path)
    dtype = head.dtype if head is not None else _resolve_dtype(dtype)
    fit_bias = head.fit_bias if head is not None else bool(fit_bias)

    def features_of(task):
        if features_fn is not None:
            return features_fn
        module = getattr(task, "module", None)
        if module is None or getattr(type(module), "features", None) is None:
            raise ValueError(
                "acu needs the model's features: pass features_fn=, or a task built from a model "
                "with a `features` method (unlearn_jax.models.model_task)."
            )
        return _module_features(module)

    def reduction(task):
        return _ridge_reduction(task, features_of(task), float(gamma), fit_bias, dtype, head_path)

    if head is not None:
        value = Reduced({"r": head.r, "q": head.q}, jnp.asarray(head.num_learned, jnp.float32))
        statistic = Statistic(reduction, TRAIN, batch_size, value=value)
    else:
        statistic = Statistic(reduction, TRAIN, batch_size)

    def check_request(task, params, forget, retain):
        del retain
        if head is None:
            return
        feats = _dataset_features(features_of(task), params, forget, batch_size)
        head.check_learned(feats, _head_targets(task, forget.y), forget.ids)

    def init(task, params, key, stats, plan):
        del task, key, plan
        d, k = _head_dims(params, head_path)
        r, q = stats["head"].value["r"], stats["head"].value["q"]
        if r.shape != (d + (1 if fit_bias else 0),) * 2 or q.shape[1] != k:
            raise ValueError(
                f"the head's statistics have R {r.shape}, Q {q.shape} but the layer at "
                f"{'/'.join(head_path)} is [{d}, {k}] (fit_bias={fit_bias})."
            )
        return AnalyticState(r.astype(dtype), q.astype(dtype), jnp.ones((), bool))

    def update(task, params, method_state, forget_batch, retain_batch, key):
        del retain_batch, key
        _, k = _head_dims(params, head_path)
        x, y = _design_and_targets(
            task, features_of(task), params, forget_batch, dtype, fit_bias, k
        )
        r, q, ok = _unlearn_kernel(method_state.r, method_state.q, x, y)
        weights = r @ q
        new_params = _write_head(params, weights, fit_bias, head_path)
        metrics = {
            "loss": task.batch_loss(new_params, forget_batch),
            "acu/num_removed": jnp.sum(row_mask(forget_batch)),
        }
        return new_params, AnalyticState(r, q, method_state.ok & ok), metrics

    def check_result(method_state, metrics):
        del metrics
        if not bool(np.all(np.asarray(method_state.ok))):
            raise FloatingPointError(
                "acu: I - X R X^T was not positive definite in a downdate; R has lost accuracy "
                f"(dtype {dtype}). Use float64 (jax.enable_x64) or a larger gamma."
            )

    return Unlearner(
        init=init,
        update=update,
        name="acu",
        feeds=Feeds(
            batches=(FORGET,),
            phases=((FORGET, None),),
            statistics={"head": statistic},
            run={"epochs": 1},
        ),
        guarantee="exact",
        hparams={
            "gamma": head.gamma if head is not None else gamma,
            "fit_bias": fit_bias,
            "dtype": str(jnp.dtype(dtype)),
            "head_given": head is not None,
            "head_path": "/".join(head_path),
        },
        checks=Checks(request=check_request, result=check_result),
    )


@functools.cache
def _module_features(module):
    return lambda params, x: module.apply({"params": params}, x, method="features")


def _write_head(params, weights, fit_bias, head_path):
    """``params`` with the head layer's kernel (and bias) replaced by ``weights [D', K]``."""
    node = params
    for name in head_path:
        node = node[name]
    d = node["kernel"].shape[0]
    layer = dict(node, kernel=weights[:d].astype(node["kernel"].dtype))
    if fit_bias:
        layer["bias"] = weights[d].astype(node["bias"].dtype)

    def replace(tree, keys):
        if not keys:
            return layer
        return {**tree, keys[0]: replace(tree[keys[0]], keys[1:])}

    return replace(params, list(head_path))


__all__ = [
    "AnalyticHead",
    "AnalyticState",
    "NotLearnedError",
    "acu",
    "fit_analytic_head",
    "model_features_fn",
    "with_head",
]
