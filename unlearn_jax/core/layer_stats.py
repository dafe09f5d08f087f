r"""Statistics of per-example gradients from per-layer captures, without forming ``[B, P]``.

Notation: example ``i`` of a batch has row weight ``w_i`` (``batch["mask"]``, 1 when absent) and
per-example gradient ``g_i`` of its loss ``l_i``. A captured layer (:mod:`unlearn_jax.core.capture`)
gives, per example, inputs ``a_it`` and output gradients ``d_it`` at positions ``t = 1..T`` (one
position for a dense layer on a vector, ``T`` tokens for a sequence, the output pixels of a
convolution, whose ``a_it`` is the unfolded input patch), and

.. math:: G_i = \sum_t a_{it} d_{it}^\top \in \mathbb{R}^{d_{in} \times d_{out}},
          \qquad g_i^{bias} = \sum_t d_{it}.

What is computed, per layer kind, and its cost per example (``d_in x d_out`` kernel):

* diagonal empirical Fisher sum :math:`\sum_i w_i g_i^{\odot 2}`: for one position,
  :math:`(A \odot A)^\top \mathrm{diag}(w) (D \odot D)` (one matmul over the batch, the cost of a
  weight gradient); for ``T > 1`` the exact :math:`\sum_i w_i G_i^{\odot 2}` with ``G_i`` formed
  chunk by chunk over the batch (``T d_in d_out``, the cost of the layer's forward pass);
* per-example squared norms :math:`\|g_i\|^2`: for one position the "ghost norm"
  :math:`\|a_i\|^2 \|d_i\|^2`; for ``T > 1`` whichever is cheaper of the Gram form
  :math:`\sum_{t,s} (a_t \cdot a_s)(d_t \cdot d_s)` (``T^2 (d_in + d_out)``) and the explicit
  :math:`\|G_i\|_F^2` (``T d_in d_out``), decided per layer from static shapes;
* inner products :math:`\langle g_i, v\rangle = \sum_t a_t^\top V d_t` (a forward pass of the
  layer with weights ``V``: a matmul, or a convolution, no unfolding);
* Kronecker-structured random projections :math:`\mathrm{vec}(P_{in}^\top G_i P_{out})
  = (P_{in} \otimes P_{out})^\top \mathrm{vec}(G_i)` (row-major ``vec``), as
  :math:`\sum_t (P_{in}^\top a_t)(P_{out}^\top d_t)^\top` (LoGra-style; the bias is the input row
  ``d_in``, i.e. ``a`` extended by a constant 1); never the gradient, never a ``P x k`` matrix;
* embeddings (token ids): ``G_i`` has the rows ``sum_{t: id_t = v} d_t``; repeated tokens of an
  example are summed before squaring (a sort per example, ``T log T + T E``);
* normalisation scales and biases: ``g_i^{scale} = sum over positions of x_hat * d`` and
  ``g_i^{bias} = sum d``, small ``[B, C]`` arrays, formed explicitly.

Leaves the capture does not know take the generic path (``vmap(grad)`` of the per-example loss,
chunked, :mod:`unlearn_jax.core.grads`), and their projections use a dense random matrix per leaf
regenerated block by block from the key (never stored whole), as do the normalisation leaves.

Random projections are a function of the key only, and every matrix is generated in row blocks
from one kind of draw, so that a program holds one or two random-number generators whatever the
number of layers (each separately traced generator costs XLA:CPU about half a second of compile
time). Leaf ``l`` (its index in ``jax.tree_util.tree_leaves(params)``) with role ``r`` (0: ``P_in``
of the Kronecker layer whose kernel or embedding is leaf ``l``, 1: its ``P_out``, 2: the dense matrix
``R_l`` of leaf ``l``) and ``k`` columns has the rows ``[j R, (j + 1) R)``, ``R = 2**14 // k``, filled
row-major from the 32-bit words ``bits(fold_in(fold_in(key, l), r * 2**24 + j), (2**14,))``: a
Rademacher entry is ``+1`` when the word's lowest bit is set, else ``-1``; a Gaussian entry is
``sqrt(2) erfinv(2 u - 1)`` with ``u`` the uniform ``[0, 1)`` float of the word's high 23 bits. Entries
are scaled by ``1 / sqrt(k)``, so that ``E ||features||^2 = ||g||^2``. A Kronecker layer's ``P_in``
has ``d_in + 1`` rows when it has a bias. :func:`projection_matrix` (and
:func:`kronecker_projection_matrices`, :func:`dense_projection_matrix`) build them explicitly;
the dense matrices of generic-path leaves are only ever generated block by block inside the loop
that applies them.

All functions are jittable; the public ones call one module-level ``jax.jit`` whose static
arguments are the model, the plan and what is requested, so each configuration compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from unlearn_jax import _validate
from unlearn_jax.core import capture as _capture
from unlearn_jax.core import grads as _grads
from unlearn_jax.core.capture import CONV, DENSE, EMBED, SCALE_BIAS, CapturePlan, LayerSpec
from unlearn_jax.core.cpu_rewrites import STRATEGIES, with_strategy
from unlearn_jax.core.task import CLASSIFICATION, REGRESSION, SEQUENCE

Params = Any
Batch = dict[str, Any]

RADEMACHER = "rademacher"
GAUSSIAN = "gaussian"
DISTRIBUTIONS = (RADEMACHER, GAUSSIAN)
METHODS = ("auto", "generic")

# Elements (not bytes) of the per-example intermediates one chunk may hold: 2**22 float32 = 16 MiB.
_CHUNK_BUDGET = 2**22
# Random 32-bit words per generated block of a projection matrix (its rows: _WORDS // k).
_WORDS = 2**14
# Role codes of the matrices of a leaf (see the module docstring).
P_IN, P_OUT, DENSE_MATRIX = 0, 1, 2
_BLOCKS_PER_ROLE = 2**24


@dataclasses.dataclass(frozen=True)
class Projection:
    """How per-example gradients are projected (see the module docstring for the matrices).

    Attributes:
      k_in: columns of ``P_in`` per Kronecker layer.
      k_out: columns of ``P_out``; a Kronecker layer gives ``k_in * k_out`` features.
      k_dense: features of the dense projection of every leaf without a Kronecker structure
        (normalisation scales and biases, generic-path leaves), summed over those leaves.
      distribution: ``"rademacher"`` (+-1) or ``"gaussian"`` entries, scaled by ``1/sqrt(k)``.
    """

    k_in: int = 16
    k_out: int = 16
    k_dense: int = 256
    distribution: str = RADEMACHER

    def __post_init__(self):
        _validate.positive_int(k_in=self.k_in, k_out=self.k_out, k_dense=self.k_dense)
        _validate.one_of("projection distribution", self.distribution, DISTRIBUTIONS)
        for name, k in (("k_in", self.k_in), ("k_out", self.k_out), ("k_dense", self.k_dense)):
            if k > _WORDS:
                raise ValueError(f"{name}={k} must be at most {_WORDS} (one generated block).")


@dataclasses.dataclass(frozen=True)
class _Request:
    fisher: bool = False
    sq_norms: bool = False
    dots: bool = False
    projection: Projection | None = None
    num_samples: int = 0  # > 0: the Fisher with targets drawn from the model, this many draws
    chunk_size: int | None = None
    strategy: str = "auto"


# ------------------------------------------------------------------------------ public functions


def layer_statistics(
    model: Any,
    params: Params,
    batch: Batch,
    *,
    fisher: bool = False,
    sq_norms: bool = False,
    vector: Params | None = None,
    projection: Projection | None = None,
    key: jax.Array | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> dict[str, Any]:
    r"""Several statistics of the per-example gradients of one batch from ONE capture.

    Args:
      model: a :class:`~unlearn_jax.Task` (built by ``flax_task`` / ``models.model_task``), a
        ``(flax module, output_loss)`` pair with ``output_loss(outputs, batch) -> [B]``, or a
        :class:`~unlearn_jax.core.capture.CaptureModel`.
      params: the ``"params"`` collection (a dict of arrays).
      batch: ``{"x": [B, ...], "y": ..., optional "weights" [B, T], optional "mask" [B]}``.
      fisher: compute ``"fisher"``, :math:`\sum_i w_i g_i^{\odot 2}` (a pytree like ``params``;
        divide by the number of examples yourself).
      sq_norms: compute ``"sq_norms"``, :math:`\|g_i\|^2` over all parameters, ``[B]``.
      vector: a pytree like ``params``; computes ``"dots"``, :math:`\langle g_i, v\rangle`, ``[B]``.
      projection: a :class:`Projection`; computes ``"projection"``, ``[B, k_total]`` features
        (layout: :func:`projection_layout`); needs ``key``.
      key: PRNG key of the projection matrices.
      method: ``"auto"`` (captured layers, generic path for the rest) or ``"generic"`` (every leaf
        through ``vmap(grad)``, the reference).
      chunk_size: examples per chunk of per-example work (``None``: chosen per layer so that one
        chunk's intermediates stay near 16 MiB; the generic path chooses its own).
      strategy: ``"auto"``, ``"vmap"`` or ``"rewrite"``: whether the exact CPU rewrites of
        :mod:`unlearn_jax.core.cpu_rewrites` apply (``"auto"``: on the CPU backend), as in
        :func:`~unlearn_jax.core.grads.per_example_grads`.

    Returns:
      ``{"losses": [B], ...}`` with the requested entries. Per-example entries ignore the row
      weights (padding rows get numbers too); ``"fisher"`` is weighted by them.

    Raises:
      ValueError: a batch without ``"x"``, a mask that is not ``[B]``, a ``vector`` unlike
        ``params``, a projection without a key, an unknown method.

    Guarantees:
      Exact: equal to the same statistic of ``per_example_grads`` up to float32 summation order.
    """
    request = _Request(
        fisher=fisher,
        sq_norms=sq_norms,
        dots=vector is not None,
        projection=projection,
        chunk_size=chunk_size,
        strategy=strategy,
    )
    return _run(model, params, batch, request, vector, key, method)


def diag_fisher_sum(
    model: Any,
    params: Params,
    batch: Batch,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> Params:
    r"""Weighted sum of squared per-example gradients, :math:`\sum_i w_i g_i^{\odot 2}`.

    The empirical diagonal Fisher of a data set is the sum of this over its batches divided by the
    number of (real) examples. Arguments as in :func:`layer_statistics`.

    Returns:
      A pytree like ``params``.
    """
    request = _Request(fisher=True, chunk_size=chunk_size, strategy=strategy)
    return _run(model, params, batch, request, None, None, method)["fisher"]


def diag_fisher_sampled_sum(
    model: Any,
    params: Params,
    batch: Batch,
    key: jax.Array,
    *,
    num_samples: int = 1,
    method: str = "auto",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> Params:
    r"""The label-sampled ("true") Fisher sum :math:`\sum_i w_i \frac1S \sum_s g_{is}^{\odot 2}`.

    ``g_is`` is the gradient of the loss of example ``i`` at targets drawn from the model itself:
    ``y ~ softmax(logits)`` for classification, one token per position from the per-position
    softmax for sequences (token weights kept), ``y ~ N(f(x), I)`` for regression (half squared
    error). The draws of sample ``s`` use ``fold_in(key, s)`` (categorical over the batch's outputs);
    one forward pass serves all ``S`` backward passes.

    Args:
      model: a :class:`~unlearn_jax.Task` or a :class:`~unlearn_jax.core.capture.CaptureModel`
        with a ``kind`` (the likelihood to sample from).
      params, batch, method, chunk_size: as in :func:`layer_statistics`.
      key: PRNG key of the draws.
      num_samples: draws ``S`` per example.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: a model without a task kind, ``num_samples < 1``.
    """
    _validate.positive_int(num_samples=num_samples)
    cm = _capture.as_capture_model(model)
    if cm.kind is None:
        raise ValueError(
            "the sampled Fisher draws targets from the model's likelihood, which a "
            "(module, output_loss) pair does not name; pass a Task, or a CaptureModel with kind="
            f"one of {(CLASSIFICATION, REGRESSION, SEQUENCE)}."
        )
    _check_key(key)
    request = _Request(
        fisher=True, num_samples=num_samples, chunk_size=chunk_size, strategy=strategy
    )
    return _run(cm, params, batch, request, None, key, method)["fisher"]


def per_example_sq_norms(
    model: Any,
    params: Params,
    batch: Batch,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> jax.Array:
    r"""Squared norms :math:`\|g_i\|_2^2` of the per-example gradients over all parameters, ``[B]``."""
    request = _Request(sq_norms=True, chunk_size=chunk_size, strategy=strategy)
    return _run(model, params, batch, request, None, None, method)["sq_norms"]


def per_example_norms(
    model: Any,
    params: Params,
    batch: Batch,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> jax.Array:
    r"""Norms :math:`\|g_i\|_2` of the per-example gradients over all parameters, ``[B]``."""
    sq_norms = per_example_sq_norms(
        model, params, batch, method=method, chunk_size=chunk_size, strategy=strategy
    )
    return jnp.sqrt(sq_norms)


def per_example_dots(
    model: Any,
    params: Params,
    batch: Batch,
    vector: Params,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> jax.Array:
    r"""Inner products :math:`\langle g_i, v \rangle` with a pytree ``v`` like ``params``, ``[B]``."""
    request = _Request(dots=True, chunk_size=chunk_size, strategy=strategy)
    return _run(model, params, batch, request, vector, None, method)["dots"]


def projected_grads(
    model: Any,
    params: Params,
    batch: Batch,
    key: jax.Array,
    projection: Projection = Projection(),
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> jax.Array:
    r"""Random projections of the per-example gradients, ``[B, k_total]``.

    Kronecker layers contribute :math:`\mathrm{vec}(P_{in}^\top G_i P_{out})` (``k_in * k_out``
    columns each, in plan order), then one block of ``k_dense`` columns holds
    :math:`\sum_l R_l^\top g_{il}` over the other leaves (normalisation parameters, generic path),
    when there are any. :func:`projection_layout` names the columns. Deterministic given ``key``.
    """
    _check_key(key)
    request = _Request(projection=projection, chunk_size=chunk_size, strategy=strategy)
    return _run(model, params, batch, request, None, key, method)["projection"]


def projection_layout(
    model: Any,
    params: Params,
    x: Any,
    projection: Projection = Projection(),
    *,
    method: str = "auto",
) -> tuple[tuple[str, int, int], ...]:
    """Which columns of :func:`projected_grads` belong to which layer: ``(name, start, stop)``.

    The dense block, when present, is named ``"<dense>"`` and comes last.
    """
    plan = _plan(model, params, x, method)
    layout, start = [], 0
    for spec in plan.layers:
        if spec.kind in (DENSE, CONV, EMBED):
            width = projection.k_in * projection.k_out
            layout.append((spec.name, start, start + width))
            start += width
    if _dense_leaves(plan):
        layout.append(("<dense>", start, start + projection.k_dense))
    return tuple(layout)


def projection_matrix(
    key: jax.Array, leaf_index: int, role: int, rows: int, k: int, distribution: str = RADEMACHER
) -> jax.Array:
    """The ``[rows, k]`` projection matrix of leaf ``leaf_index`` in ``role`` (``P_IN``, ``P_OUT``
    or ``DENSE_MATRIX``), exactly as the statistics generate it (module docstring)."""
    _validate.one_of("projection distribution", distribution, DISTRIBUTIONS)
    (matrix,) = _compiled_matrices(key, ((leaf_index, role, rows, k),), distribution)
    return matrix


def kronecker_projection_matrices(
    key: jax.Array, leaf_index: int, d_in: int, d_out: int, projection: Projection
) -> tuple[jax.Array, jax.Array]:
    """``(P_in [d_in, k_in], P_out [d_out, k_out])`` of the Kronecker layer whose kernel (or
    embedding) is leaf ``leaf_index``; ``d_in`` counts the bias row when the layer has a bias."""
    wanted = (
        (leaf_index, P_IN, d_in, projection.k_in),
        (leaf_index, P_OUT, d_out, projection.k_out),
    )
    p_in, p_out = _compiled_matrices(key, wanted, projection.distribution)
    return p_in, p_out


def dense_projection_matrix(
    key: jax.Array, leaf_index: int, size: int, projection: Projection
) -> jax.Array:
    """The whole ``[size, k_dense]`` matrix ``R_l`` of a dense leaf (the hot path of generic-path
    leaves never forms it)."""
    return projection_matrix(
        key, leaf_index, DENSE_MATRIX, size, projection.k_dense, projection.distribution
    )


# ------------------------------------------------------------------------------------ the driver


def _check_key(key):
    if key is None:
        raise ValueError("a PRNG key is required (jax.random.key(seed)), got key=None.")


def _plan(model, params, x, method) -> CapturePlan:
    _validate.one_of("method", method, METHODS)
    if method == "generic":
        return _capture.generic_plan(params, _validate.batch_size(x, "batch['x']"))
    return _capture.plan_capture(model, params, x)


def _run(model, params, batch, request: _Request, vector, key, method):
    cm = _capture.as_capture_model(model)
    if not isinstance(batch, Mapping) or "x" not in batch:
        raise ValueError(f"batch must be a dict with inputs 'x', got {type(batch).__name__}.")
    size = _validate.batch_size(batch, "batch")
    if "mask" in batch and tuple(jnp.shape(batch["mask"])) != (size,):
        raise ValueError(
            f"batch['mask'] must hold one row weight per example, shape ({size},), got "
            f"{tuple(jnp.shape(batch['mask']))}."
        )
    _validate.positive_int(chunk_size=request.chunk_size)
    _validate.one_of("strategy", request.strategy, STRATEGIES)
    if vector is not None:
        _validate.same_structure(params, vector, "params", "vector")
    if request.projection is not None:
        _check_key(key)
    plan = _plan(cm, params, batch["x"], method)
    return _statistics(cm, plan, request, params, dict(batch), vector, key)


@functools.partial(jax.jit, static_argnames=("cm", "plan", "request"))
def _statistics(cm, plan: CapturePlan, request: _Request, params, batch, vector, key):
    # The CPU rewrites of the generic path (max-pooling backward, transposed products) pay here
    # too: the capture's backward pass goes through the same pooling layers.
    compute = functools.partial(_compute, cm, plan, request)
    return with_strategy(compute, request.strategy)(params, batch, vector, key)


def _compute(cm, plan: CapturePlan, request: _Request, params, batch, vector, key):
    flat = traverse_util.flatten_dict(dict(params))
    size = _validate.batch_size(batch["x"], "batch['x']")
    weights = batch.get("mask")
    weights = jnp.ones((size,), jnp.float32) if weights is None else _float(weights)
    flat_vector = None if vector is None else traverse_util.flatten_dict(dict(vector))
    index = {leaf: i for i, leaf in enumerate(plan.leaf_keys)}
    out: dict[str, Any] = {}

    outputs, inputs, pullback = _capture.capture_forward(cm, params, batch["x"], plan)
    if request.num_samples:

        def draw(s):
            targets = _sample_targets(cm.kind, jax.random.fold_in(key, s), outputs)
            sampled = {**batch, "y": targets}
            _, cotangent = _capture.loss_cotangent(cm, outputs, sampled)
            part = _captured_fisher(plan, inputs, pullback(cotangent), weights, request.chunk_size)
            part.update(_generic_fisher(cm, plan, flat, sampled, weights, request))
            return part

        # A loop, not S unrolled copies: the program (and its compile time) does not grow with S.
        zeros = jax.tree_util.tree_map(
            lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(draw, jnp.int32(0))
        )
        fisher = jax.lax.fori_loop(
            0,
            request.num_samples,
            lambda s, acc: jax.tree_util.tree_map(jnp.add, acc, draw(s)),
            zeros,
        )
        out["fisher"] = _unflatten(params, plan, {k: v / request.num_samples
                                                  for k, v in fisher.items()})  # fmt: skip
        return out  # no "losses": the data targets may be absent or of another kind

    losses, cotangent = _capture.loss_cotangent(cm, outputs, batch)
    grads = pullback(cotangent)
    out["losses"] = losses
    if request.fisher:
        fisher = _captured_fisher(plan, inputs, grads, weights, request.chunk_size)
        fisher.update(_generic_fisher(cm, plan, flat, batch, weights, request))
        out["fisher"] = _unflatten(params, plan, fisher)
    per_example = {}
    if request.sq_norms:
        per_example["sq_norms"] = sum(
            (_layer_sq_norms(spec, inputs[spec.name], grads[spec.name], request.chunk_size)
             for spec in plan.layers),
            jnp.zeros((size,), jnp.float32),
        )  # fmt: skip
    if request.dots:
        per_example["dots"] = sum(
            (_layer_dots(spec, inputs[spec.name], grads[spec.name], flat_vector)
             for spec in plan.layers),
            jnp.zeros((size,), jnp.float32),
        )  # fmt: skip
    if request.projection is not None:
        blocks, dense = _captured_projection(
            plan, inputs, grads, key, index, request.projection, size
        )
        per_example["projection"] = blocks
        if dense is not None:
            per_example["dense_projection"] = dense
    if plan.fallback and (request.sq_norms or request.dots or request.projection is not None):
        generic = _generic_per_example(cm, plan, request, flat, batch, flat_vector, key, index)
        for name, value in generic.items():
            per_example[name] = per_example[name] + value
    if request.projection is not None:
        blocks = per_example.pop("projection")
        if "dense_projection" in per_example:
            blocks = [*blocks, per_example.pop("dense_projection")]
        per_example["projection"] = jnp.concatenate(blocks, axis=1)
    out.update(per_example)
    return out


def _captured_projection(plan: CapturePlan, inputs, grads, key, index, proj: Projection, size):
    """``([B, k_in * k_out] per Kronecker layer], [B, k_dense] of the normalisation leaves, or
    None when the plan has no dense leaf)``, every matrix from one generator."""
    kron = [spec for spec in plan.layers if spec.kind != SCALE_BIAS]
    norms = [spec for spec in plan.layers if spec.kind == SCALE_BIAS]
    wanted = []
    for spec in kron:
        leaf = index[(*spec.path, "embedding" if spec.kind == EMBED else "kernel")]
        d_in, d_out = spec.matrix
        wanted.append((leaf, P_IN, d_in + 1 if spec.has_bias else d_in, proj.k_in))
        wanted.append((leaf, P_OUT, d_out, proj.k_out))
    for spec in norms:
        for leaf in spec.leaves:
            rows = math.prod(spec.shape(leaf))
            wanted.append((index[(*spec.path, leaf)], DENSE_MATRIX, rows, proj.k_dense))
    matrices = iter(_matrices(key, wanted, proj.distribution))
    blocks = [
        _layer_projection(spec, inputs[spec.name], grads[spec.name], next(matrices),
                          next(matrices))
        for spec in kron
    ]  # fmt: skip
    if not _dense_leaves(plan):
        return blocks, None
    dense = jnp.zeros((size, proj.k_dense), jnp.float32)
    for spec in norms:
        per_leaf = _scale_bias_grads(spec, inputs[spec.name], grads[spec.name])
        for leaf in spec.leaves:
            dense = dense + per_leaf[leaf].reshape(size, -1) @ next(matrices)
    return blocks, dense


def _dense_leaves(plan: CapturePlan) -> bool:
    return bool(plan.fallback) or any(spec.kind == SCALE_BIAS for spec in plan.layers)


def _unflatten(params, plan: CapturePlan, flat: dict) -> Params:
    leaves = [flat[key] for key in plan.leaf_keys]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


def _float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sample_targets(kind: str, key: jax.Array, outputs: jax.Array) -> jax.Array:
    outputs = lax.stop_gradient(outputs)
    if kind == REGRESSION:
        return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)
    return jax.random.categorical(key, outputs, axis=-1)


# ----------------------------------------------------------------------------- the generic path


def _generic_loss(cm, flat):
    def loss(fallback_params, example):
        merged = traverse_util.unflatten_dict({**flat, **fallback_params})
        return cm.example_loss(merged, example)

    return loss


def _generic_chunk(plan: CapturePlan, flat: dict, size: int, chunk_size: int | None) -> int:
    # Chunks whose per-example gradients fit the budget run several times faster on the CPU
    # than one vmap over the batch (they stay in the cache; 8 x 400k float32 on the MLP).
    per_example = sum(flat[k].size for k in plan.fallback)
    return _chunk(chunk_size, size, per_example)


def _generic_fisher(cm, plan, flat, batch, weights, request: _Request) -> dict:
    if not plan.fallback:
        return {}
    grad_fn = jax.grad(_generic_loss(cm, flat))
    fallback = {k: flat[k] for k in plan.fallback}
    examples = {k: v for k, v in batch.items() if k != "mask"}

    def chunk_total(tree):
        chunk_examples, w = tree
        grads = jax.vmap(grad_fn, in_axes=(None, 0))(fallback, chunk_examples)
        # A weighted contraction over the chunk, not a sum of vmapped squares: XLA:CPU runs the
        # latter 4x slower (it fuses the squares into the per-example outer products).
        return {k: jnp.tensordot(w, _float(g) ** 2, axes=1) for k, g in grads.items()}

    chunk = _generic_chunk(plan, flat, weights.shape[0], request.chunk_size)
    return _grads.sum_over_chunks(
        chunk_total, (examples, weights), chunk, strategy=request.strategy
    )


def _generic_per_example(cm, plan, request, flat, batch, flat_vector, key, index) -> dict:
    grad_fn = jax.grad(_generic_loss(cm, flat))
    fallback = {k: flat[k] for k in plan.fallback}
    examples = {k: v for k, v in batch.items() if k != "mask"}

    def stats(example):
        g = grad_fn(fallback, example)
        out = {}
        if request.sq_norms:
            out["sq_norms"] = sum(jnp.sum(_float(v) ** 2) for v in g.values())
        if request.dots:
            out["dots"] = sum(jnp.vdot(_float(g[k]), _float(flat_vector[k])) for k in g)
        if request.projection is not None:
            rows = [_float(g[k]).reshape(1, -1) for k in plan.fallback]
            leaves = [index[k] for k in plan.fallback]
            out["dense_projection"] = _dense_scan(rows, leaves, key, request.projection)[0]
        return out

    chunk = _generic_chunk(plan, flat, jax.tree_util.tree_leaves(batch)[0].shape[0],
                           request.chunk_size)  # fmt: skip
    return _grads.chunked_map(stats, examples, chunk, strategy=request.strategy)


# ------------------------------------------------------------------------- per-layer statistics


def _chunk(chunk_size: int | None, size: int, per_example: int) -> int:
    if chunk_size is not None:
        return min(chunk_size, size)
    return max(1, min(size, _CHUNK_BUDGET // max(per_example, 1)))


def _chunked_map(batch_fn, tree, chunk: int):
    """``batch_fn(tree)`` computed ``chunk`` rows at a time (a ``lax.map`` over full chunks and one
    call on the remainder), for functions that act on each row independently."""
    size = jax.tree_util.tree_leaves(tree)[0].shape[0]
    if chunk >= size:
        return batch_fn(tree)
    n_full, remainder = divmod(size, chunk)
    head = jax.tree_util.tree_map(
        lambda a: a[: n_full * chunk].reshape(n_full, chunk, *a.shape[1:]), tree
    )
    out = lax.map(batch_fn, head)
    out = jax.tree_util.tree_map(lambda o: o.reshape(n_full * chunk, *o.shape[2:]), out)
    if remainder:
        tail = batch_fn(jax.tree_util.tree_map(lambda a: a[n_full * chunk :], tree))
        out = jax.tree_util.tree_map(lambda o, t: jnp.concatenate([o, t]), out, tail)
    return out


def _positions(spec: LayerSpec, inputs, grads) -> list[tuple[jax.Array, jax.Array]]:
    """``[(A [c, T, d_in], D [c, T, d_out]), ...]`` per call of a dense or convolution layer;
    a convolution's ``A`` holds the unfolded input patches."""
    pairs = []
    for call, a, d in zip(spec.calls, inputs, grads, strict=True):
        a, d = _float(a), _float(d)
        if spec.kind == CONV:
            c = a.shape[0]
            patches = _patches(a.reshape(c * call.inner, *a.shape[2:]), call)
            a = patches.reshape(c, -1, patches.shape[-1])
            d = d.reshape(c, -1, d.shape[-1])
        pairs.append((a, d))
    return pairs


def _patches(x: jax.Array, call: _capture.ConvCall) -> jax.Array:
    """Unfolded input patches ``[n, T, prod(kernel_size) * C]`` of ``x [n, *spatial, C]``, rows
    in ``(*kernel offsets, channel)`` order (an HWIO kernel reshaped to ``[-1, F]`` matches)."""
    n, channels = x.shape[0], x.shape[-1]
    pads = [(0, 0, 0)]
    pads += [
        (lo, hi, dil - 1) for (lo, hi), dil in zip(call.padding, call.lhs_dilation, strict=True)
    ]
    pads += [(0, 0, 0)]
    padded = lax.pad(x, jnp.zeros((), x.dtype), pads)
    slices = []
    for offsets in itertools.product(*(range(k) for k in call.kernel_size)):
        start = [o * d for o, d in zip(offsets, call.rhs_dilation, strict=True)]
        limit = [
            s + (size - 1) * stride + 1
            for s, size, stride in zip(start, call.out_spatial, call.strides, strict=True)
        ]
        slices.append(
            lax.slice(padded, (0, *start, 0), (n, *limit, channels), (1, *call.strides, 1))
        )
    return jnp.stack(slices, axis=-2).reshape(n, -1, len(slices) * channels)


def _conv(x: jax.Array, kernel: jax.Array, call: _capture.ConvCall) -> jax.Array:
    """The layer's convolution of ``x [n, *spatial, C]`` with ``kernel [*kernel_size, C, F]``."""
    nd = x.ndim
    numbers = lax.ConvDimensionNumbers(
        lhs_spec=(0, nd - 1, *range(1, nd - 1)),
        rhs_spec=(nd - 1, nd - 2, *range(nd - 2)),
        out_spec=(0, nd - 1, *range(1, nd - 1)),
    )
    return lax.conv_general_dilated(
        x, kernel, call.strides, call.padding, lhs_dilation=call.lhs_dilation,
        rhs_dilation=call.rhs_dilation, dimension_numbers=numbers,
    )  # fmt: skip


def _one_position(spec: LayerSpec) -> bool:
    return spec.kind == DENSE and len(spec.calls) == 1 and spec.calls[0].positions == 1


def _total_positions(spec: LayerSpec) -> int:
    return sum(call.positions for call in spec.calls)


def _patch_elements(spec: LayerSpec) -> int:
    return _total_positions(spec) * spec.matrix[0] if spec.kind == CONV else 0


def _per_example_matrix(spec, inputs, grads):
    """``G [c, d_in, d_out]`` and ``g_bias [c, d_out]`` of a chunk (a sum over calls)."""
    kernel, bias = 0.0, 0.0
    for a, d in _positions(spec, inputs, grads):
        kernel = kernel + jnp.einsum("btp,bto->bpo", a, d)
        bias = bias + jnp.sum(d, axis=1)
    return kernel, bias


def _reshape_leaves(spec: LayerSpec, values: dict) -> dict:
    return {(*spec.path, leaf): v.reshape(spec.shape(leaf)) for leaf, v in values.items()}


def _captured_fisher(plan, inputs, grads, weights, chunk_size) -> dict:
    fisher = {}
    for spec in plan.layers:
        fisher.update(_layer_fisher(spec, inputs[spec.name], grads[spec.name], weights, chunk_size))
    return fisher


def _layer_fisher(spec: LayerSpec, inputs, grads, weights, chunk_size) -> dict:
    """``{leaf path: sum_i w_i g_i^2}`` of one captured layer."""
    if spec.kind == SCALE_BIAS:
        per_example = _scale_bias_grads(spec, inputs, grads)
        values = {leaf: jnp.tensordot(weights, g * g, axes=1) for leaf, g in per_example.items()}
        return _reshape_leaves(spec, values)
    if spec.kind == EMBED:
        return _reshape_leaves(spec, {"embedding": _embed_fisher(spec, inputs, grads, weights)})
    if _one_position(spec):
        a, d = _float(inputs[0][:, 0]), _float(grads[0][:, 0])
        d2 = d * d
        values = {"kernel": ((a * a) * weights[:, None]).T @ d2}
        if spec.has_bias:
            values["bias"] = weights @ d2
        return _reshape_leaves(spec, values)

    d_in, d_out = spec.matrix
    size = weights.shape[0]
    chunk = _chunk(chunk_size, size, d_in * d_out + _patch_elements(spec))

    def chunk_total(tree):
        chunk_inputs, chunk_grads, w = tree
        kernel, bias = _per_example_matrix(spec, chunk_inputs, chunk_grads)
        total = {"kernel": jnp.tensordot(w, kernel * kernel, axes=1)}
        if spec.has_bias:
            total["bias"] = w @ (bias * bias)
        return total

    values = _grads.sum_over_chunks(chunk_total, (inputs, grads, weights), chunk, strategy="vmap")
    return _reshape_leaves(spec, values)


def _layer_sq_norms(spec: LayerSpec, inputs, grads, chunk_size) -> jax.Array:
    """``[B]`` squared norms of one captured layer's per-example gradients."""
    if spec.kind == SCALE_BIAS:
        per_example = _scale_bias_grads(spec, inputs, grads)
        return sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in per_example.values())
    if spec.kind == EMBED:
        _, rows = _embed_rows(spec, inputs, grads)
        return jnp.sum(rows * rows, axis=(1, 2))
    if _one_position(spec):
        a, d = _float(inputs[0][:, 0]), _float(grads[0][:, 0])
        d2 = jnp.sum(d * d, axis=1)
        norms = jnp.sum(a * a, axis=1) * d2
        return norms + d2 if spec.has_bias else norms

    d_in, d_out = spec.matrix
    positions = _total_positions(spec)
    use_gram = positions * (d_in + d_out) < d_in * d_out
    per_example = (2 * positions * positions if use_gram else d_in * d_out) + _patch_elements(spec)
    size = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    chunk = _chunk(chunk_size, size, per_example)

    def chunk_norms(tree):
        chunk_inputs, chunk_grads = tree
        if not use_gram:
            kernel, bias = _per_example_matrix(spec, chunk_inputs, chunk_grads)
            norms = jnp.sum(kernel * kernel, axis=(1, 2))
            return norms + jnp.sum(bias * bias, axis=1) if spec.has_bias else norms
        pairs = _positions(spec, chunk_inputs, chunk_grads)
        a = jnp.concatenate([a for a, _ in pairs], axis=1)
        d = jnp.concatenate([d for _, d in pairs], axis=1)
        gram_a = jnp.einsum("btp,bsp->bts", a, a)
        gram_d = jnp.einsum("bto,bso->bts", d, d)
        norms = jnp.sum(gram_a * gram_d, axis=(1, 2))
        if spec.has_bias:
            bias = jnp.sum(d, axis=1)
            norms = norms + jnp.sum(bias * bias, axis=1)
        return norms

    return _chunked_map(chunk_norms, (inputs, grads), chunk)


def _layer_dots(spec: LayerSpec, inputs, grads, flat_vector) -> jax.Array:
    """``[B]`` inner products of one captured layer's per-example gradients with ``vector``."""
    vector = {leaf: _float(flat_vector[(*spec.path, leaf)]) for leaf in spec.leaves}
    if spec.kind == SCALE_BIAS:
        per_example = _scale_bias_grads(spec, inputs, grads)
        return sum(
            jnp.tensordot(g, vector[leaf], axes=vector[leaf].ndim)
            for leaf, g in per_example.items()
        )
    dots = 0.0
    for call, a, d in zip(spec.calls, inputs, grads, strict=True):
        d = _float(d)
        b = d.shape[0]
        if spec.kind == EMBED:
            rows = jnp.take(vector["embedding"], a, axis=0)  # [B, T, E]
            dots = dots + jnp.sum(rows * d, axis=(1, 2))
            continue
        if spec.kind == CONV:
            x = _float(a).reshape(b * call.inner, *a.shape[2:])
            y = _conv(x, vector["kernel"], call).reshape(b, -1)
        else:
            y = _float(a) @ vector["kernel"].reshape(spec.matrix)
        dots = dots + jnp.sum(y.reshape(b, -1) * d.reshape(b, -1), axis=1)
        if spec.has_bias:
            dots = dots + jnp.sum(d.reshape(b, -1, d.shape[-1]), axis=1) @ vector["bias"].reshape(
                -1
            )
    return dots


def _layer_projection(spec: LayerSpec, inputs, grads, p_in, p_out) -> jax.Array:
    """``[B, k_in * k_out]``: ``vec(sum_t (P_in^T a_t)(P_out^T d_t)^T)`` of one Kronecker layer."""
    d_in, d_out = spec.matrix
    k_in = p_in.shape[1]
    features = 0.0
    for call, a, d in zip(spec.calls, inputs, grads, strict=True):
        d = _float(d)
        b = d.shape[0]
        if spec.kind == EMBED:
            a_proj = jnp.take(p_in, a, axis=0)  # [B, T, k_in]
        elif spec.kind == CONV:
            x = _float(a).reshape(b * call.inner, *a.shape[2:])
            kernel = p_in[:d_in].reshape(*spec.shape("kernel")[:-1], k_in)
            a_proj = _conv(x, kernel, call).reshape(b, -1, k_in)
        else:
            a_proj = _float(a) @ p_in[:d_in]
        if spec.has_bias:
            a_proj = a_proj + p_in[d_in][None, None, :]
        d_proj = d.reshape(b, -1, d_out) @ p_out
        features = features + jnp.einsum("btk,btl->bkl", a_proj, d_proj)
    return features.reshape(features.shape[0], -1)


# ------------------------------------------------------------------------ embeddings and norms


def _embed_rows(spec: LayerSpec, inputs, grads) -> tuple[jax.Array, jax.Array]:
    """``(ids [B, T], S [B, T, E])``: the distinct tokens of each example (over all calls) and
    the summed output gradients of their positions; unused slots hold the out-of-range id ``V``
    and zeros, so scatters into the ``[V, E]`` table drop them."""
    vocab = spec.matrix[0]
    ids = jnp.concatenate(inputs, axis=1) if len(inputs) > 1 else inputs[0]
    d = jnp.concatenate([_float(g) for g in grads], axis=1)
    positions = ids.shape[1]
    if positions == 1:
        return ids, d
    order = jnp.argsort(ids, axis=1, stable=True)
    sorted_ids = jnp.take_along_axis(ids, order, axis=1)
    sorted_d = jnp.take_along_axis(d, order[..., None], axis=1)
    first = jnp.concatenate(
        [jnp.ones_like(sorted_ids[:, :1], bool), sorted_ids[:, 1:] != sorted_ids[:, :-1]], axis=1
    )
    segment = jnp.cumsum(first, axis=1) - 1

    def per_example(token_ids, grads_, seg):
        rows = jax.ops.segment_sum(grads_, seg, num_segments=positions)
        unique = jnp.full((positions,), vocab, token_ids.dtype).at[seg].set(token_ids)
        return unique, rows

    return jax.vmap(per_example)(sorted_ids, sorted_d, segment)


def _embed_fisher(spec: LayerSpec, inputs, grads, weights) -> jax.Array:
    vocab, width = spec.matrix
    ids, rows = _embed_rows(spec, inputs, grads)
    squares = (rows * rows) * weights[:, None, None]
    return jax.ops.segment_sum(squares.reshape(-1, width), ids.reshape(-1), num_segments=vocab)


def _scale_bias_grads(spec: LayerSpec, inputs, grads) -> dict:
    """``{leaf: [B, *shape]}`` per-example gradients of a normalisation's scale and bias."""
    values = {}
    for call, x_hat, d in zip(spec.calls, inputs, grads, strict=True):
        d = _float(d)
        b = d.shape[0]
        if "scale" in spec.leaves:
            g = jnp.sum(_float(x_hat) * d, axis=call.reduce_axes).reshape(b, -1)
            values["scale"] = values.get("scale", 0.0) + g
        if "bias" in spec.leaves:
            g = jnp.sum(d, axis=call.reduce_axes).reshape(b, -1)
            values["bias"] = values.get("bias", 0.0) + g
    return {leaf: g.reshape(g.shape[0], *spec.shape(leaf)) for leaf, g in values.items()}


# ------------------------------------------------------------------------- dense projections


def _block_values(bits: jax.Array, k: int, distribution: str) -> jax.Array:
    """``[..., R, k]`` matrix rows from ``[..., _WORDS]`` random words (module docstring)."""
    rows = _WORDS // k
    words = bits[..., : rows * k].reshape(*bits.shape[:-1], rows, k)
    if distribution == RADEMACHER:
        values = jnp.where((words & 1) == 1, 1.0, -1.0).astype(jnp.float32)
    else:
        # jax.random's own construction: a float in [1, 2) from the high 23 bits, minus 1.
        mantissa = (words >> 9) | jnp.uint32(0x3F800000)
        uniform = lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
        lowest = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
        values = jnp.sqrt(2.0) * lax.erf_inv(jnp.maximum(2.0 * uniform - 1.0, lowest))
    return values / jnp.sqrt(jnp.float32(k))


def _block_bits(key: jax.Array, leaves: jax.Array, codes: jax.Array) -> jax.Array:
    """``[n, _WORDS]`` words of the blocks ``(leaves[i], codes[i])``, one generator for all."""

    def words(leaf, code):
        block_key = jax.random.fold_in(jax.random.fold_in(key, leaf), code)
        return jax.random.bits(block_key, (_WORDS,), jnp.uint32)

    return jax.vmap(words)(leaves, codes)


def _matrices(key: jax.Array, wanted: list, distribution: str) -> list[jax.Array]:
    """The matrices ``[(leaf, role, rows, k), ...]``, all from ONE vectorised generator."""
    if not wanted:
        return []
    leaves, codes, counts = [], [], []
    for leaf, role, rows, k in wanted:
        n_blocks = -(-rows // (_WORDS // k))
        leaves += [leaf] * n_blocks
        codes += [role * _BLOCKS_PER_ROLE + j for j in range(n_blocks)]
        counts.append(n_blocks)
    bits = _block_bits(key, jnp.asarray(leaves, jnp.uint32), jnp.asarray(codes, jnp.uint32))
    matrices, start = [], 0
    for (_, _, rows, k), n_blocks in zip(wanted, counts, strict=True):
        values = _block_values(bits[start : start + n_blocks], k, distribution)
        matrices.append(values.reshape(-1, k)[:rows])
        start += n_blocks
    return matrices


# The explicit matrices of the public helpers: one compiled generator per request.
_compiled_matrices = jax.jit(_matrices, static_argnames=("wanted", "distribution"))


def _dense_scan(rows: list, leaves: list, key: jax.Array, proj: Projection) -> jax.Array:
    """``sum_l g_l @ R_l`` for ``g_l [c, P_l]``, the ``R_l`` generated block by block inside a
    ``lax.scan`` (one generator; never a whole ``R_l``)."""
    per_block = _WORDS // proj.k_dense
    padded, block_leaves, codes = [], [], []
    for g, leaf in zip(rows, leaves, strict=True):
        n_blocks = -(-g.shape[1] // per_block)
        g = jnp.pad(g, ((0, 0), (0, n_blocks * per_block - g.shape[1])))
        padded.append(g.reshape(g.shape[0], n_blocks, per_block))
        block_leaves += [leaf] * n_blocks
        codes += [DENSE_MATRIX * _BLOCKS_PER_ROLE + j for j in range(n_blocks)]
    blocks = jnp.moveaxis(jnp.concatenate(padded, axis=1), 1, 0)  # [n_blocks, c, R]

    def add_block(total, xs):
        leaf, code, g_block = xs
        bits = _block_bits(key, leaf[None], code[None])[0]
        return total + g_block @ _block_values(bits, proj.k_dense, proj.distribution), None

    init = jnp.zeros((blocks.shape[1], proj.k_dense), jnp.float32)
    xs = (jnp.asarray(block_leaves, jnp.uint32), jnp.asarray(codes, jnp.uint32), blocks)
    total, _ = lax.scan(add_block, init, xs)
    return total
