"""Sharding rules: hand-written spec tables for the transformer under data / fsdp / fsdp x tensor
meshes, the FSDP fallback, optimizer states mirroring the parameters, overrides and errors.

The tables are computed on ``jax.sharding.AbstractMesh``es (axis names and sizes, no devices), so
they run in this process; placing arrays and a sharded training step need 8 devices and run in
their own process (tests/sharding_rules_check.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from tests._subprocess import run_check
from unlearn_jax import sharding
from unlearn_jax.models import MLP, TransformerLM

LM = TransformerLM(num_outputs=64, d_model=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=8)
KEY = jax.random.key(0)
TOKENS = jax.ShapeDtypeStruct((2, 8), jnp.int32)


def _mesh(**axes):
    return AbstractMesh(tuple(axes.values()), tuple(axes))


@functools.cache
def _boxed(model=LM):
    return jax.eval_shape(model.init, KEY, TOKENS)["params"]


def _flat(specs):
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): s for path, s in leaves}


# The expected specs of one block's leaves, written out by hand from the default rules
# (embed -> fsdp; heads, mlp -> tensor; vocab -> tensor then fsdp; kv, norm, layers -> replicated;
# leaves under 1024 elements replicated); keys are paths inside layers_{i}.
BLOCK = {
    "data": {},
    "fsdp": {
        "attn/query/kernel": P("fsdp"),
        "attn/key/kernel": P("fsdp"),
        "attn/value/kernel": P("fsdp"),
        "attn/out/kernel": P(None, None, "fsdp"),
        "mlp/wi/kernel": P("fsdp"),
        "mlp/wo/kernel": P(None, "fsdp"),
    },
    "fsdp_tensor": {
        "attn/query/kernel": P("fsdp", "tensor"),
        "attn/key/kernel": P("fsdp", "tensor"),
        "attn/value/kernel": P("fsdp", "tensor"),
        "attn/out/kernel": P("tensor", None, "fsdp"),
        "mlp/wi/kernel": P("fsdp", "tensor"),
        "mlp/wo/kernel": P("tensor", "fsdp"),
    },
}
EMBEDDING = {"data": P(), "fsdp": P("fsdp"), "fsdp_tensor": P(("tensor", "fsdp"))}
MESHES = {
    "data": _mesh(data=8),
    "fsdp": _mesh(fsdp=8),
    "fsdp_tensor": _mesh(fsdp=4, tensor=2),
}


def _expected(kind, prefix_layers):
    want = {"embed/embedding": EMBEDDING[kind], "final_norm/scale": P()}
    blocks = ["layers"] if prefix_layers else [f"layers_{i}" for i in range(2)]
    for block in blocks:
        for norm in ("attn_norm/scale", "mlp_norm/scale"):
            want[f"{block}/{norm}"] = P()
        for leaf in BLOCK["fsdp"]:
            spec = BLOCK[kind].get(leaf, P())
            # The scanned leaves have a leading [L] axis named "layers", left unsharded.
            want[f"{block}/{leaf}"] = P(None, *spec) if prefix_layers and spec != P() else spec
    return want


@pytest.mark.parametrize("kind", sorted(MESHES))
@pytest.mark.parametrize("scan", [False, True])
def test_transformer_specs_follow_the_hand_written_tables(kind, scan):
    model = LM.clone(scan_layers=scan)
    got = _flat(sharding.partition_specs(_boxed(model), MESHES[kind]))
    assert got == _expected(kind, scan)


def test_data_fsdp_tensor_mesh_splits_like_fsdp_x_tensor_and_never_over_data():
    got = _flat(sharding.partition_specs(_boxed(), _mesh(data=2, fsdp=2, tensor=2)))
    assert got == _expected("fsdp_tensor", False)


@pytest.mark.parametrize("model", [LM, LM.clone(scan_layers=True), MLP(10, (64, 64))])
def test_under_fsdp_only_leaves_below_the_threshold_are_fully_replicated(model):
    x = TOKENS if isinstance(model, TransformerLM) else jax.ShapeDtypeStruct((2, 64), jnp.float32)
    shapes = jax.eval_shape(model.init, KEY, x)["params"]
    specs = sharding.partition_specs(shapes, _mesh(fsdp=8))
    sizes = {k: int(np.prod(s.shape)) for k, s in _flat(nn.unbox(shapes)).items()}
    replicated = {k for k, s in _flat(specs).items() if all(e is None for e in s)}
    assert replicated == {k for k, n in sizes.items() if n < sharding.DEFAULT_RULES.min_size}
    assert replicated != set(sizes)  # something is sharded


def test_optimizer_state_leaves_get_the_parameters_specs_and_scalars_are_replicated():
    names = sharding.logical_axes(_boxed())
    params = nn.unbox(_boxed())
    state = jax.eval_shape(optax.adamw(1e-3).init, params)
    mesh = MESHES["fsdp_tensor"]
    param_specs = sharding.partition_specs(params, mesh, logical=names)
    specs = sharding.partition_specs(state, mesh, logical=names)
    assert specs[0].count == P()
    assert specs[0].mu == param_specs and specs[0].nu == param_specs
    # Reading the names from the boxes or passing them gives the same specs.
    assert sharding.partition_specs(_boxed(), mesh) == param_specs


def test_a_stacked_population_keeps_its_leading_axis_unsharded():
    names = sharding.logical_axes(_boxed())
    stacked = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((3, *s.shape), s.dtype), nn.unbox(_boxed())
    )
    specs = _flat(sharding.partition_specs(stacked, MESHES["fsdp_tensor"], logical=names))
    assert specs["layers_0/mlp/wi/kernel"] == P(None, "fsdp", "tensor")
    assert specs["embed/embedding"] == P(None, ("tensor", "fsdp"))


def test_logical_axes_reads_the_boxes_and_drops_the_params_collection():
    names = sharding.logical_axes(jax.eval_shape(LM.init, KEY, TOKENS))
    assert names[("embed", "embedding")] == ("vocab", "embed")
    assert names[("layers_1", "attn", "out", "kernel")] == ("heads", "kv", "embed")
    assert sharding.logical_axes({"w": jnp.zeros(3)}) == {}


@pytest.mark.parametrize(
    ("shape", "want"),
    [
        ((64, 32), P("fsdp")),  # the largest dimension
        ((12, 16), P(None, "fsdp")),
        ((12, 20, 3), P()),  # nothing divisible by 8: replicated
        ((20, 24), P(None, "fsdp")),  # the largest one is not divisible: the next one
        ((16, 16), P("fsdp")),  # ties go to the leading dimension
        ((), P()),
    ],
)
def test_fsdp_fallback_shards_the_largest_divisible_dimension(shape, want):
    rules = sharding.ShardingRules(min_size=0)
    tree = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    assert sharding.partition_specs(tree, _mesh(fsdp=8), rules)["w"] == want


def test_fsdp_fallback_joins_a_tensor_axis_on_the_same_dimension_when_it_divides():
    rules = sharding.ShardingRules(min_size=0)
    tree = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32)}
    specs = sharding.partition_specs(
        tree, _mesh(fsdp=4, tensor=2), rules, logical={("w",): ("vocab", None)}
    )
    assert specs["w"] == P(("tensor", "fsdp"))


def test_axes_that_do_not_divide_a_dimension_are_dropped_there():
    # 4 heads and a vocabulary of 64 over tensor=3: replicated along tensor, still fsdp-sharded.
    got = _flat(sharding.partition_specs(_boxed(), _mesh(fsdp=2, tensor=3)))
    assert got["layers_0/attn/query/kernel"] == P("fsdp")
    assert got["embed/embedding"] == P("fsdp")
    # mlp_dim 128 = 3 * 42 + 2: replicated along tensor too.
    assert got["layers_0/mlp/wi/kernel"] == P("fsdp")


def test_a_vocabulary_not_divisible_by_fsdp_leaves_fsdp_to_the_embedding_dimension():
    tree = {"embedding": jax.ShapeDtypeStruct((60, 64), jnp.float32)}
    names = {("embedding",): ("vocab", "embed")}
    assert sharding.partition_specs(tree, _mesh(fsdp=8), logical=names)["embedding"] == P(
        None, "fsdp"
    )
    specs = sharding.partition_specs(tree, _mesh(fsdp=4, tensor=2), logical=names)
    assert specs["embedding"] == P("tensor", "fsdp")


def test_prng_keys_and_small_leaves_are_replicated():
    tree = {
        "key": jax.eval_shape(lambda: jax.random.split(KEY, 4096)),
        "small": jax.ShapeDtypeStruct((1000,), jnp.float32),
        "count": jax.ShapeDtypeStruct((), jnp.int32),
        "big": jax.ShapeDtypeStruct((1024,), jnp.float32),
    }
    specs = sharding.partition_specs(tree, _mesh(fsdp=8))
    assert specs == {"key": P(), "small": P(), "count": P(), "big": P("fsdp")}


def test_overrides_win_and_are_checked_strictly():
    rules = sharding.ShardingRules(overrides=((r"embed/embedding$", P("fsdp", "tensor")),))
    got = _flat(sharding.partition_specs(_boxed(), MESHES["fsdp_tensor"], rules))
    assert got["embed/embedding"] == P("fsdp", "tensor")
    assert got["layers_0/mlp/wi/kernel"] == P("fsdp", "tensor")
    too_many = sharding.ShardingRules(overrides=((r"final_norm", P(None, "fsdp")),))
    with pytest.raises(ValueError, match=r"more entries than the leaf has dimensions"):
        sharding.partition_specs(_boxed(), MESHES["fsdp"], too_many)
    absent = sharding.ShardingRules(overrides=((r"embedding", P("tensor")),))
    with pytest.raises(ValueError, match=r"mesh axis 'tensor', which the mesh \{'fsdp': 8\}"):
        sharding.partition_specs(_boxed(), MESHES["fsdp"], absent)
    indivisible = sharding.ShardingRules(overrides=((r"embedding", P(("fsdp", "tensor"))),))
    with pytest.raises(ValueError, match=r"dimension 0 \(size 64\).*\(6 devices\)"):
        sharding.partition_specs(_boxed(), _mesh(fsdp=2, tensor=3), indivisible)


def test_unknown_names_get_clear_errors():
    tree = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    with pytest.raises(ValueError, match=r"logical axis name 'experts'.*does not map"):
        sharding.partition_specs(tree, _mesh(fsdp=8), logical={("w",): ("experts", None)})
    rules = sharding.ShardingRules(logical_axes={"embed": "model"})
    with pytest.raises(ValueError, match=r"logical_axes\['embed'\].*'model'.*neither an axis"):
        sharding.partition_specs(tree, _mesh(fsdp=8), rules, logical={("w",): ("embed", None)})
    with pytest.raises(ValueError, match=r"fsdp_axis.*'shard'"):
        sharding.partition_specs(tree, _mesh(fsdp=8), sharding.ShardingRules(fsdp_axis="shard"))
    with pytest.raises(ValueError, match=r"unknown mesh axis name 'model'.*data.*fsdp.*tensor"):
        sharding.make_mesh({"model": 1})


def test_rules_validate_their_fields():
    with pytest.raises(ValueError, match="min_size"):
        sharding.ShardingRules(min_size=-1)
    with pytest.raises(ValueError, match=r"logical_axes\['mlp'\] must be"):
        sharding.ShardingRules(logical_axes={"mlp": ["tensor"]})
    with pytest.raises(ValueError, match=r"\(regex, PartitionSpec\) pairs"):
        sharding.ShardingRules(overrides=(("embedding", ("fsdp",)),))
    with pytest.raises(ValueError, match="does not compile"):
        sharding.ShardingRules(overrides=(("embed(", P()),))
    with pytest.raises(TypeError, match="ShardingRules"):
        sharding.partition_specs({}, _mesh(fsdp=8), {"embed": "fsdp"})


def test_make_mesh_checks_the_device_count_and_infers_one_size():
    n = jax.device_count()
    mesh = sharding.make_mesh({"data": -1})
    assert dict(mesh.shape) == {"data": n}
    with pytest.raises(ValueError, match=rf"need {2 * n} devices but {n} were given"):
        sharding.make_mesh({"data": 2 * n})
    with pytest.raises(ValueError, match="at most one axis size may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=r"axes\['fsdp'\] must be an integer >= 1"):
        sharding.make_mesh({"data": -1, "fsdp": 0})
    with pytest.raises(ValueError, match="at least one axis"):
        sharding.make_mesh({})


def test_placement_and_a_sharded_training_step_on_8_fake_devices():
    run_check("tests.sharding_rules_check", "SHARDING_RULES_OK")
