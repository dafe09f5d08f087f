"""Meshes with named axes and the rules that shard any pytree over them; always passed in, never global.

* :mod:`unlearn_jax.sharding.mesh`: :func:`make_mesh` (axes ``data``, ``fsdp``, ``tensor``, any
  subset), :func:`data_mesh`, and batch placement (:func:`shard_batch`, :func:`batch_sharding`).
* :mod:`unlearn_jax.sharding.rules`: :class:`ShardingRules` (logical axis names -> mesh axes, an
  FSDP fallback, explicit path overrides), :func:`partition_specs`, :func:`shardings_for`,
  :func:`shard_state`, :func:`sharded_init`, :func:`logical_axes`.
* :mod:`unlearn_jax.sharding.placement`: :class:`Placement` (mesh + rules + logical names), what
  the library's jitted steps (statistics, ``unlearn``, ``fit``) take as ``mesh=``/``rules=``.

A sharded training step, end to end::

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rules = sharding.ShardingRules()
    names = sharding.logical_axes(jax.eval_shape(model.init, key, x))
    state = sharding.shard_state(state, mesh, rules, logical=names)
    state_shardings = sharding.shardings_for(state, mesh, rules, logical=names)
    step = jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=state_shardings, donate_argnums=0)
"""

from unlearn_jax.sharding.mesh import (
    BATCH_AXES,
    DATA_AXIS,
    FSDP_AXIS,
    MESH_AXES,
    TENSOR_AXIS,
    batch_axes,
    batch_sharding,
    data_mesh,
    make_mesh,
    replicate,
    shard_batch,
)
from unlearn_jax.sharding.placement import Frozen, Placement, placement
from unlearn_jax.sharding.rules import (
    DEFAULT_LOGICAL_AXES,
    DEFAULT_RULES,
    ShardingRules,
    logical_axes,
    partition_specs,
    shard_state,
    sharded_init,
    shardings_for,
)

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "DEFAULT_LOGICAL_AXES",
    "DEFAULT_RULES",
    "FSDP_AXIS",
    "MESH_AXES",
    "TENSOR_AXIS",
    "Frozen",
    "Placement",
    "ShardingRules",
    "batch_axes",
    "batch_sharding",
    "data_mesh",
    "logical_axes",
    "make_mesh",
    "partition_specs",
    "placement",
    "replicate",
    "shard_batch",
    "shard_state",
    "sharded_init",
    "shardings_for",
]
