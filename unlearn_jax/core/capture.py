r"""Per-layer capture for Flax linen models: every parameterised layer's inputs and output gradients
from ONE forward and ONE backward pass over a batch.

For a layer ``y = a W + b`` applied at positions ``t`` of example ``i``, the per-example gradient of
the loss ``l_i`` is a sum of outer products of what the layer saw and what came back,

.. math:: \nabla_W l_i = \sum_t a_{it} d_{it}^\top, \qquad \nabla_b l_i = \sum_t d_{it},
          \qquad d_{it} = \partial \Big(\sum_j l_j\Big) / \partial y_{it},

so statistics of per-example gradients (the diagonal Fisher, their norms, inner products and random
projections; :mod:`unlearn_jax.core.layer_stats`) follow from the pairs ``(a, d)`` without ever
forming a ``[B, P]`` array. Because examples do not interact, ``d_it`` of the summed loss is the
gradient of ``l_i`` alone.

Mechanism. Inside ``nn.intercept_methods``, every ``__call__`` of a known layer records its input
and returns its output plus a zero "perturbation" taken from a dict that is an argument of the
differentiated function; the gradient with respect to that zero is the output gradient ``d``. One
``jax.vjp`` gives the forward pass (with the recorded inputs as auxiliary outputs) and a pull-back
that turns a cotangent of the model outputs into every layer's ``d`` (so several cotangents, e.g.
sampled labels, share one forward pass). No weight gradient is formed on the way.

Known layers (exact types; a subclass may change the maths) and what is recorded:

==========================  ========================================  =============================
layer                       recorded input, per call                  output gradient
==========================  ========================================  =============================
``nn.Dense``                ``a [B, T, d_in]`` (positions flattened)  ``d [B, T, d_out]``
``nn.DenseGeneral``         contracted axes moved last, flattened     features flattened
``nn.Conv``                 the input ``[B, N, *spatial, C]``         ``[B, N, *out_spatial, F]``
``nn.Embed``                token ids ``[B, T]``                      ``[B, T, E]``
``nn.LayerNorm``,           the normalised input ``x_hat`` (the       same shape as ``x_hat``
``nn.RMSNorm``,             output with scale 1 and bias 0)
``nn.GroupNorm``,
``nn.InstanceNorm``
==========================  ========================================  =============================

(``N`` is the product of a convolution's extra batch axes, 1 for the usual ``[B, H, W, C]``.)

Everything else that holds parameters goes to the generic per-example path
(``vmap(grad(loss))`` of :mod:`unlearn_jax.core.grads`, which stays the reference) leaf by leaf:
unknown layer types, parameters of a known layer that something else reads through another method
(tied embeddings through ``Embed.attend``), layers that run inside a lifted transform (``nn.scan``,
``nn.remat``, ``nn.vmap``, ...), layers whose input does not carry the batch as its leading axis,
and unsupported options (custom ``dot_general``, grouped or masked convolutions, ``DenseGeneral``
with ``batch_dims``, normalisations that reduce over the batch). :func:`plan_capture` decides this
once per model and input shape by tracing abstract values twice (with ``B`` and ``B + 1`` rows, to
see which axis is the batch), and warns once per model and reason set.

Assumptions (as for the generic path): the model is a function of its ``"params"`` collection only
and treats the examples of a batch independently (no batch statistics).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.linear import canonicalize_padding
from jax import lax
from jax.extend import core as jex_core

from unlearn_jax import _validate
from unlearn_jax.core.task import KINDS, Task

Params = Any
Batch = dict[str, Any]
OutputLoss = Callable[[Any, Batch], jax.Array]

DENSE = "dense"
CONV = "conv"
EMBED = "embed"
SCALE_BIAS = "scale_bias"

_KNOWN_TYPES: dict[str, type[nn.Module]] = {
    "Dense": nn.Dense,
    "DenseGeneral": nn.DenseGeneral,
    "Conv": nn.Conv,
    "Embed": nn.Embed,
    "LayerNorm": nn.LayerNorm,
    "RMSNorm": nn.RMSNorm,
    "GroupNorm": nn.GroupNorm,
    "InstanceNorm": nn.InstanceNorm,
}
_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
_EXPECTED_LEAVES = {
    "Dense": ("kernel", "bias"),
    "DenseGeneral": ("kernel", "bias"),
    "Conv": ("kernel", "bias"),
    "Embed": ("embedding",),
    **{name: ("scale", "bias") for name in _NORMS},
}


# ------------------------------------------------------------------------------- the model to read


@dataclasses.dataclass(frozen=True)
class _TaskLoss:
    """The per-example loss of a :class:`Task` kind as a hashable callable ``(outputs, batch) -> [B]``."""

    kind: str

    def __call__(self, outputs: Any, batch: Batch) -> jax.Array:
        task = Task(apply=_no_apply, kind=self.kind)
        return task.output_losses(outputs, batch["y"], batch.get("weights"))


def _no_apply(params, x):
    del params, x
    raise NotImplementedError("only output_losses of this Task is used")


@dataclasses.dataclass(frozen=True)
class CaptureModel:
    """A Flax module and the per-example loss of its outputs: what the capture differentiates.

    Hashable (equal modules and losses give equal models), so compiled statistics are cached on it.

    Attributes:
      module: the Flax linen module, applied as ``module.apply({"params": params}, x)``; ``None``
        when only ``apply`` is known (then only the generic path is available).
      output_loss: ``output_loss(outputs, batch) -> [B]`` per-example losses; ``batch`` is the batch
        dict (targets ``"y"``, sequence token ``"weights"``), without its row weights applied.
      kind: the :class:`Task` kind when known (``"classification"``, ``"regression"``,
        ``"sequence"``), which fixes the model's likelihood for the label-sampled Fisher.
      apply: ``apply(params, x) -> outputs`` when ``module`` is ``None``.
    """

    module: nn.Module | None
    output_loss: OutputLoss
    kind: str | None = None
    apply: Callable[[Params, Any], Any] | None = None

    def __post_init__(self):
        if self.module is None and self.apply is None:
            raise ValueError("CaptureModel needs a Flax `module` or an `apply` function.")
        if self.kind is not None:
            _validate.one_of("task kind", self.kind, KINDS)

    def outputs(self, params: Params, x: Any) -> Any:
        """Model outputs of a batch of inputs ``x [B, ...]``."""
        if self.module is not None:
            return self.module.apply({"params": params}, x)
        return self.apply(params, x)

    def example_loss(self, params: Params, example: Batch) -> jax.Array:
        """The loss of ONE example (no batch axis; its ``"mask"`` is ignored): a scalar."""
        batch = jax.tree_util.tree_map(
            lambda a: a[None], {k: v for k, v in example.items() if k != "mask"}
        )
        return self.output_loss(self.outputs(params, batch["x"]), batch)[0]


def as_capture_model(model: Any) -> CaptureModel:
    """A :class:`CaptureModel` from a :class:`Task`, a ``(module, output_loss)`` pair or itself.

    A ``Task`` built by ``flax_task`` / ``models.model_task`` carries its module; one without
    (``Task(apply=...)``) can only use the generic path. Compiled statistics are cached on the
    module and the loss: pass the same ``output_loss`` function object every time (a new lambda
    per call compiles again).

    Raises:
      TypeError: for anything else.
    """
    if isinstance(model, CaptureModel):
        return model
    if isinstance(model, Task):
        if model.module is not None:
            return CaptureModel(model.module, _TaskLoss(model.kind), kind=model.kind)
        return CaptureModel(None, _TaskLoss(model.kind), kind=model.kind, apply=model.apply)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        if not callable(model[1]):
            raise TypeError(
                f"the loss of a (module, output_loss) pair must be callable, got {model[1]!r}."
            )
        return CaptureModel(model[0], model[1])
    raise TypeError(
        "expected a Task (from flax_task or models.model_task), a (flax module, output_loss) pair "
        f"with output_loss(outputs, batch) -> [B], or a CaptureModel; got {type(model).__name__}."
    )


# ------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class DenseCall:
    """One call of a dense layer: ``positions`` rows ``T`` per example; ``out_shape`` its output."""

    positions: int
    contract_axes: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any


@dataclasses.dataclass(frozen=True)
class ConvCall:
    """One call of a convolution, in ``lax.conv_general_dilated`` terms (channels last).

    ``padding`` is explicit ``(low, high)`` per spatial axis (circular, reflect and causal padding
    are applied to the recorded input, which then needs none); ``inner`` is the product ``N`` of the
    extra batch axes; ``out_spatial`` the output's spatial shape.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    inner: int
    out_spatial: tuple[int, ...]
    pre_pad: Any
    out_shape: tuple[int, ...]
    out_dtype: Any

    @property
    def positions(self) -> int:
        """Output positions ``T = N * prod(out_spatial)`` per example."""
        return self.inner * math.prod(self.out_spatial)


@dataclasses.dataclass(frozen=True)
class EmbedCall:
    """One call of an embedding: ``positions`` token ids ``T`` per example."""

    positions: int
    out_shape: tuple[int, ...]
    out_dtype: Any


@dataclasses.dataclass(frozen=True)
class ScaleBiasCall:
    """One call of a normalisation: ``reduce_axes`` of ``x_hat`` summed into a per-example gradient."""

    reduce_axes: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A captured layer: where its parameters live and how every call of it is read.

    Attributes:
      path: the module path (``("hidden_0",)``); its parameters are ``params[path][leaf]``.
      kind: ``"dense"`` (Dense, DenseGeneral), ``"conv"``, ``"embed"`` or ``"scale_bias"``.
      module_type: the Flax class name, for messages.
      leaves: the parameter names present (``("bias", "kernel")``), sorted.
      shapes: their shapes, in the same order.
      calls: one call description per call in the forward pass (a layer may be called twice).
      matrix: ``(d_in, d_out)`` of the kernel as a matrix for dense and convolution layers
        (``(prod(kernel_size) * C, F)`` for a convolution, rows in ``(*offsets, c)`` order), the
        embedding's ``(V, E)``; ``None`` for normalisations.
    """

    path: tuple[str, ...]
    kind: str
    module_type: str
    leaves: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    calls: tuple[Any, ...]
    matrix: tuple[int, int] | None

    @property
    def name(self) -> str:
        """``"a/b"`` for the path ``("a", "b")``; ``"<root>"`` for the top-level module."""
        return "/".join(self.path) or "<root>"

    def shape(self, leaf: str) -> tuple[int, ...]:
        """The shape of parameter ``leaf`` of this layer."""
        return self.shapes[self.leaves.index(leaf)]

    @property
    def has_bias(self) -> bool:
        return "bias" in self.leaves


@dataclasses.dataclass(frozen=True)
class CapturePlan:
    """What the capture does for one model and input shape (static, hashable).

    Attributes:
      layers: the captured layers, in the order of their first call.
      leaf_keys: every parameter leaf as a path tuple, in ``jax.tree_util`` order (sorted keys);
        the index of a leaf here seeds its random projection.
      fallback: the leaves on the generic per-example path.
      reasons: why, one line per layer or module (empty when nothing falls back).
      batch_size: ``B`` of the traced input.
    """

    layers: tuple[LayerSpec, ...]
    leaf_keys: tuple[tuple[str, ...], ...]
    fallback: tuple[tuple[str, ...], ...]
    reasons: tuple[str, ...]
    batch_size: int


def generic_plan(params: Params, batch_size: int) -> CapturePlan:
    """A plan that sends every parameter leaf to the generic per-example path."""
    keys = _leaf_keys(params)
    return CapturePlan((), keys, keys, ("the generic path was requested",), batch_size)


def _leaf_keys(params: Params) -> tuple[tuple[str, ...], ...]:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a Flax parameter dict (nested mappings of arrays), got "
            f"{type(params).__name__}."
        )
    return tuple(sorted(traverse_util.flatten_dict(dict(params)).keys()))


def _struct_key(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)


def _from_struct_key(key: tuple) -> Any:
    treedef, leaves = key
    return jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves]
    )


def plan_capture(model: Any, params: Params, x: Any) -> CapturePlan:
    """Which layers the capture reads and which parameter leaves fall back, for inputs like ``x``.

    Traces abstract values only (``jax.eval_shape``, twice); cached on the model and the shapes of
    ``params`` and ``x``, so it is free after the first call and safe inside ``jit``. When some
    leaves fall back, warns once per model and set of reasons.

    Args:
      model: a :class:`Task`, a ``(module, output_loss)`` pair or a :class:`CaptureModel`.
      params: the ``"params"`` collection (arrays, tracers or ``ShapeDtypeStruct``s).
      x: a batch of inputs ``[B, ...]`` (or any pytree whose leaves lead with ``B``).

    Returns:
      A :class:`CapturePlan`.
    """
    cm = as_capture_model(model)
    batch_size = _validate.batch_size(x, "batch['x']")
    if cm.module is None:
        plan = generic_plan(params, batch_size)
        reasons = ("the Task has no Flax module (build it with flax_task or models.model_task)",)
        plan = dataclasses.replace(plan, reasons=reasons)
        _warn_once("a Task without module", plan.fallback, reasons)
        return plan
    params_key, x_key = _struct_key(params), _struct_key(x)
    try:
        return _cached_plan(cm.module, params_key, x_key)
    except TypeError as error:  # a module with unhashable attributes: plan it every time
        if "unhashable" not in str(error):
            raise
        return _cached_plan.__wrapped__(cm.module, params_key, x_key)


@functools.lru_cache(maxsize=256)
def _cached_plan(module: nn.Module, params_key: tuple, x_key: tuple) -> CapturePlan:
    params = _from_struct_key(params_key)
    x = _from_struct_key(x_key)
    plan = _discover(module, params, x)
    if plan.fallback:
        _warn_once(type(module).__name__, plan.fallback, plan.reasons)
    return plan


@functools.lru_cache(maxsize=256)
def _warn_once(model_name: str, leaves: tuple, reasons: tuple) -> None:
    # Cached on its arguments: one warning per model and reason set, not one per batch shape.
    names = ", ".join("/".join(k) for k in leaves)
    warnings.warn(
        f"per-layer capture of {model_name}: {len(leaves)} parameter leaves use the generic "
        f"per-example path (vmap of grad; about one per-example backward pass each batch): "
        f"{'; '.join(reasons)}. Leaves: {names}.",
        stacklevel=4,
    )


def _trace_state():
    return jex_core.get_opaque_trace_state(convention="flax")


@dataclasses.dataclass
class _Seen:
    """What one abstract trace saw of a known layer."""

    module_type: str
    calls: list = dataclasses.field(default_factory=list)  # (call spec, in shape, out shape)
    problem: str | None = None
    variables: dict | None = None


def _trace_layers(module: nn.Module, params: Params, x: Any):
    """Runs the model abstractly with an interceptor that describes every call of a known layer."""
    seen: dict[tuple[str, ...], _Seen] = {}
    owners: dict[tuple[str, ...], str] = {}
    busy = [False]
    top = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        type_name = type(mod).__name__
        if busy[0]:
            return next_fun(*args, **kwargs)
        path = tuple(mod.path)
        owners.setdefault(path, type_name)
        known = _KNOWN_TYPES.get(type_name) is type(mod)
        if not known:
            return next_fun(*args, **kwargs)
        entry = seen.setdefault(path, _Seen(type_name))
        name = context.method_name
        if name != "__call__":
            if name != "setup" and not name.startswith("_") and entry.problem is None:
                entry.problem = f"its parameters are also read by `{type_name}.{name}` (shared)"
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        if entry.problem is not None:
            return y
        if _trace_state() != top[0]:
            entry.problem = "it runs inside a lifted transform (nn.scan, nn.remat, nn.vmap, ...)"
            return y
        busy[0] = True
        try:
            described = _describe(mod, args, kwargs, y)
        finally:
            busy[0] = False
        if isinstance(described, str):
            entry.problem = described
            return y
        layer_vars = traverse_util.flatten_dict(dict(mod.variables.get("params", {})))
        entry.variables = {k: tuple(v.shape) for k, v in layer_vars.items()}
        in_shape = tuple(np.shape(_first_input(args, kwargs)))
        entry.calls.append((described, in_shape, tuple(np.shape(y))))
        return y

    def run(p, inputs):
        top.append(_trace_state())
        with nn.intercept_methods(interceptor):
            return module.apply({"params": p}, inputs)

    jax.eval_shape(run, params, x)
    return seen, owners


def _discover(module: nn.Module, params: Params, x: Any) -> CapturePlan:
    batch_size = _validate.batch_size(x, "batch['x']")
    keys = _leaf_keys(params)
    flat = traverse_util.flatten_dict(dict(params))
    seen, owners = _trace_layers(module, params, x)
    bigger = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((s.shape[0] + 1, *s.shape[1:]), s.dtype), x
    )
    seen_bigger, _ = _trace_layers(module, params, bigger)

    layers, reasons, owned, rejected = [], [], set(), set()
    for path, entry in seen.items():
        own = {k[len(path) :]: v.shape for k, v in flat.items() if k[: len(path)] == path}
        own = {k: tuple(s) for k, s in own.items() if len(k) == 1}
        if not own:
            continue  # a layer without parameters (a normalisation without scale and bias)
        problem = entry.problem or _check_calls(entry, seen_bigger.get(path), batch_size)
        if problem is None and entry.variables != own:
            problem = "its parameters differ in shape from the ones it uses (a lifted transform)"
        expected = _EXPECTED_LEAVES[entry.module_type]
        if problem is None and any(k[0] not in expected for k in own):
            problem = f"unexpected parameters {sorted(k[0] for k in own)}"
        if problem is not None:
            reasons.append(f"{'/'.join(path) or '<root>'} ({entry.module_type}): {problem}")
            rejected.add(path)
            continue
        leaves = tuple(sorted(k[0] for k in own))
        shapes = tuple(own[(leaf,)] for leaf in leaves)
        calls = tuple(call for call, _, _ in entry.calls)
        matrix = _matrix(entry.module_type, dict(zip(leaves, shapes, strict=True)), calls[0])
        kind = _kind(entry.module_type)
        layers.append(LayerSpec(path, kind, entry.module_type, leaves, shapes, calls, matrix))
        owned.update((*path, leaf) for leaf in leaves)

    fallback = tuple(k for k in keys if k not in owned)
    for path in sorted({_owner(k, owners) for k in fallback} - rejected):
        reasons.append(
            f"{'/'.join(path) or '<root>'} ({owners.get(path, 'module')}): its parameters are "
            "not those of a layer type the capture knows"
        )
    return CapturePlan(tuple(layers), keys, fallback, tuple(reasons), batch_size)


def _owner(key: tuple[str, ...], owners: dict) -> tuple[str, ...]:
    """The deepest module path that contains parameter ``key``."""
    for cut in range(len(key) - 1, -1, -1):
        if key[:cut] in owners:
            return key[:cut]
    return ()


def _check_calls(entry: _Seen, bigger: _Seen | None, batch_size: int) -> str | None:
    if bigger is None or len(bigger.calls) != len(entry.calls) or bigger.problem is not None:
        return "it is called differently for another batch size"
    for (_, in1, out1), (_, in2, out2) in zip(entry.calls, bigger.calls, strict=True):
        for s1, s2 in ((in1, in2), (out1, out2)):
            if not (s1 and s1[0] == batch_size and s2[0] == batch_size + 1 and s1[1:] == s2[1:]):
                return (
                    f"its input or output does not carry the batch as its leading axis "
                    f"(shapes {in1} -> {out1} for a batch of {batch_size})"
                )
    return None


def _kind(module_type: str) -> str:
    if module_type in ("Dense", "DenseGeneral"):
        return DENSE
    if module_type == "Conv":
        return CONV
    if module_type == "Embed":
        return EMBED
    return SCALE_BIAS


def _matrix(module_type: str, shapes: dict, call: Any) -> tuple[int, int] | None:
    if module_type == "Embed":
        return tuple(shapes["embedding"])
    if module_type in _NORMS:
        return None
    kernel = shapes["kernel"]
    if module_type == "Conv":
        return (math.prod(kernel[:-1]), kernel[-1])
    n_in = len(call.contract_axes)
    return (math.prod(kernel[:n_in]), math.prod(kernel[n_in:]))


def _first_input(args, kwargs):
    if args:
        return args[0]
    for name in ("inputs", "x"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError("the layer was called without an input")


# --------------------------------------------------------------------- layer types: descriptions


def _describe(mod: nn.Module, args, kwargs, y) -> Any:
    """A call spec for one call of a known layer, or a string saying why it cannot be captured."""
    type_name = type(mod).__name__
    if len(args) + len(kwargs) != 1 and type_name not in _NORMS:
        return "it is called with more than one argument"
    if not hasattr(y, "shape"):
        return "its output is not a single array"
    x = _first_input(args, kwargs)
    out = (tuple(y.shape), jnp.dtype(y.dtype))
    if type_name in ("Dense", "DenseGeneral"):
        if mod.dot_general is not None or mod.dot_general_cls is not None:
            return "it uses a custom dot_general"
        if x.ndim < 2:
            return "its input has no batch axis"
        if type_name == "Dense":
            axes = (x.ndim - 1,)
        else:
            if tuple(np.atleast_1d(mod.batch_dims)):
                return "DenseGeneral with batch_dims has per-row kernels"
            axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(mod.axis).tolist()))
            if 0 in axes:
                return "it contracts the batch axis"
        positions = math.prod(s for a, s in enumerate(x.shape) if a != 0 and a not in axes)
        return DenseCall(positions, axes, *out)
    if type_name == "Conv":
        return _describe_conv(mod, x, out)
    if type_name == "Embed":
        if x.ndim < 1:
            return "its input has no batch axis"
        return EmbedCall(math.prod(x.shape[1:]), *out)
    return _describe_norm(mod, x, out)


def _describe_conv(mod: nn.Conv, x, out) -> Any:
    if mod.feature_group_count != 1:
        return f"feature_group_count={mod.feature_group_count} (only 1 is captured)"
    if mod.mask is not None:
        return "it has a kernel mask"
    if mod.conv_general_dilated is not None or mod.conv_general_dilated_cls is not None:
        return "it uses a custom conv_general_dilated"
    kernel_size = (mod.kernel_size,) if isinstance(mod.kernel_size, int) else mod.kernel_size
    kernel_size = tuple(kernel_size)
    rank = len(kernel_size)
    n_batch = x.ndim - rank - 1
    if n_batch < 1:
        return "its input has no batch axis"

    def broadcast(v):
        v = 1 if v is None else v
        return (v,) * rank if isinstance(v, int) else tuple(v)

    strides, lhs_dil, rhs_dil = (
        broadcast(mod.strides), broadcast(mod.input_dilation), broadcast(mod.kernel_dilation)
    )  # fmt: skip
    padding = canonicalize_padding(mod.padding, rank)
    spatial = tuple(x.shape[n_batch:-1])
    pre_pad = None
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dil, strict=True)]
        pre_pad = (padding, tuple(((k - 1) // 2, k // 2) for k in dilated))
        spatial = tuple(s + lo + hi for s, (lo, hi) in zip(spatial, pre_pad[1], strict=True))
        padding = "VALID"
    elif padding == "CAUSAL":
        if rank != 1:
            return "causal padding of a convolution with more than one spatial axis"
        pre_pad = ("CAUSAL", ((rhs_dil[0] * (kernel_size[0] - 1), 0),))
        spatial = (spatial[0] + pre_pad[1][0][0],)
        padding = "VALID"
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dil, strict=True)]
        padding = lax.padtype_to_pads(spatial, dilated, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    inner = math.prod(x.shape[1:n_batch])
    out_spatial = tuple(out[0][n_batch:-1])
    return ConvCall(
        kernel_size, strides, padding, lhs_dil, rhs_dil, inner, out_spatial, pre_pad, *out
    )


def _describe_norm(mod: nn.Module, x, out) -> Any:
    type_name = type(mod).__name__
    if getattr(mod, "axis_name", None) is not None:
        return "it averages statistics over a device axis (axis_name)"
    ndim = x.ndim
    if type_name == "GroupNorm":
        features = (ndim - 1,)
        reduce = mod.reduction_axes
        reduction = tuple(range(1, ndim - 1)) if reduce is None else np.atleast_1d(reduce)
    elif type_name == "InstanceNorm":
        features = tuple(a % ndim for a in np.atleast_1d(mod.feature_axes).tolist())
        reduction = ()
    else:
        features = tuple(a % ndim for a in np.atleast_1d(mod.feature_axes).tolist())
        reduction = np.atleast_1d(mod.reduction_axes)
    reduction = {int(a) % ndim for a in np.asarray(reduction).tolist()}
    if 0 in features or 0 in reduction:
        return "it normalises or scales along the batch axis"
    reduce_axes = tuple(a for a in range(1, ndim) if a not in features)
    return ScaleBiasCall(reduce_axes, *out)


# ------------------------------------------------------------------------- layer types: records


def _record(spec: LayerSpec, call: Any, mod: nn.Module, args, kwargs) -> jax.Array:
    """The canonical input of one call (see the module docstring's table)."""
    x = _first_input(args, kwargs)
    batch = x.shape[0]
    if spec.kind == DENSE:
        n_in = len(call.contract_axes)
        moved = jnp.moveaxis(x, call.contract_axes, tuple(range(x.ndim - n_in, x.ndim)))
        return moved.reshape(batch, call.positions, spec.matrix[0])
    if spec.kind == EMBED:
        return x.reshape(batch, call.positions)
    if spec.kind == CONV:
        rank = len(call.kernel_size)
        x = x.reshape(batch * call.inner, *x.shape[x.ndim - rank - 1 :])
        if call.pre_pad is not None:
            mode, pads = call.pre_pad
            pads = ((0, 0), *pads, (0, 0))
            if mode == "CAUSAL":
                x = jnp.pad(x, pads)
            else:
                x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[mode])
        return x.reshape(batch, call.inner, *x.shape[1:])
    # A normalisation: its output with scale 1 and bias 0, computed by the layer's own code.
    unit = {"scale": jnp.ones, "bias": jnp.zeros}
    layer_params = {leaf: unit[leaf](spec.shape(leaf), jnp.float32) for leaf in spec.leaves}
    return mod.clone(parent=None).apply({"params": layer_params}, *args, **kwargs)


def _canonical_cotangent(spec: LayerSpec, call: Any, cot: jax.Array) -> jax.Array:
    batch = cot.shape[0]
    if spec.kind in (DENSE, EMBED):
        return cot.reshape(batch, call.positions, -1)
    if spec.kind == CONV:
        return cot.reshape(batch, call.inner, *call.out_spatial, cot.shape[-1])
    return cot


def _describe_layer_or_none(mod: nn.Module, plan_layers: dict) -> LayerSpec | None:
    spec = plan_layers.get(tuple(mod.path))
    if spec is None or _KNOWN_TYPES.get(type(mod).__name__) is not type(mod):
        return None
    return spec if spec.module_type == type(mod).__name__ else None


# ----------------------------------------------------------------------------------- the capture


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Captures:
    """Per-layer inputs and output gradients of one batch (a pytree; ``plan`` is static).

    Attributes:
      plan: the :class:`CapturePlan` the capture followed.
      inputs: ``{layer name: (input of call 0, input of call 1, ...)}`` in the canonical forms of
        the module docstring.
      grads: ``{layer name: (output gradient of call 0, ...)}`` of the SUMMED per-example loss
        (row weights not applied), in canonical forms.
      outputs: the model outputs of the batch.
      losses: ``[B]`` per-example losses.
    """

    plan: CapturePlan = dataclasses.field(metadata={"static": True})
    inputs: dict[str, tuple[jax.Array, ...]]
    grads: dict[str, tuple[jax.Array, ...]]
    outputs: Any
    losses: jax.Array


def capture_forward(
    model: Any, params: Params, x: Any, plan: CapturePlan | None = None
) -> tuple[Any, dict[str, tuple[jax.Array, ...]], Callable[[Any], dict]]:
    """One forward pass that records every captured layer's input, and its pull-back.

    Args:
      model: a :class:`Task`, a ``(module, output_loss)`` pair or a :class:`CaptureModel`.
      params: the ``"params"`` collection.
      x: inputs ``[B, ...]``.
      plan: from :func:`plan_capture` (computed when ``None``).

    Returns:
      ``(outputs, inputs, pullback)``: the model outputs, ``{layer name: (input per call, ...)}``,
      and ``pullback(cotangent of outputs) -> {layer name: (output gradient per call, ...)}``;
      call ``pullback`` as often as needed (one backward pass each, no weight gradients).
    """
    cm = as_capture_model(model)
    if plan is None:
        plan = plan_capture(cm, params, x)
    if not plan.layers:
        return cm.outputs(params, x), {}, lambda cotangent: {}
    layers = {spec.path: spec for spec in plan.layers}
    zeros = {
        spec.name: tuple(jnp.zeros(call.out_shape, call.out_dtype) for call in spec.calls)
        for spec in plan.layers
    }

    def forward(perturbations):
        counts: dict[str, int] = {}
        inputs: dict[str, list] = {}
        busy = [False]

        def interceptor(next_fun, args, kwargs, context):
            if busy[0] or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            spec = _describe_layer_or_none(context.module, layers)
            if spec is None:
                return next_fun(*args, **kwargs)
            index = counts.get(spec.name, 0)
            counts[spec.name] = index + 1
            if index >= len(spec.calls):
                raise RuntimeError(
                    f"layer {spec.name} was called {index + 1} times but the capture plan saw "
                    f"{len(spec.calls)}; the model must call its layers the same way every time."
                )
            y = next_fun(*args, **kwargs)
            busy[0] = True
            try:
                recorded = _record(spec, spec.calls[index], context.module, args, kwargs)
            finally:
                busy[0] = False
            inputs.setdefault(spec.name, []).append(recorded)
            return y + perturbations[spec.name][index]

        with nn.intercept_methods(interceptor):
            outputs = cm.module.apply({"params": params}, x)
        return outputs, {name: tuple(values) for name, values in inputs.items()}

    outputs, vjp_fn, inputs = jax.vjp(forward, zeros, has_aux=True)

    def pullback(cotangent):
        (grads,) = vjp_fn(cotangent)
        return {
            spec.name: tuple(
                _canonical_cotangent(spec, call, g)
                for call, g in zip(spec.calls, grads[spec.name], strict=True)
            )
            for spec in plan.layers
        }

    return outputs, inputs, pullback


def loss_cotangent(cm: CaptureModel, outputs: Any, batch: Batch) -> tuple[jax.Array, Any]:
    """``(losses [B], d(sum_i losses_i)/d outputs)`` for the batch's targets.

    Raises:
      ValueError: if the output loss does not return one loss per example.
    """
    losses, vjp_fn = jax.vjp(lambda o: cm.output_loss(o, batch), outputs)
    size = _validate.batch_size(batch["x"], "batch['x']")
    if losses.shape != (size,):
        raise ValueError(
            f"the output loss must return per-example losses of shape ({size},), got "
            f"{losses.shape}."
        )
    (cotangent,) = vjp_fn(jnp.ones_like(losses))
    return losses, cotangent


def capture(model: Any, params: Params, batch: Batch, plan: CapturePlan | None = None) -> Captures:
    r"""Every captured layer's inputs and output gradients for one batch: one forward, one backward.

    The differentiated scalar is :math:`\sum_i l_i` (per-example losses, row weights NOT applied),
    so ``grads`` of example ``i`` are the output gradients of :math:`l_i` alone.

    Args:
      model: a :class:`Task`, a ``(module, output_loss)`` pair or a :class:`CaptureModel`.
      params: the ``"params"`` collection.
      batch: ``{"x": [B, ...], "y": ..., optional "weights" [B, T]}``.
      plan: from :func:`plan_capture` (computed when ``None``).

    Returns:
      :class:`Captures`. Jittable (pass ``plan`` or let it be derived from static shapes).
    """
    cm = as_capture_model(model)
    if plan is None:
        plan = plan_capture(cm, params, batch["x"])
    outputs, inputs, pullback = capture_forward(cm, params, batch["x"], plan)
    losses, cotangent = loss_cotangent(cm, outputs, batch)
    return Captures(plan, inputs, pullback(cotangent), outputs, losses)
