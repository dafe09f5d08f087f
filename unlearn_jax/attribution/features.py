r"""Projected per-example gradients of a model output function: the features of TRAK.

For example :math:`z_i` and an output function :math:`f` (:mod:`~unlearn_jax.attribution.outputs`:
the margin of a classifier, the log-likelihood of a sequence), the feature is

.. math:: \phi_i = P^\top \nabla_\theta f(z_i; \theta) \in \mathbb{R}^k,

with :math:`P` one of three projections (:class:`FeatureSpec`):

* **Kronecker per layer** (``method="auto"``, the default): every dense, convolution and embedding
  layer contributes :math:`\mathrm{vec}(P_{in}^\top G_i P_{out})` (``k_in * k_out`` columns), with
  :math:`G_i = \sum_t a_{it} d_{it}^\top` formed from one captured forward and backward pass over
  the batch and never as a ``[B, P]`` array; the leaves the capture does not know (and
  normalisation parameters) share one dense block of ``k_dense`` columns
  (:func:`unlearn_jax.core.layer_stats.projected_grads`);
* **dense** (``method="generic"``): :math:`\sum_l R_l^\top g_{il}` over every parameter leaf
  :math:`l`, each :math:`R_l` (Rademacher or Gaussian entries scaled by :math:`1/\sqrt{k}`)
  regenerated block by block from ``fold_in`` of the key and the leaf index, never stored;
* **identity** (``projection=None``): the flattened gradient itself (``k = P``), for small models
  and exact references.

The projection matrices depend on the key (``FeatureSpec.seed``) and the parameter shapes only, so
every checkpoint of a model is projected by the same matrices. Features are stored in float32,
bfloat16 or (under ``jax_enable_x64``) float64.

Per-class query features (:func:`class_features`) use the output :math:`z_k(x)` (the ``k``-th
logit) for every class ``k``: one pass over a batch repeated ``K`` times with ``y = k``, so every
class shares one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.attribution import outputs as _outputs
from unlearn_jax.core import capture as _capture
from unlearn_jax.core import grads as _grads
from unlearn_jax.core import layer_stats
from unlearn_jax.core.layer_stats import Projection
from unlearn_jax.core.task import CLASSIFICATION, Task
from unlearn_jax.data.batching import padded_batches

Params = Any
Batch = dict[str, Any]

AUTO = "auto"
GENERIC = "generic"
METHODS = (AUTO, GENERIC)
DTYPES = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """How per-example gradients become features (module docstring).

    Attributes:
      projection: a :class:`~unlearn_jax.core.layer_stats.Projection` (``k_in``, ``k_out`` per
        Kronecker layer, ``k_dense`` for the dense block, Rademacher or Gaussian entries), or
        ``None`` for the identity (the flattened gradient).
      method: ``"auto"`` (Kronecker per captured layer, dense for the rest) or ``"generic"``
        (every leaf through the dense projection: ``k = k_dense``).
      dtype: the stored features' dtype: ``"float32"``, ``"bfloat16"`` or ``"float64"``.
      seed: the projection key is ``jax.random.key(seed)``.
      chunk_size: examples per chunk of per-example work (``None``: chosen per layer).
    """

    projection: Projection | None = dataclasses.field(
        default_factory=lambda: Projection(k_in=16, k_out=16, k_dense=256)
    )
    method: str = AUTO
    dtype: str = "float32"
    seed: int = 0
    chunk_size: int | None = None

    def __post_init__(self):
        if self.projection is not None and not isinstance(self.projection, Projection):
            raise TypeError(
                "projection must be a unlearn_jax.core.layer_stats.Projection or None (identity), "
                f"got {type(self.projection).__name__}."
            )
        _validate.one_of("feature method", self.method, METHODS)
        _validate.one_of("feature dtype", self.dtype, DTYPES)
        _validate.positive_int(chunk_size=self.chunk_size)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")

    @property
    def key(self) -> jax.Array:
        """The PRNG key of the projection matrices."""
        return jax.random.key(self.seed)

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype features are stored in (``ml_dtypes.bfloat16`` for bfloat16)."""
        return np.dtype(ml_dtypes.bfloat16) if self.dtype == "bfloat16" else np.dtype(self.dtype)

    def describe(self) -> dict[str, Any]:
        """A JSON-safe record of the spec (stored with cached features)."""
        proj = None if self.projection is None else dataclasses.asdict(self.projection)
        return {"projection": proj, "method": self.method, "dtype": self.dtype, "seed": self.seed}


def kronecker(k_in: int, k_out: int, *, k_dense: int = 256, **kwargs: Any) -> FeatureSpec:
    """A :class:`FeatureSpec` with Kronecker projections of ``k_in * k_out`` features per layer."""
    distribution = kwargs.pop("distribution", layer_stats.RADEMACHER)
    return FeatureSpec(Projection(k_in, k_out, k_dense, distribution), AUTO, **kwargs)


def dense(k: int, **kwargs: Any) -> FeatureSpec:
    """A :class:`FeatureSpec` projecting every parameter leaf densely to ``k`` features."""
    distribution = kwargs.pop("distribution", layer_stats.RADEMACHER)
    return FeatureSpec(Projection(1, 1, k, distribution), GENERIC, **kwargs)


def identity(**kwargs: Any) -> FeatureSpec:
    """A :class:`FeatureSpec` whose features are the flattened per-example gradients."""
    return FeatureSpec(None, GENERIC, **kwargs)


# ---------------------------------------------------------------------------------- one batch


def _capture_model(task: Task, function: _outputs.OutputFunction) -> _capture.CaptureModel:
    # The output function takes the place of the loss: the capture differentiates f, not l.
    if task.module is not None:
        return _capture.CaptureModel(task.module, function)
    return _capture.CaptureModel(None, function, apply=task.apply)


@functools.partial(jax.jit, static_argnames=("task", "function", "chunk_size"))
def _identity_features(params, batch, *, task, function, chunk_size):
    def one(p, example):
        rows = jax.tree_util.tree_map(lambda a: a[None], example)
        return function(task.apply(p, rows["x"]), rows)[0]

    examples = {k: v for k, v in batch.items() if k != "mask"}
    values = jax.vmap(lambda e: one(params, e))(examples)
    grads = _grads.per_example_grads(one, params, examples, chunk_size=chunk_size)
    size = values.shape[0]
    flat = [g.reshape(size, -1) for g in jax.tree_util.tree_leaves(grads)]
    return values, jnp.concatenate(flat, axis=1)


def example_features(
    task: Task,
    params: Params,
    batch: Batch,
    spec: FeatureSpec = FeatureSpec(),
    *,
    output: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Output values and projected gradients of one batch: ``(f [B], phi [B, k])``.

    .. math:: f_i = f(z_i; \theta), \qquad \phi_i = P^\top \nabla_\theta f(z_i; \theta)

    Args:
      task: the model's :class:`~unlearn_jax.Task` (its Flax module, when it has one, enables the
        Kronecker layers; otherwise every leaf takes the dense path).
      params: the parameters.
      batch: ``{"x": [B, ...], "y": [B] (the class to read for ``"logit"``), optional
        "weights"}``; a ``"mask"`` is ignored (every row gets its features).
      spec: a :class:`FeatureSpec`.
      output: the output function (:data:`~unlearn_jax.attribution.outputs.OUTPUTS`); default: the
        task's (:func:`~unlearn_jax.attribution.outputs.default_output`).

    Returns:
      ``(f [B], phi [B, k])``, float32 (float64 for float64 parameters), not yet cast to
      ``spec.dtype``. Column layout: :func:`unlearn_jax.core.layer_stats.projection_layout`
      (Kronecker), the dense block, or the params' leaves in ``tree_leaves`` order (identity).

    Raises:
      ValueError: an output function that does not fit the task, a batch without ``"x"``/``"y"``.
    """
    function = _outputs.check_output(task, output or _outputs.default_output(task))
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("batch must be a dict with inputs 'x' and targets 'y'.")
    if spec.projection is None:
        return _identity_features(
            params, batch, task=task, function=function, chunk_size=spec.chunk_size
        )
    stats = layer_stats.layer_statistics(
        _capture_model(task, function),
        params,
        {k: v for k, v in batch.items() if k != "mask"},
        projection=spec.projection,
        key=spec.key,
        method=spec.method,
        chunk_size=spec.chunk_size,
    )
    return stats["losses"], stats["projection"]


def class_features(
    task: Task, params: Params, batch: Batch, spec: FeatureSpec = FeatureSpec()
) -> jax.Array:
    r"""Per-class query features ``[B, K, k]``: :math:`P^\top \nabla_\theta z_k(x_i)` for every class.

    One pass over the batch repeated ``K`` times (rows ``i K + k`` read class ``k``), so the
    number of classes costs no extra compilation.

    Raises:
      ValueError: a task that is not a classification.
    """
    if task.kind != CLASSIFICATION:
        raise ValueError(f"per-class features need a classification task, got {task.kind!r}.")
    x = np.asarray(batch["x"])
    size = x.shape[0]
    classes = jax.eval_shape(task.apply, params, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
    # Built on the host: the repeated batch is an input, not a program of its own.
    repeated = {
        "x": np.repeat(x, classes, axis=0),
        "y": np.tile(np.arange(classes, dtype=np.int32), size),
    }
    _, phi = example_features(task, params, repeated, spec, output=_outputs.LOGIT)
    return phi.reshape(size, classes, phi.shape[-1])


def feature_dim(task: Task, params: Params, x: Any, spec: FeatureSpec = FeatureSpec()) -> int:
    """``k``, the number of features per example (and per class) of ``spec`` for this model."""
    if spec.projection is None:
        return sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(params))
    model = _capture_model(task, _outputs.OutputFunction(_outputs.default_output(task)))
    layout = layer_stats.projection_layout(
        model, params, jnp.asarray(x[:1]), spec.projection, method=spec.method
    )
    return layout[-1][2]


# ------------------------------------------------------------------------------- whole datasets


class Featurized(NamedTuple):
    """Features of a whole data set (:func:`featurize`).

    Attributes:
      features: ``[N, k]`` (or ``[N, K, k]`` per class) in the spec's storage dtype: a numpy array
        or the memory map given as ``out``.
      values: ``[N]`` output values :math:`f(z_i)`, float32 (float64 for float64 features;
        ``None`` per class).
      out_to_loss: ``[N]`` :math:`Q_i`, as ``values`` (``None`` per class).
      gram: ``[k, k]`` float64 :math:`\\Phi^\\top\\Phi` of the STORED (rounded) features when asked,
        else ``None``.
      curvature_gram: ``[k, k]`` float64 :math:`\\Phi^\\top R \\Phi` with the output's curvature
        :math:`R_i` (:meth:`~unlearn_jax.attribution.outputs.OutputFunction.curvature`) when asked
        and the output has one, else ``None``.
    """

    features: Any
    values: np.ndarray | None
    out_to_loss: np.ndarray | None
    gram: np.ndarray | None
    curvature_gram: np.ndarray | None = None


@functools.partial(jax.jit, donate_argnums=(0,))
def _add_gram(gram, phi, mask):
    phi = phi.astype(gram.dtype)
    return gram + (phi * mask[:, None].astype(gram.dtype)).T @ phi


@functools.partial(jax.jit, static_argnums=(0,))
def _values(function, f, batch):
    """``(f [B], Q [B])`` of one batch (one program per output function)."""
    return f, function.out_to_loss(f, batch).astype(f.dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def _curvature(function, f, mask):
    return function.curvature(f, {}).astype(f.dtype) * mask.astype(f.dtype)


def _batches(dataset: Any, batch_size: int) -> Iterator[tuple[Batch, jax.Array, int]]:
    """Fixed-size batches in dataset order (the last padded): ``(batch, mask, real rows)``."""
    for batch, mask in padded_batches(dataset, batch_size):
        yield batch, mask, int(np.asarray(mask).sum())


def featurize(
    task: Task,
    params: Params,
    dataset: Any,
    spec: FeatureSpec = FeatureSpec(),
    *,
    output: str | None = None,
    per_class: bool = False,
    batch_size: int = 256,
    gram: bool = False,
    out: Any = None,
) -> Featurized:
    r"""Features of every example of ``dataset``, batch by batch (one batch on the device at a time).

    Args:
      task, params, spec, output: as for :func:`example_features`.
      dataset: a :class:`~unlearn_jax.data.Dataset` (rows in its order).
      per_class: per-class query features (:func:`class_features`) instead, ``[N, K, k]``.
      batch_size: rows per step; every step has this shape (the last batch is padded), so a data
        set of any size compiles once.
      gram: also accumulate :math:`\Phi^\top \Phi` and, when the output has a curvature,
        :math:`\Phi^\top R \Phi` (in float32 on the device, float64 when the features are) from
        the stored features.
      out: an array to write the features into (e.g. ``numpy.lib.format.open_memmap`` of the
        right shape and ``spec.storage_dtype``): the features are then never in memory whole.

    Returns:
      A :class:`Featurized`.

    Raises:
      ValueError: an empty dataset, ``out`` of the wrong shape or dtype, ``gram`` with
        ``per_class``.
    """
    _validate.positive_int(batch_size=batch_size)
    if gram and per_class:
        raise ValueError("gram=True is for training features; per-class features are queries.")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{getattr(dataset, 'name', '') or 'dataset'} is empty.")
    function = None
    if not per_class:
        function = _outputs.check_output(task, output or _outputs.default_output(task))
    scalar = np.float64 if spec.dtype == "float64" else np.float32
    values = None if per_class else np.zeros((n,), scalar)
    weights = None if per_class else np.zeros((n,), scalar)
    acc = curved = None
    weighted = gram and function.name in (_outputs.MARGIN, _outputs.PREDICTION)
    start = 0
    for batch, mask, real in _batches(dataset, batch_size):
        batch = {k: v for k, v in batch.items() if k != "id"}
        if per_class:
            phi = class_features(task, params, batch, spec)
        else:
            f, phi = example_features(task, params, batch, spec, output=function.name)
            r = _curvature(function, f, mask) if weighted else None
            f, q = (np.asarray(a) for a in _values(function, f, {"y": batch["y"]}))
            values[start : start + real] = f[:real]
            weights[start : start + real] = q[:real]
        computed = np.asarray(phi)  # the whole padded batch: slicing on the host compiles nothing
        stored = computed.astype(spec.storage_dtype)
        if gram:
            if acc is None:
                acc = jnp.zeros((stored.shape[1], stored.shape[1]), computed.dtype)
                curved = jnp.zeros_like(acc) if weighted else None
            rounded = jnp.asarray(stored.astype(computed.dtype))
            acc = _add_gram(acc, rounded, mask)
            if weighted:
                curved = _add_gram(curved, rounded, r)
        if out is None:
            out = np.zeros((n, *stored.shape[1:]), spec.storage_dtype)
        elif tuple(out.shape) != (n, *stored.shape[1:]) or np.dtype(out.dtype) != stored.dtype:
            raise ValueError(
                f"out has shape {tuple(out.shape)} and dtype {out.dtype}; the features need "
                f"{(n, *stored.shape[1:])} and {stored.dtype}."
            )
        out[start : start + real] = stored[:real]
        start += real
    gram_out = None if acc is None else np.asarray(acc, np.float64)
    curved_out = None if curved is None else np.asarray(curved, np.float64)
    return Featurized(out, values, weights, gram_out, curved_out)


__all__ = [
    "AUTO",
    "DTYPES",
    "GENERIC",
    "FeatureSpec",
    "Featurized",
    "class_features",
    "dense",
    "example_features",
    "feature_dim",
    "featurize",
    "identity",
    "kronecker",
]
