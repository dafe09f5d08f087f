"""Sharding rules on 8 fake CPU devices; run by tests/test_sharding_rules.py in its own process,
because the device count must be set before JAX starts.

Checks: batch placement over the data and fsdp axes; ``sharded_init`` builds every device's shards
only and equals the unsharded initialisation; ``shard_state`` places a ``TrainState`` (parameters and
Adam moments) with the specs of the rules, every leaf of ``min_size`` elements or more split over
fsdp; one jitted training step with in/out shardings and donation keeps every sharding, compiles
once, and equals the unsharded step to float32 tolerance, for the scanned transformer under a
data x fsdp x tensor mesh and for an unannotated MLP (the FSDP fallback) under data x fsdp.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    # Compilation dominates this check on a CPU; LLVM's level 0 compiles 2-3x faster.
    + " --xla_backend_optimization_level=0"
)

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unlearn_jax import sharding
from unlearn_jax.models import MLP, TransformerLM, model_task

# Sharded and unsharded steps sum in different orders: float32 rounding only.
RTOL, ATOL = 1e-5, 1e-6
KEY = jax.random.key(0)
V, T, B = 64, 8, 16
LM = TransformerLM(
    num_outputs=V, d_model=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=T, scan_layers=True
)
# Adam with a large epsilon: its first step is nearly sign(g), which would turn float32 rounding of
# gradients near 0 into lr-sized differences; eps = 1e-3 keeps the update a smooth function of g.
OPTIMIZER = optax.adam(1e-2, eps=1e-3)


def _step(task):
    def step(state, batch):
        loss, grads = jax.value_and_grad(task.batch_loss)(state.params, batch)
        return state.apply_gradients(grads=grads), loss

    return step


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _assert_placed(tree, shardings, what):
    for (path, leaf), want in zip(_leaves(tree), jax.tree.leaves(shardings), strict=True):
        where = f"{what}{jax.tree_util.keystr(path)}"
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (where, leaf.sharding, want)
        shard = leaf.addressable_shards[0].data.shape
        assert shard == want.shard_shape(leaf.shape), (where, shard)


def check_batch_placement():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and mesh.devices.size == 8
    batch = sharding.shard_batch({"x": np.zeros((16, 3), np.float32)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    assert batch["x"].addressable_shards[0].data.shape == (2, 3)
    only_data = sharding.shard_batch({"x": np.zeros((4, 3))}, mesh, "data")
    assert only_data["x"].addressable_shards[0].data.shape == (2, 3)
    try:
        sharding.shard_batch({"x": np.zeros((12, 3))}, mesh)
    except ValueError as err:
        assert "batch size 12 is not divisible by the 8 devices" in str(err), err
    else:
        raise AssertionError("a batch of 12 over 8 devices must be refused")


def check_training_step(model, batch, mesh_axes):
    task = model_task(model)
    sample = batch["x"][:1]
    names = sharding.logical_axes(jax.eval_shape(model.init, KEY, sample))
    init = lambda k: model.init(k, sample)["params"]
    params = jax.jit(lambda k: nn.unbox(init(k)))(KEY)
    # Eager optimizer init: a TrainState without compiling create_train_state's program.
    state = TrainState.create(apply_fn=model.apply, params=params, tx=OPTIMIZER)
    ref_state, ref_loss = jax.jit(_step(task))(state, batch)
    host_state = jax.device_get(state)  # fresh buffers for each mesh: the sharded step donates
    for i, axes in enumerate(mesh_axes):
        mesh = sharding.make_mesh(axes)
        shardings = sharding.shardings_for(host_state, mesh, logical=names)
        if i == 0:
            # sharded_init: each device computes its own shards only, equal to the unsharded init.
            sharded_params, param_shardings = sharding.sharded_init(init, KEY, mesh=mesh)
            assert param_shardings == shardings.params
            _assert_placed(sharded_params, param_shardings, f"{axes} sharded_init")
            for got, want in zip(
                jax.tree.leaves(sharded_params), jax.tree.leaves(params), strict=True
            ):
                np.testing.assert_array_equal(got, want)
        sharded = sharding.shard_state(host_state, mesh, logical=names)
        _assert_placed(sharded, shardings, f"{axes} state")
        if "fsdp" in axes:  # every leaf of >= min_size elements is split over fsdp
            for path, leaf in _leaves(sharded):
                if leaf.size >= sharding.DEFAULT_RULES.min_size:
                    assert len(leaf.addressable_shards[0].data.ravel()) < leaf.size, path
        batch_sharding = sharding.batch_sharding(mesh)
        step = jax.jit(
            _step(task),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        new, loss = step(sharded, sharding.shard_batch(batch, mesh))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(sharded.params)), "not donated"
        _assert_placed(new, shardings, f"{axes} stepped state")
        np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg=str(axes))
        for (path, got), want in zip(_leaves(new), jax.tree.leaves(ref_state), strict=True):
            np.testing.assert_allclose(
                got, want, rtol=RTOL, atol=ATOL, err_msg=f"{axes}{jax.tree_util.keystr(path)}"
            )
        # Retrace guard: a second step reuses the compiled program.
        step(new, sharding.shard_batch(batch, mesh))
        assert step._cache_size() == 1, step._cache_size()


def main():
    assert jax.device_count() == 8, jax.devices()
    check_batch_placement()
    rng = np.random.default_rng(0)
    lm_batch = {
        "x": rng.integers(0, V, (B, T)).astype(np.int32),
        "y": rng.integers(0, V, (B, T)).astype(np.int32),
        "weights": (rng.uniform(size=(B, T)) < 0.7).astype(np.float32),
    }
    # One mesh per model: every compilation costs seconds on a CPU.
    check_training_step(LM, lm_batch, [{"data": 2, "fsdp": 2, "tensor": 2}])
    mlp_batch = {
        "x": rng.normal(size=(B, 64)).astype(np.float32),
        "y": rng.integers(0, 10, B).astype(np.int32),
    }
    check_training_step(MLP(10, (64, 64)), mlp_batch, [{"data": 2, "fsdp": 4}])
    print("SHARDING_RULES_OK")


if __name__ == "__main__":
    main()
