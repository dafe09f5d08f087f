"""A transformer that only fits sharded: per-device memory and step time under FSDP and FSDP x tensor.

Command (from the repository root; the script fakes 8 CPU devices itself):

    python scripts/bench_scale.py                        # lm-100m (109.5M) x 2 meshes + lm-1b compile
    python scripts/bench_scale.py --configs 100m-fsdp    # one configuration
    python scripts/bench_scale.py --model lm-tiny --vocab 256 --skip-unsharded   # smoke test, ~1 min

For each configuration the script builds the mesh, initialises the ``TrainState`` (parameters and
Adam moments) directly sharded (``sharding.sharded_init``: jit with ``out_shardings`` from
``eval_shape``, so no device ever holds the unsharded parameters), compiles one Adam training step
with in/out shardings and donation, prints XLA's per-device ``memory_analysis()`` next to the
unsharded parameter + Adam memory, then runs ``--steps`` steps and prints the time per step. The
1B configuration is compiled only (its memory printed), never run on the CPU. With
``--skip-unsharded`` off, the same step is also compiled (not run) unsharded on one device for
reference.

Per-device memory is ``arguments + outputs - aliased + temporaries`` of the compiled program for
one device (donated state buffers are aliased to the outputs). Target (issue 11): under FSDP on 8
devices, <= 1/6 of the unsharded parameter + Adam memory.

Figures from one run (2 CPU cores shared with other jobs, load 7-10; batch 8 x 128 tokens, V = 32000;
9.5 minutes wall, 3.7 minutes of CPU time; compilations 20-25 s each)::

    config             params  unsharded p+Adam  per-device state (x)   per-device peak (x)   step
    100m-fsdp          109.5M    1.224 GiB         0.153 GiB (0.125)     0.309 GiB (0.252)   110.5 s
    100m-fsdp-tensor   109.5M    1.224 GiB         0.153 GiB (0.125)     0.270 GiB (0.221)   69.3 s
    1b-fsdp            971.6M   10.858 GiB         1.357 GiB (0.125)     2.086 GiB (0.192)   compiled only

The same steps compiled unsharded on one device: peak 1.923 GiB (100M), 15.06 GiB (1B). The state
(parameters + Adam moments) each device holds is 1/8 of the unsharded one: the target is met. The
peak of a step adds XLA's temporaries: the float32 gradient (another 1/8 of the parameters), one
layer's gathered weights (scan + remat) and the logits of the device's examples. Step times on these
oversubscribed cores vary by 1.5x between runs. An earlier run with the embedding split along D
instead of V (``"vocab"`` on ``tensor`` only) took 74 s and 45 s per step, with 0.38 and 0.22 GiB
of temporaries per device (the gathered [V, D] embedding and its gradient) instead of 0.16 and 0.12.

On an accelerator: ``JAX_PLATFORMS=cuda python scripts/bench_scale.py`` (no fake devices; the
meshes use every device, the FSDP x tensor one needs an even count of at least 4).

The unlearning steps (NPO + SAM, SSD's Fisher pass, CG) reuse :func:`build` below: it returns the
mesh, the sharded state and the sharded batch of a configuration.
"""

from __future__ import annotations

import os

# 8 fake CPU devices (set before JAX starts) unless JAX_PLATFORMS names another platform.
if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

import argparse
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import NamedSharding, PartitionSpec

from unlearn_jax import methods, sharding
from unlearn_jax.core import reductions
from unlearn_jax.core.task import Task
from unlearn_jax.data import Dataset
from unlearn_jax.methods.driver import compiled_steps, compute_statistics
from unlearn_jax.methods.protocol import RunPlan
from unlearn_jax.models import get_model, model_task
from unlearn_jax.models.transformer import num_params

# name -> (model, mesh axes, compile only). -1: the remaining devices.
CONFIGS: dict[str, tuple[str, dict[str, int], bool]] = {
    "100m-fsdp": ("lm-100m", {"fsdp": -1}, False),
    "100m-fsdp-tensor": ("lm-100m", {"fsdp": -1, "tensor": 2}, False),
    "1b-fsdp": ("lm-1b", {"fsdp": -1}, True),
}
GIB = 2.0**30


class Setup(NamedTuple):
    """What a benchmark step needs: ``mesh``, ``state`` and ``batch`` placed on it, and the task.

    ``state`` and ``batch`` hold arrays, or ``jax.ShapeDtypeStruct``s with shardings when built
    with ``abstract=True`` (enough to ``lower(...).compile()``).
    """

    mesh: jax.sharding.Mesh
    state: TrainState
    batch: dict[str, Any]
    task: Task


def build(
    model_name: str,
    mesh_axes: dict[str, int],
    *,
    vocab: int,
    batch_size: int,
    seq_len: int,
    optimizer: optax.GradientTransformation,
    rules: sharding.ShardingRules | None = None,
    abstract: bool = False,
    key: jax.Array | None = None,
    devices: list | None = None,
) -> Setup:
    """The mesh, the sharded ``TrainState`` and the sharded batch of one configuration.

    The state is initialised under ``jit`` with ``out_shardings`` from its ``eval_shape``: every
    device computes only its own shards. The batch is random tokens ``x, y [B, T]`` (int32) with
    token weights ``[B, T]``, split over the mesh's ``data``/``fsdp`` axes.
    """
    key = jax.random.key(0) if key is None else key
    mesh = sharding.make_mesh(mesh_axes, devices)
    model = get_model(model_name, num_outputs=vocab)
    if seq_len > model.max_len:
        model = model.clone(max_len=seq_len)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    names = sharding.logical_axes(jax.eval_shape(model.init, key, tokens))

    def init_state(k):
        params = nn.unbox(model.init(k, jnp.zeros(tokens.shape, tokens.dtype))["params"])
        return TrainState.create(apply_fn=model.apply, params=params, tx=optimizer)

    batch_sharding = sharding.batch_sharding(mesh)
    if abstract:
        shapes = jax.eval_shape(init_state, key)
        shardings = sharding.shardings_for(shapes, mesh, rules, logical=names)
        state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        batch = {
            name: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=batch_sharding)
            for name, dtype in (("x", jnp.int32), ("y", jnp.int32), ("weights", jnp.float32))
        }
    else:
        state, _ = sharding.sharded_init(init_state, key, mesh=mesh, rules=rules, logical=names)
        rng = np.random.default_rng(0)
        tokens_np = rng.integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)
        host_batch = {
            "x": tokens_np[:, :-1],
            "y": tokens_np[:, 1:],
            "weights": np.ones((batch_size, seq_len), np.float32),
        }
        batch = sharding.shard_batch(host_batch, mesh)
    return Setup(mesh, state, batch, model_task(model))


def train_step(task: Task):
    """One Adam step on the mean sequence negative log-likelihood: ``(state, batch) -> (state,
    loss)``."""

    def step(state: TrainState, batch: dict[str, jax.Array]):
        loss, grads = jax.value_and_grad(task.batch_loss)(state.params, batch)
        return state.apply_gradients(grads=grads), loss

    return step


def compile_step(setup: Setup):
    """The training step jitted with in/out shardings equal to the state's and the state donated,
    lowered and compiled for the setup's shapes (nothing runs)."""
    shardings = jax.tree.map(lambda a: a.sharding, setup.state)
    batch_shardings = jax.tree.map(lambda a: a.sharding, setup.batch)
    jitted = jax.jit(
        train_step(setup.task),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, NamedSharding(setup.mesh, PartitionSpec())),
        donate_argnums=0,
    )
    return jitted.lower(setup.state, setup.batch).compile()


def per_device_bytes(compiled) -> dict[str, float]:
    """XLA's per-device memory of a compiled program: arguments, outputs, aliased, temporaries and
    their combination ``arguments + outputs - aliased + temporaries`` (``peak``)."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _state_bytes_per_device(state: TrainState) -> float:
    """Bytes of the state held by one device: each leaf's shard size (from its sharding)."""
    total = 0
    for leaf in jax.tree.leaves(state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _fmt(nbytes: float) -> str:
    return f"{nbytes / GIB:7.3f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:7.1f} MiB"


def _token_dataset(n: int, seq_len: int, vocab: int, seed: int, offset: int) -> Dataset:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, seq_len + 1)).astype(np.int32)
    weights = np.ones((n, seq_len), np.float32)
    return Dataset(x=tokens[:, :-1], y=tokens[:, 1:], ids=np.arange(offset, offset + n),
                   num_classes=vocab, weights=weights)  # fmt: skip


def _padded_batch(dataset: Dataset, placement: sharding.Placement) -> dict[str, jax.Array]:
    batch = {**dataset.as_batch(), "mask": jnp.ones((len(dataset),), jnp.float32)}
    return placement.put_batch(batch)


def _copy(tree):
    return jax.tree.map(lambda a: a.copy(), tree)


def unlearning_steps(setup: Setup, placement: sharding.Placement, *, batch_size: int,
                     seq_len: int, vocab: int) -> list[dict]:  # fmt: skip
    """One step each of NPO + retain loss with SAM, SSD's Fisher passes and dampening, and an
    inverse-HVP with 5 CG iterations (GGN), all through the library's compiled steps under
    ``placement``: per-device memory from XLA and wall time of one run of each."""
    task, params, key = setup.task, setup.state.params, jax.random.key(1)
    forget = _token_dataset(batch_size, seq_len, vocab, 1, 0)
    retain = _token_dataset(batch_size, seq_len, vocab, 2, 10_000)
    fb, rb = _padded_batch(forget, placement), _padded_batch(retain, placement)
    plan = RunPlan.create(1, 1, 1, batch_size, batch_size)
    rows = []

    def one_step(name, method, stats):
        init_fn, update_fn = compiled_steps(method, task, params, stats, plan, key=key,
                                            placement=placement)  # fmt: skip
        state = init_fn(params, key, stats, plan)
        f = fb if "forget" in method.feeds.batches else None
        r = rb if "retain" in method.feeds.batches else None
        start = time.perf_counter()
        compiled = update_fn.lower(params, state, f, r, key).compile()
        compile_s = time.perf_counter() - start
        mem = per_device_bytes(compiled)
        start = time.perf_counter()
        out, _, _metrics = compiled(_copy(params), state, f, r, key)
        jax.block_until_ready(out)
        run_s = time.perf_counter() - start
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (name, a.sharding, b.sharding)
        rows.append(dict(step=name, mem=mem, compile_s=compile_s, run_s=run_s))
        print(f"  {name:<28} peak/device {_fmt(mem['peak'])}, temporaries "
              f"{_fmt(mem['temporaries'])}; compile {compile_s:.1f} s, run {run_s:.2f} s")  # fmt: skip

    one_step("npo + retain, SAM (1 step)",
             methods.sam(methods.npo(beta=0.1, optimizer=optax.adam(1e-5)), rho=0.01), {})  # fmt: skip

    ssd = methods.ssd(alpha=5.0, lam=0.1)
    start = time.perf_counter()
    stats = compute_statistics(ssd, task, params, forget, retain, batch_size=batch_size,
                               key=key, placement=placement)  # fmt: skip
    jax.block_until_ready(stats)
    fisher_s = time.perf_counter() - start
    reduction = reductions.squared_gradient_mean(task.loss)
    acc = reduction.init(params)
    acc_sh = placement.of(jax.eval_shape(reduction.init, params))
    accumulate = jax.jit(reduction.accumulate,
                         in_shardings=(acc_sh, placement.of(params), placement.batch(), None),
                         out_shardings=acc_sh)  # fmt: skip
    mem = per_device_bytes(accumulate.lower(acc, params, fb, key).compile())
    rows.append(
        dict(step="ssd Fisher pass (per batch)", mem=mem, compile_s=0.0, run_s=fisher_s / 2)
    )
    print(f"  {'ssd Fisher pass (per batch)':<28} peak/device {_fmt(mem['peak'])}, temporaries "
          f"{_fmt(mem['temporaries'])}; forget + retain passes {fisher_s:.2f} s")  # fmt: skip
    one_step("ssd dampening", ssd, stats)

    cg = methods.influence_removal(solver="cg", curvature="ggn", damping=1e-3, maxiter=5,
                                   tol=1e-12, curvature_examples=batch_size)  # fmt: skip
    stats = compute_statistics(cg, task, params, forget, retain, batch_size=batch_size, key=key,
                               placement=placement)  # fmt: skip
    one_step("inverse-HVP, 5 CG iterations", cg, stats)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--model", default=None, help="override the model of every configuration")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-unsharded", action="store_true")
    parser.add_argument(
        "--no-unlearning",
        action="store_true",
        help="skip the unlearning steps (NPO+SAM, SSD, CG) of runnable configs",
    )
    args = parser.parse_args()

    optimizer = optax.adam(1e-4)
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; batch "
        f"{args.batch_size} x {args.seq_len} tokens, vocab {args.vocab}, Adam"
    )
    rows = []
    for name in args.configs:
        model_name, axes, compile_only = CONFIGS[name]
        model_name = args.model or model_name
        if "tensor" in axes and (jax.device_count() < 4 or jax.device_count() % 2):
            print(f"[{name}] skipped: needs an even device count of at least 4")
            continue
        common = dict(
            vocab=args.vocab,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            optimizer=optimizer,
        )
        model = get_model(model_name, num_outputs=args.vocab)
        n_params = num_params(model)
        # Unsharded parameters + Adam moments (mu, nu), float32.
        unsharded_state = 3 * 4 * n_params
        print(f"\n[{name}] {model_name}: {n_params / 1e6:.1f}M parameters, mesh {axes}")

        start = time.perf_counter()
        setup = build(model_name, axes, abstract=compile_only, **common)
        jax.block_until_ready(setup.state)
        init_s = time.perf_counter() - start
        print(
            f"  mesh {dict(setup.mesh.shape)}; sharded init {init_s:.1f} s"
            + (" (abstract: compile only)" if compile_only else "")
        )
        start = time.perf_counter()
        compiled = compile_step(setup)
        compile_s = time.perf_counter() - start
        mem = per_device_bytes(compiled)
        held = _state_bytes_per_device(setup.state)
        state_ratio = mem["arguments"] / unsharded_state
        peak_ratio = mem["peak"] / unsharded_state
        verdict = "met" if state_ratio <= 1 / 6 else "NOT met"
        print(f"  compile {compile_s:.1f} s")
        print(f"  unsharded params + Adam:           {_fmt(unsharded_state)}")
        print(f"  per device, params + Adam held:    {_fmt(held)} (from the shardings)")
        for k in ("arguments", "outputs", "aliased", "temporaries"):
            print(f"  per device, XLA {k + ':':<18} {_fmt(mem[k])}")
        print(
            f"  per device / unsharded: state (arguments) {state_ratio:.3f}, peak of the step "
            f"{peak_ratio:.3f}; target state <= 1/6 = {1 / 6:.3f}: {verdict}"
        )
        row = dict(
            config=name,
            params=n_params,
            unsharded=unsharded_state,
            state=mem["arguments"],
            state_ratio=state_ratio,
            peak=mem["peak"],
            peak_ratio=peak_ratio,
            step_s=None,
        )
        if not args.skip_unsharded:
            start = time.perf_counter()
            single = build(
                model_name, {"fsdp": 1}, abstract=True, devices=jax.devices()[:1], **common
            )
            mem1 = per_device_bytes(compile_step(single))
            print(
                f"  unsharded step (1 device, compiled only): peak {_fmt(mem1['peak'])}, "
                f"temporaries {_fmt(mem1['temporaries'])} "
                f"({time.perf_counter() - start:.1f} s to compile)"
            )
            row["unsharded_peak"] = mem1["peak"]
        if not compile_only:
            state, times = setup.state, []
            for _ in range(args.steps):
                start = time.perf_counter()
                state, loss = compiled(state, setup.batch)
                loss = float(loss)  # waits for the step
                times.append(time.perf_counter() - start)
            row["step_s"] = min(times)
            print(
                f"  steps: {', '.join(f'{t:.2f} s' for t in times)} (loss {loss:.3f}; "
                f"log V = {np.log(args.vocab):.3f})"
            )
            if not args.no_unlearning:
                print("  unlearning steps (same mesh, rules and placement):")
                names = sharding.logical_axes(
                    jax.eval_shape(setup.task.module.init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, args.seq_len), jnp.int32))
                )  # fmt: skip
                row["unlearning"] = unlearning_steps(
                    setup._replace(state=state), sharding.Placement(setup.mesh, sharding.DEFAULT_RULES, names),
                    batch_size=args.batch_size, seq_len=args.seq_len, vocab=args.vocab,
                )  # fmt: skip
            del state
        rows.append(row)
        del setup, compiled

    print(
        "\nconfig             params  unsharded p+Adam  per-device state (x)   "
        "per-device peak (x)   step"
    )
    for r in rows:
        step = f"{r['step_s']:.1f} s" if r["step_s"] is not None else "compiled only"
        print(
            f"{r['config']:<17} {r['params'] / 1e6:6.1f}M  {_fmt(r['unsharded'])}       "
            f"{_fmt(r['state'])} ({r['state_ratio']:.3f})   {_fmt(r['peak'])} "
            f"({r['peak_ratio']:.3f})   {step}"
        )


if __name__ == "__main__":
    main()
