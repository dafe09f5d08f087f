"""Where the library's jitted steps put their inputs and outputs on a mesh the caller passed in.

A :class:`Placement` bundles a mesh, the sharding rules and the parameters' logical axis names.
Every compiled step of the library (a statistic's accumulate, a method's ``init`` and ``update``,
a training step) asks it for the shardings of its arguments and results, so that

* parameters keep the sharding the rules give them, and every step returns them with the same
  sharding (the invariant optax keeps: ``update`` never moves the state);
* a method state, a statistic, an optimizer state get their shardings from their shapes
  (``jax.eval_shape``): leaves that mirror the parameters get the parameters' specs;
* batches are split along their leading axis over the mesh's batch axes (``data`` and ``fsdp``).

A placement is hashable, so compiled steps are cached per placement like per method: a second
request on the same mesh compiles nothing. ``None`` everywhere means "no mesh": plain ``jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unlearn_jax.sharding.mesh import batch_axes, batch_sharding
from unlearn_jax.sharding.rules import DEFAULT_RULES, ShardingRules, shardings_for


class Frozen:
    """A pytree of shardings (or ``None``) made hashable, for static arguments and caches."""

    __slots__ = ("_hash", "_key", "tree")

    def __init__(self, tree: Any):
        self.tree = tree
        leaves, treedef = jax.tree_util.tree_flatten(
            tree, is_leaf=lambda x: isinstance(x, NamedSharding)
        )
        self._key = (treedef, tuple(leaves))
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frozen) and self._key == other._key


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh, its sharding rules and the parameters' logical axis names (module docstring).

    Attributes:
      mesh: the ``Mesh`` (axes among ``data``, ``fsdp``, ``tensor``).
      rules: :class:`~unlearn_jax.sharding.ShardingRules` (default :data:`DEFAULT_RULES`).
      logical: ``((path, names), ...)`` from :func:`~unlearn_jax.sharding.logical_axes` (a
        mapping is converted), for parameters annotated with Flax logical names.
    """

    mesh: Mesh
    rules: ShardingRules = DEFAULT_RULES
    logical: tuple = ()

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}.")
        if isinstance(self.logical, Mapping):
            object.__setattr__(self, "logical", tuple(sorted(self.logical.items())))

    @property
    def batch_size_multiple(self) -> int:
        """Batches are split over this many devices: their rows must be a multiple of it."""
        size = 1
        for axis in batch_axes(self.mesh):
            size *= self.mesh.shape[axis]
        return size

    def of(self, tree: Any) -> Any:
        """The ``NamedSharding`` pytree of ``tree`` (arrays or ``ShapeDtypeStruct``s)."""
        return shardings_for(tree, self.mesh, self.rules, logical=dict(self.logical) or None)

    def batch(self) -> NamedSharding:
        """The sharding of a batch leaf: the leading axis over the batch axes."""
        return batch_sharding(self.mesh)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def put(self, tree: Any) -> Any:
        """``tree`` placed with :meth:`of`'s shardings (no copy for leaves already placed so)."""
        return jax.device_put(tree, self.of(tree))

    def put_batch(self, batch: Any) -> Any:
        """A batch placed with :meth:`batch` (rows must be a multiple of the batch devices)."""
        if batch is None:
            return None
        sharding = self.batch()
        return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), batch)


def placement(
    mesh: Mesh | None, rules: ShardingRules | None = None, logical=None
) -> Placement | None:
    """A :class:`Placement`, or ``None`` without a mesh (then ``rules``/``logical`` must be None)."""
    if mesh is None:
        if rules is not None or logical:
            raise ValueError("rules= and logical= place arrays on a mesh: pass mesh= too.")
        return None
    return Placement(mesh, DEFAULT_RULES if rules is None else rules, logical or ())


__all__ = ["Frozen", "Placement", "placement"]
