"""Every method of the registry run sharded over 8 fake CPU devices against the same run unsharded;
run by tests/methods/test_sharded.py in its own process (the device count is fixed before JAX starts).

Checks, for an MLP under a data x fsdp mesh and a small transformer under fsdp x tensor:
* the sharded result equals the unsharded one (float32 tolerance: the same sums, another order);
* the returned parameters keep the sharding they came in with, and every leaf of the final method
  state has the sharding its shape gets from the rules;
* under FSDP no parameter leaf of ``min_size`` elements or more is fully replicated.
Methods that need class probabilities (random labels, KL to a teacher, a ridge head on pooled
features) apply to classifiers only and run on the MLP.

Training (:func:`check_fit`, run first): ``fit`` for 3 steps on the same two models and meshes (and
``fit_many`` of 2 models and ``fit`` on a streamed view of the data on the MLP) equals the
unsharded run, batch sizes chosen so that the batch is padded to a multiple of the batch devices;
the whole train state comes back with the shardings it went in with, the caller's state is not
donated, and under FSDP no large leaf is replicated.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    # Compilation dominates on a CPU; LLVM's level 0 compiles 2-3x faster (float rounding only).
    + " --xla_backend_optimization_level=0"
)

import jax
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import NamedSharding

from unlearn_jax import sharding, training
from unlearn_jax.apps import registry
from unlearn_jax.data import Dataset
from unlearn_jax.data.stream import as_streamed
from unlearn_jax.methods import unlearn
from unlearn_jax.models import MLP, TransformerLM, model_task

RTOL, ATOL = 2e-4, 2e-5  # float32 sums in another order, through up to 4 update steps
RULES = sharding.ShardingRules(min_size=64)
CLASSIFIER_ONLY = {"random_label", "salun", "scrub", "bad_teacher", "acu"}


def classification_data(n=48, d=16, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))
    return Dataset(x=x, y=y, ids=np.arange(n), num_classes=k)


def sequence_data(n=32, t=8, v=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, v, (n, t + 1))
    weights = np.zeros((n, t), np.float32)
    weights[:, t // 2 :] = 1.0
    return Dataset(x=tokens[:, :-1], y=tokens[:, 1:], ids=np.arange(n), num_classes=v,
                   weights=weights)  # fmt: skip


def trained_state(model, data, steps=20):
    task = model_task(model)
    params = jax.jit(model.init)(jax.random.key(0), data.x[:2])["params"]
    from flax import linen as nn

    params = nn.unbox(params)
    tx = optax.adam(1e-2)
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    batch = data.as_batch()
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(task.batch_loss)(s.params, batch)))
    for _ in range(steps):
        state = step(state)
    return task, state


def run(name, task, state, forget, retain, mesh):
    # SSD's digits setting selects nothing at n / n_f = 6: a smaller alpha exercises the dampening.
    method, run_kwargs = registry.build(name, **({"alpha": 2.0} if name == "ssd" else {}))
    if run_kwargs.get("steps") or run_kwargs.get("epochs"):
        run_kwargs = {"steps": 3}
    run_kwargs["batch_size"] = 16
    key = jax.random.key(5)
    plain = unlearn(method, state, task, forget, retain, key=key, **run_kwargs)
    placed = sharding.Placement(mesh, RULES)
    sharded_params = placed.put(state.params)
    sharded = unlearn(method, state.replace(params=sharded_params), task, forget, retain, key=key,
                      mesh=mesh, rules=RULES, **run_kwargs)  # fmt: skip
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sharded.state.params)[0],
                            jax.tree.leaves(plain.state.params), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{name}{path}")
    # The parameters come back with the sharding they went in with.
    for a, b in zip(jax.tree.leaves(sharded.state.params), jax.tree.leaves(sharded_params),
                    strict=True):  # fmt: skip
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (name, a.sharding, b.sharding)
    # The method state has the shardings its shapes get from the rules.
    want = placed.of(sharded.method_state)
    for a, w in zip(jax.tree.leaves(sharded.method_state), jax.tree.leaves(want), strict=True):
        if isinstance(a, jax.Array) and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert a.sharding.is_equivalent_to(w, a.ndim), (name, a.sharding, w)
    return sharded_params


def check_fsdp(params, mesh):
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if leaf.size >= RULES.min_size:
            spec = leaf.sharding.spec
            assert any(axis is not None for axis in spec), (path, spec)
            assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh


def assert_same_state(sharded, plain, what):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                            jax.tree.leaves(plain), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{what}{path}")


def assert_same_shardings(out, start, what):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(start),
                            strict=True):  # fmt: skip
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (what, path, a.sharding, b.sharding)


def fit_case(model, data, mesh, *, batch_size, logical=None, streamed=False):
    """``fit`` for 3 steps of ``batch_size`` rows (one epoch) on ``mesh`` against the unsharded fit;
    with ``streamed`` also from a StreamedDataset view (batches uploaded split over the mesh)."""
    task = model_task(model)
    state = training.create_train_state(model, data.x[:1], optax.adam(1e-2), jax.random.key(1))
    kwargs = dict(epochs=1, batch_size=batch_size, key=jax.random.key(2), progress=False)
    assert -(-len(data.ids) // batch_size) == 3
    plain, plain_history = training.fit(state, task, data, **kwargs)
    start = sharding.Placement(mesh, RULES, logical or ()).put(state)
    out, history = training.fit(start, task, data, mesh=mesh, rules=RULES, logical=logical,
                                **kwargs)  # fmt: skip
    what = f"fit {type(model).__name__}"
    assert int(out.step) == int(plain.step) == 3, (out.step, plain.step)
    assert_same_state(out, plain, what)
    for name in plain_history:
        np.testing.assert_allclose(history[name], plain_history[name], rtol=RTOL, err_msg=name)
    assert_same_shardings(out, start, what)
    # The step donates only its own copy: the caller's state is still readable.
    assert all(not a.is_deleted() for a in jax.tree.leaves(start))
    check_fsdp(out.params, mesh)
    check_fsdp(out.opt_state, mesh)
    if streamed:
        out, history = training.fit(start, task, as_streamed(data), mesh=mesh, rules=RULES,
                                    logical=logical, **kwargs)  # fmt: skip
        assert_same_state(out, plain, what + " streamed")
        np.testing.assert_allclose(history["loss"], plain_history["loss"], rtol=RTOL)
        assert_same_shardings(out, start, what + " streamed")


def check_fit():
    mlp = MLP(num_outputs=4, hidden_sizes=(64,))
    data = classification_data()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    fit_case(mlp, data, mesh, batch_size=20, streamed=True)  # padded to 24 rows: 3 per device
    # fit_many: two models, each on its own random half, the population axis as the rules place it.
    masks = np.random.default_rng(1).random((2, len(data.ids))) < 0.5
    kwargs = dict(keys=jax.random.split(jax.random.key(3), 2), epochs=1, batch_size=20,
                  data_key=jax.random.key(4), member_masks=masks, progress=False)  # fmt: skip
    args = (mlp, model_task(mlp), data.x[:1], optax.adam(1e-2), data)
    plain, plain_history = training.fit_many(*args, **kwargs)
    out, history = training.fit_many(*args, mesh=mesh, rules=RULES, **kwargs)
    assert_same_state(out, plain, "fit_many")
    np.testing.assert_allclose(history["loss"], plain_history["loss"], rtol=RTOL)
    assert_same_shardings(out, sharding.Placement(mesh, RULES).put(plain), "fit_many")
    print("FIT MLP OK", flush=True)
    lm = TransformerLM(num_outputs=32, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=8)
    seq = sequence_data()
    names = sharding.logical_axes(jax.eval_shape(lm.init, jax.random.key(0), seq.x[:1]))
    fit_case(lm, seq, sharding.make_mesh({"fsdp": 4, "tensor": 2}), batch_size=11, logical=names)
    print("FIT LM OK", flush=True)


def main(names):
    assert jax.device_count() == 8, jax.devices()
    check_fit()
    data = classification_data()
    mlp = MLP(num_outputs=4, hidden_sizes=(64,))
    task, state = trained_state(mlp, data)
    forget, retain = data.take(np.arange(8)), data.take(np.arange(8, 48))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    for name in names:
        params = run(name, task, state, forget, retain, mesh)
        check_fsdp(params, mesh)
        print("MLP OK", name, flush=True)
    seq = sequence_data()
    lm = TransformerLM(num_outputs=32, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=8)
    task, state = trained_state(lm, seq)
    forget, retain = seq.take(np.arange(8)), seq.take(np.arange(8, 32))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    for name in names:
        if name in CLASSIFIER_ONLY:
            continue
        params = run(name, task, state, forget, retain, mesh)
        check_fsdp(params, mesh)
        print("LM OK", name, flush=True)
    print("SHARDED_METHODS_OK")


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(registry.METHODS))
