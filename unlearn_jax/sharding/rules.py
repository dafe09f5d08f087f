"""Sharding rules: from parameter paths and Flax logical axis names to ``PartitionSpec``s.

A leaf of any pytree (parameters, a ``TrainState``, an optax state, a method state; arrays or
``jax.ShapeDtypeStruct``s) gets its :class:`~jax.sharding.PartitionSpec` by the first of these that
applies:

1. **Overrides** (explicit): the first ``(regex, PartitionSpec)`` of ``rules.overrides`` whose regex
   matches (``re.search``) the leaf's path, written ``"opt_state/0/mu/embed/embedding"``. The user
   asked for exactly this, so an axis missing from the mesh or a dimension it does not divide is an
   error.
2. Scalars, PRNG keys and leaves with fewer than ``rules.min_size`` elements are **replicated**.
3. **Logical names**: a leaf whose path ends with the path of an annotated parameter (so
   ``params/...``, ``opt_state/0/mu/...`` and a method state's copy of the parameters all match)
   maps each logical axis name through ``rules.logical_axes`` (``"mlp" -> "tensor"``, ...). A leaf
   with more dimensions than names (a stacked population) leaves the leading ones unsharded. Mesh
   axes the mesh lacks are dropped (so the defaults work on any subset of ``data``/``fsdp``/
   ``tensor``), and so are axes whose size does not divide the dimension: those stay replicated.
4. **FSDP**: if the mesh has ``rules.fsdp_axis`` (size > 1) and the leaf does not use it yet, the
   largest dimension that stays divisible is also split over it. So under an FSDP mesh no leaf of
   ``min_size`` elements or more is fully replicated unless none of its dimensions is divisible.

Where the names come from. Flax modules annotate parameters with ``nn.with_logical_partitioning``;
``model.init`` (or ``jax.eval_shape(model.init, ...)``, no arrays needed) then returns
``nn.LogicallyPartitioned`` boxes. Pass such a boxed tree directly (its names are read and the
shardings returned for the unboxed tree), or read the names once with :func:`logical_axes` and pass
them as ``logical=`` with plain trees. ``nn.Partitioned`` boxes (``nn.with_partitioning``) name mesh
axes directly; those names are used as they are.

The mapping from logical to mesh axes is configuration (:class:`ShardingRules`), never global
state: no ``nn.logical_axis_rules`` context and no global mesh are involved.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unlearn_jax import _validate
from unlearn_jax.sharding.mesh import DATA_AXIS, FSDP_AXIS, MESH_AXES, TENSOR_AXIS

MeshAxes = str | tuple[str, ...] | None
Path = tuple[str, ...]
LogicalAxes = Mapping[Path, tuple[str | None, ...]]

DEFAULT_LOGICAL_AXES: Mapping[str, MeshAxes] = types.MappingProxyType(
    {
        "batch": (DATA_AXIS, FSDP_AXIS),
        "embed": FSDP_AXIS,
        # The vocabulary over fsdp too: XLA then gathers the (small) activations for the tied
        # logits instead of the [V, D] embedding; lm-100m on 8 devices: 160 MiB of temporaries
        # per device instead of 390 MiB.
        "vocab": (TENSOR_AXIS, FSDP_AXIS),
        "heads": TENSOR_AXIS,
        "mlp": TENSOR_AXIS,
        "kv": None,
        "norm": None,
        "layers": None,
        "length": None,
    }
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How leaves are split over a mesh (see the module docstring for the order of precedence).

    Attributes:
      logical_axes: logical axis name -> mesh axis, tuple of mesh axes (in order, each used when
        it divides what is left), or ``None`` (replicated). The default puts ``heads`` and ``mlp``
        on ``tensor`` (Megatron-style tensor parallelism of attention and MLP kernels), ``embed``
        on ``fsdp``, and ``vocab`` on ``tensor`` then ``fsdp`` (so the embedding ``[V, D]`` is
        split along the vocabulary, and along ``D`` only when ``V`` is not divisible). A logical
        name used by a model must appear here (map it to ``None`` to replicate).
      fsdp_axis: the mesh axis of the FSDP fallback (rule 4); ``None`` disables it.
      min_size: leaves with fewer elements stay replicated (norm scales, biases, counters): splitting
        them saves nothing and costs a gather.
      overrides: ``(regex, PartitionSpec)`` pairs, matched in order against ``"a/b/c"`` leaf paths;
        explicit, strictly validated.

    Raises:
      ValueError: (on construction) for a negative ``min_size``, an override that is not a
        ``(str, PartitionSpec)`` pair or whose regex does not compile, or a mapping value that is
        not a string, tuple of strings or ``None``.
    """

    logical_axes: Mapping[str, MeshAxes] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_LOGICAL_AXES)
    )
    fsdp_axis: str | None = FSDP_AXIS
    min_size: int = 1024
    overrides: Sequence[tuple[str, PartitionSpec]] = ()

    def __post_init__(self):
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int | np.integer):
            raise ValueError(f"min_size must be an int >= 0, got min_size={self.min_size!r}.")
        _validate.non_negative(min_size=self.min_size)
        object.__setattr__(self, "logical_axes", types.MappingProxyType(dict(self.logical_axes)))
        for name, axes in self.logical_axes.items():
            ok = axes is None or isinstance(axes, str)
            ok = ok or (isinstance(axes, tuple) and all(isinstance(a, str) for a in axes))
            if not ok:
                raise ValueError(
                    f"logical_axes[{name!r}] must be a mesh axis name, a tuple of them or None, got "
                    f"{axes!r}."
                )
        overrides = tuple(self.overrides)
        for item in overrides:
            if not (
                isinstance(item, tuple)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], PartitionSpec)
            ):
                raise ValueError(
                    f"overrides must hold (regex, PartitionSpec) pairs, got {item!r}; e.g. "
                    "(r'embed/embedding$', PartitionSpec('tensor', 'fsdp'))."
                )
            try:
                re.compile(item[0])
            except re.error as err:
                raise ValueError(f"override regex {item[0]!r} does not compile: {err}") from None
        object.__setattr__(self, "overrides", overrides)

    def replace(self, **changes: Any) -> ShardingRules:
        """A copy with some fields changed, e.g. ``rules.replace(min_size=0)``."""
        return dataclasses.replace(self, **changes)


DEFAULT_RULES = ShardingRules()


# ---- reading logical names -------------------------------------------------------------------
def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path(path: Sequence[Any]) -> Path:
    return tuple(_key_name(e) for e in path)


def logical_axes(tree: Any) -> dict[Path, tuple[str | None, ...]]:
    """The axis names of the boxed (``nn.Partitioned`` / ``nn.LogicallyPartitioned``) leaves of a tree.

    Args:
      tree: e.g. ``model.init(key, x)`` or ``jax.eval_shape(model.init, key, x)``, the full
        variables or their ``"params"``. A top-level ``"params"`` key is dropped from the paths, so
        the names match the parameter tree the library works with.

    Returns:
      ``{path: names}``, ``path`` a tuple of keys (``("layers_0", "mlp", "wi", "kernel")``) and
      ``names`` one name (or ``None``) per dimension. Unboxed leaves are absent.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
    out = {}
    for path, leaf in leaves:
        if not _is_box(leaf):
            continue
        key = _path(path)
        if key[:1] == ("params",):
            key = key[1:]
        out[key] = tuple(leaf.names)
    return out


def _merge_logical(tree: Any, logical: LogicalAxes | None) -> tuple[Any, dict[Path, tuple]]:
    names = dict(logical_axes(tree))
    if logical is not None:
        names.update({tuple(k): tuple(v) for k, v in logical.items()})
    return nn.unbox(tree), names


def _match_logical(path: Path, ndim: int, names: Mapping[Path, tuple]) -> tuple | None:
    # The longest annotated path that the leaf's path ends with, e.g. the params' ("embed",
    # "embedding") for ("opt_state", "0", "mu", "embed", "embedding").
    for start in range(len(path)):
        found = names.get(path[start:])
        if found is not None and len(found) <= ndim:
            return (None,) * (ndim - len(found)) + tuple(found)
    return None


# ---- the rules ---------------------------------------------------------------------------------
def partition_specs(
    tree: Any,
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: ShardingRules | None = None,
    *,
    logical: LogicalAxes | None = None,
) -> Any:
    """The ``PartitionSpec`` of every leaf of ``tree`` under ``rules`` on ``mesh``.

    Args:
      tree: any pytree of arrays or ``jax.ShapeDtypeStruct``s, possibly holding Flax partitioning
        boxes (their names are read; the result has the unboxed structure).
      mesh: a ``Mesh`` (or ``AbstractMesh``: only axis names and sizes are read).
      rules: default :data:`DEFAULT_RULES`.
      logical: extra ``{path: names}`` (from :func:`logical_axes`) for plain trees.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``nn.unbox(tree)``.

    Raises:
      ValueError: for a logical name absent from ``rules.logical_axes`` (and not a mesh axis), a
        mesh axis name that is neither in the mesh nor one of ``data``/``fsdp``/``tensor``, or an
        override naming an axis the mesh lacks, not dividing its dimension, or longer than the
        leaf's rank.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if not isinstance(rules, ShardingRules):
        raise TypeError(f"rules must be a ShardingRules, got {type(rules).__name__}.")
    sizes = dict(mesh.shape)
    _check_axis(rules.fsdp_axis, sizes, "rules.fsdp_axis")
    tree, names = _merge_logical(tree, logical)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = [_leaf_spec(_path(p), leaf, sizes, rules, names) for p, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, specs)


def shardings_for(
    tree: Any,
    mesh: Mesh,
    rules: ShardingRules | None = None,
    *,
    logical: LogicalAxes | None = None,
) -> Any:
    """The ``NamedSharding`` pytree of ``tree`` (arrays or ``ShapeDtypeStruct``s) under ``rules``.

    Use it for ``jax.jit``'s ``in_shardings``/``out_shardings``. The shardings of a state that has
    not been built yet follow from its shapes::

        shapes = jax.eval_shape(method.init, params, key, example_batch=batch)
        state_shardings = shardings_for(shapes, mesh, rules, logical=names)

    Leaves mirroring the parameters (optimizer moments, a stored gradient) get the parameters'
    specs; scalars (step counts) are replicated.

    Args and Raises: as :func:`partition_specs`.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``nn.unbox(tree)``.
    """
    specs = partition_specs(tree, mesh, rules, logical=logical)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def shard_state(
    tree: Any,
    mesh: Mesh,
    rules: ShardingRules | None = None,
    *,
    logical: LogicalAxes | None = None,
) -> Any:
    """Places every leaf of ``tree`` (unboxed) on ``mesh`` with its sharding from :func:`shardings_for`.

    Works for parameters, a ``TrainState`` (static fields untouched), optimizer and method states.
    Each device receives only its shards (``jax.device_put`` with ``NamedSharding``s); to avoid
    holding the whole tree on one device in the first place, build it with :func:`sharded_init`.

    Returns:
      ``nn.unbox(tree)`` with every array leaf placed.
    """
    shardings = shardings_for(tree, mesh, rules, logical=logical)
    return jax.device_put(nn.unbox(tree), shardings)


def sharded_init(
    init_fn: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    rules: ShardingRules | None = None,
    logical: LogicalAxes | None = None,
) -> tuple[Any, Any]:
    """Runs ``init_fn(*args)`` under ``jit`` with output shardings from its ``eval_shape``.

    Every device computes only its own shards (random initialisers are partitionable under JAX's
    default ``jax_threefry_partitionable``), so a model too large for one device is never
    materialised unsharded. Boxed outputs are unboxed, their names used for the rules.

    Example::

        params, shardings = sharded_init(
            lambda k: model.init(k, x)["params"], key, mesh=mesh, rules=rules
        )

    Compiles ``init_fn`` once per call: an initialisation path, not for a loop.

    Returns:
      ``(tree, shardings)``: the unboxed output, placed, and its ``NamedSharding`` pytree.
    """
    shapes = jax.eval_shape(init_fn, *args)
    shardings = shardings_for(shapes, mesh, rules, logical=logical)
    tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


# ---- one leaf ----------------------------------------------------------------------------------
def _check_axis(axis: str | None, sizes: Mapping[str, int], what: str) -> None:
    if axis is not None and axis not in sizes and axis not in MESH_AXES:
        raise ValueError(
            f"{what} names mesh axis {axis!r}, which is neither an axis of the mesh "
            f"{tuple(sizes)} nor one of {MESH_AXES}."
        )


def _leaf_spec(
    path: Path, leaf: Any, sizes: Mapping[str, int], rules: ShardingRules, names: Mapping
) -> PartitionSpec:
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    where = "/".join(path) or "<root>"
    for pattern, spec in rules.overrides:
        if re.search(pattern, where):
            return _checked_override(where, shape, spec, pattern, sizes)
    dtype = getattr(leaf, "dtype", None)
    is_key = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if not shape or is_key or math.prod(shape) < rules.min_size:
        return PartitionSpec()
    spec: list[tuple[str, ...]] = [() for _ in shape]
    used: set[str] = set()
    leaf_names = _match_logical(path, len(shape), names)
    for dim, name in enumerate(leaf_names or ()):
        if name is None:
            continue
        axes = _mesh_axes_of(name, rules, sizes, where)
        for axis in axes:
            size = sizes.get(axis, 1)
            divides = shape[dim] % (math.prod(sizes[a] for a in spec[dim]) * size) == 0
            if axis in sizes and size > 1 and axis not in used and divides:
                spec[dim] += (axis,)
                used.add(axis)
    fsdp = rules.fsdp_axis
    if fsdp is not None and sizes.get(fsdp, 1) > 1 and fsdp not in used:
        # Largest dimension first; ties go to the leading one.
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if shape[dim] % (math.prod(sizes[a] for a in spec[dim]) * sizes[fsdp]) == 0:
                spec[dim] += (fsdp,)
                break
    entries = [None if not a else a[0] if len(a) == 1 else a for a in spec]
    while entries and entries[-1] is None:  # canonical form: P() for replicated, no trailing None
        entries.pop()
    return PartitionSpec(*entries)


def _mesh_axes_of(
    name: str, rules: ShardingRules, sizes: Mapping[str, int], where: str
) -> tuple[str, ...]:
    if name in rules.logical_axes:
        value = rules.logical_axes[name]
        axes = () if value is None else (value,) if isinstance(value, str) else value
        for axis in axes:
            _check_axis(axis, sizes, f"rules.logical_axes[{name!r}]")
        return axes
    if name in sizes or name in MESH_AXES:  # an nn.with_partitioning box names mesh axes
        return (name,)
    raise ValueError(
        f"leaf {where!r} has logical axis name {name!r}, which rules.logical_axes does not map "
        f"(it maps {sorted(rules.logical_axes)}); add it, e.g. "
        f"rules.replace(logical_axes={{**rules.logical_axes, {name!r}: None}}) to replicate."
    )


def _checked_override(
    where: str, shape: tuple[int, ...], spec: PartitionSpec, pattern: str, sizes: Mapping
) -> PartitionSpec:
    if len(spec) > len(shape):
        raise ValueError(
            f"override {pattern!r} gives leaf {where!r} of shape {shape} the spec {spec}, which has "
            f"more entries than the leaf has dimensions."
        )
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for axis in axes:
            if axis not in sizes:
                raise ValueError(
                    f"override {pattern!r} shards leaf {where!r} over mesh axis {axis!r}, which the "
                    f"mesh {dict(sizes)} does not have."
                )
        devices = math.prod(sizes[a] for a in axes)
        if shape[dim] % devices:
            raise ValueError(
                f"override {pattern!r} splits dimension {dim} (size {shape[dim]}) of leaf {where!r} "
                f"over {axes} ({devices} devices), which does not divide it."
            )
    return spec
