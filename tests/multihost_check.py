"""Checks that run in several JAX processes on this machine: CPU devices, gloo collectives, the
coordinator on 127.0.0.1. The multi-host setting of a pod, on one host.

One process of a run::

    python -m tests.multihost_check PROCESS_ID NUM_PROCESSES PORT WORKDIR CHECK [CHECK ...]

sets ``--xla_force_host_platform_device_count`` (:data:`LOCAL_DEVICES` per process) before JAX
starts, joins the run (``jax.distributed.initialize``), runs each named check of :data:`CHECKS` in
order, prints one ``MULTIHOST_RESULT <json>`` line and shuts down. Tests call :func:`run`, which
starts the processes, kills them all at the first failure or at the timeout, and returns each
process's results.

From a test (see ``tests/checkpoint/test_multihost.py``)::

    state, meta, digest = multihost_check.prepare_checkpoint(tmp_path)  # what "checkpoint" needs
    first, second = multihost_check.run(["checkpoint"], tmp_path)
    assert first["checks"]["checkpoint"]["digest"] == digest

Adding a check: a function ``check_x(ctx: Context) -> dict`` (a JSON-safe result) registered in
:data:`CHECKS`. Every process runs it, so collectives (jitted steps over the global mesh, saves,
restores) line up; ``ctx.barrier(name)`` waits for all, ``ctx.workdir`` is shared by all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

LOCAL_DEVICES = 2
RESULT_PREFIX = "MULTIHOST_RESULT "
ROOT = pathlib.Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    # Before JAX starts: the fake CPU devices of this process.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={LOCAL_DEVICES}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np
import optax

from unlearn_jax import checkpoint, sharding
from unlearn_jax.checkpoint import _multihost
from unlearn_jax.models import get_model
from unlearn_jax.training import create_train_state


# ---- the runner (test side) ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    checks: Sequence[str],
    workdir: os.PathLike | str,
    *,
    num_processes: int = 2,
    timeout: float = 300.0,
) -> list[dict[str, Any]]:
    """Runs ``checks`` in ``num_processes`` fresh processes and returns each one's results.

    Args:
      checks: names in :data:`CHECKS`, run in this order by every process.
      workdir: a directory every process reads and writes (created if missing).
      num_processes: the number of processes, each with :data:`LOCAL_DEVICES` CPU devices.
      timeout: seconds for the whole run, JAX start-up included.

    Returns:
      One dict per process, in process order: ``{"process", "timings", "checks": {name: result}}``.

    Raises:
      AssertionError: a process failed or the run timed out; the message holds every process's
        output tail.
    """
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {sorted(CHECKS)}.")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    logs = [workdir / f"process-{i}.log" for i in range(num_processes)]
    procs = []
    for i in range(num_processes):
        with open(logs[i], "w") as log:
            cmd = [sys.executable, "-m", "tests.multihost_check", str(i), str(num_processes),
                   str(port), str(workdir), *checks]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    deadline = time.monotonic() + timeout
    failed = None
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            failed = "a process failed"
            break
        if time.monotonic() > deadline:
            failed = f"the run took more than {timeout} s"
            break
        time.sleep(0.05)
    if failed is None and any(p.returncode != 0 for p in procs):
        failed = "a process failed"
    if failed is not None:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        tails = "\n".join(
            f"---- process {i} (exit {p.returncode}) ----\n{logs[i].read_text()[-4000:]}"
            for i, p in enumerate(procs)
        )
        raise AssertionError(f"multi-process run of {list(checks)}: {failed}.\n{tails}")
    results = []
    for i, log in enumerate(logs):
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith(RESULT_PREFIX)]
        if len(lines) != 1:
            raise AssertionError(f"process {i} printed no result:\n{log.read_text()[-4000:]}")
        results.append(json.loads(lines[0][len(RESULT_PREFIX) :]))
    return results


# ---- the process side ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Context:
    """What a check gets: who it is, and the directory every process shares."""

    process_id: int
    num_processes: int
    workdir: pathlib.Path

    def barrier(self, name: str) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---- the checkpoint case, shared with the single-process side of the test --------------------------
# An MLP 1023 -> 2200 -> 6 with Adam. Under FSDP on 4 devices its hidden kernel [1023, 2200] is split
# along its second axis; it holds 2250600 elements in three digest blocks of 476 leading rows
# (2**20 // 2200), so the digests' reshard pads its leading axis to 4 * 476 rows and each device
# holds one block: blocks 0 and 1 on process 0's devices, block 2 on process 1's. The hidden bias
# [2200] and the head kernel [2200, 6] (one block each) are split along their first axis, the head
# bias and the counters replicated.
INPUTS, HIDDEN, OUTPUTS, STEP = 1023, 2200, 6, 7
LEDGER_TIME = "2025-01-01T00:00:00+00:00"


def checkpoint_case() -> tuple[Any, dict[str, Any]]:
    """``(state, metadata)``: a TrainState of numpy leaves filled from a seeded generator (the same
    bits in every process), and its metadata."""
    model = get_model("mlp", num_outputs=OUTPUTS, hidden_sizes=(HIDDEN,))
    x = np.zeros((1, INPUTS), np.float32)
    abstract = jax.eval_shape(
        lambda k: create_train_state(model, x, optax.adam(1e-3), k), jax.random.key(0)
    )
    rng = np.random.default_rng(0)

    def fill(leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        if np.issubdtype(leaf.dtype, np.integer):
            return np.full(leaf.shape, STEP, leaf.dtype)
        return rng.standard_normal(leaf.shape).astype(leaf.dtype)

    state = jax.tree.map(fill, abstract)
    metadata = {"model": {"name": "mlp", "hidden_sizes": [HIDDEN], "num_outputs": OUTPUTS}}
    return state, metadata


def case_ledger(digest: str) -> checkpoint.Ledger:
    """A one-request ledger whose result is the model of digest ``digest``."""
    return checkpoint.Ledger().append(
        [3, 1, 4], method="ssd", before="e" * 64, after=digest, time=LEDGER_TIME
    )


def prepare_checkpoint(workdir: os.PathLike | str) -> tuple[Any, dict[str, Any], str]:
    """The single-process side of ``check_checkpoint``, run before it in the test's own process:
    saves :func:`checkpoint_case` into ``workdir/single``; returns ``(state, metadata, digest)``."""
    state, meta = checkpoint_case()
    digest = checkpoint.checkpoint_digest(state, meta)  # numpy leaves: hashed on the host
    single = pathlib.Path(workdir) / "single"
    checkpoint.save_checkpoint(single, state, meta, ledger=case_ledger(digest))
    return state, meta, digest


def _place(state: Any, mesh: jax.sharding.Mesh, rules: sharding.ShardingRules) -> Any:
    """The host state sharded over ``mesh`` (every process puts its own shards)."""
    return sharding.shard_state(state, mesh, rules)


def _abstract(state: Any, mesh: jax.sharding.Mesh, rules: sharding.ShardingRules) -> Any:
    """ShapeDtypeStructs carrying the shardings of ``state`` under ``rules`` on ``mesh``."""
    shardings = sharding.shardings_for(state, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
        state,
        shardings,
    )


def _same_values(restored: Any, host: Any, expected_shardings: Any | None = None) -> int:
    """Checks every shard a process holds against the host copy; returns the number checked."""
    checked = 0
    host_leaves = jax.tree.leaves(host)
    restored_leaves = jax.tree.leaves(restored)
    assert len(host_leaves) == len(restored_leaves)
    want = [None] * len(host_leaves) if expected_shardings is None else jax.tree.leaves(
        expected_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )  # fmt: skip
    for r, h, s in zip(restored_leaves, host_leaves, want, strict=True):
        h = np.asarray(h)
        assert r.shape == h.shape and r.dtype == h.dtype, (r.shape, r.dtype, h.shape, h.dtype)
        if s is not None:
            assert r.sharding.is_equivalent_to(s, r.ndim), (r.sharding, s)
        for shard in r.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), h[shard.index])
            checked += 1
    return checked


def _refused(ctx: Context, read: Callable[[], Any]) -> dict[str, Any]:
    """The error ``read`` raises on this process (it must raise one)."""
    try:
        read()
    except checkpoint.CheckpointError as err:
        return {"type": type(err).__name__, "item": getattr(err, "item", None), "message": str(err)}
    raise AssertionError(f"process {ctx.process_id}: the damaged checkpoint was not refused.")


def _edit_json(path: pathlib.Path, edit: Callable[[Any], None]) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, sort_keys=True, indent=1) + "\n")


def _recommit(copy: pathlib.Path) -> None:
    """Makes the commit marker vouch for an edited manifest (what a forger would do)."""
    sha = checkpoint.ledger.sha256_hex((copy / "manifest.json").read_bytes())
    _edit_json(copy / "COMMITTED", lambda m: m.update(manifest_sha256=sha))


def check_checkpoint(ctx: Context) -> dict[str, Any]:
    """Sharded save and restore by every process, verified; digests comparable with one process.

    Needs :func:`prepare_checkpoint` run first, in one process, on the same ``workdir``.
    """
    timings = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    host, meta = checkpoint_case()
    mesh = sharding.make_mesh({"fsdp": 4})
    rules = sharding.ShardingRules()
    placed = _place(host, mesh, rules)
    kernel = placed.params["hidden_0"]["kernel"]
    assert not kernel.is_fully_addressable, kernel.sharding
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), kernel.sharding
    lap("build")

    digest = checkpoint.checkpoint_digest(placed, meta)
    lap("digest")
    ledger = case_ledger(digest)
    multi = ctx.workdir / "multi"
    path = checkpoint.save_checkpoint(multi, placed, meta, ledger=ledger)
    lap("save")

    # Onto the sharding it was saved with (the target's own arrays).
    restored, restored_meta = checkpoint.restore_checkpoint(multi, placed)
    assert restored_meta == meta
    shards = _same_values(restored, host, sharding.shardings_for(host, mesh, rules))
    lap("restore")

    # Onto another sharding (data x fsdp; the kernel's halves replicated over "data"), abstract.
    mesh2 = sharding.make_mesh({"data": 2, "fsdp": 2})
    abstract2 = _abstract(host, mesh2, rules)
    restored2, _ = checkpoint.restore_checkpoint(multi, abstract2)
    _same_values(restored2, host, sharding.shardings_for(host, mesh2, rules))
    lap("restore_resharded")

    # The one-process save of the same values, restored sharded.
    restored1, _ = checkpoint.restore_checkpoint(ctx.workdir / "single", placed)
    _same_values(restored1, host)
    lap("restore_single")

    report = checkpoint.verify_checkpoint(multi)
    lap("verify")

    # An existing step is refused on every process (process 0 finds it); an overwrite commits a new
    # generation and leaves nothing else behind.
    try:
        checkpoint.save_checkpoint(multi, placed, meta, ledger=ledger)
        raise AssertionError("an existing step was overwritten without overwrite=True")
    except FileExistsError as err:
        exists_message = str(err)
    checkpoint.save_checkpoint(multi, restored2, meta, ledger=ledger, overwrite=True)
    regenerated = checkpoint.verify_checkpoint(multi)
    ctx.barrier("listing")
    listing = sorted(p.name for p in multi.iterdir())
    lap("overwrite")

    # Damage found by one process is raised by all: a flipped byte in a file of state/ that process 1
    # checks, and the digest of a block that process 1's devices hold.
    damaged_file, damaged_block = ctx.workdir / "damaged-file", ctx.workdir / "damaged-block"
    manifest = json.loads((path / "manifest.json").read_text())
    sizes = {r: i["size"] for r, i in manifest["files"].items() if r.startswith("state/")}
    victim = next(r for r in _multihost.assign(sizes, ctx.num_processes)[1] if "/d/" in r)
    # Block k of the kernel is laid out on the k-th device of its mesh (one block per device).
    owners = [d.process_index for d in kernel.sharding.mesh.devices.flat]
    tampered = next(k for k in range(3) if owners[k] == 1)
    if ctx.process_id == 0:
        for copy in (damaged_file, damaged_block):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(path, copy / str(STEP))
        data = (damaged_file / str(STEP) / victim).read_bytes()
        (damaged_file / str(STEP) / victim).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

        def tamper(m: dict) -> None:
            leaf = m["leaves"]["params/hidden_0/kernel"]
            old = leaf["blocks"][tampered]
            leaf["blocks"][tampered] = ("0" if old[0] != "0" else "1") + old[1:]
            leaf["sha256"] = checkpoint._digest.combine(leaf["blocks"])

        _edit_json(damaged_block / str(STEP) / "manifest.json", tamper)
        _recommit(damaged_block / str(STEP))
    ctx.barrier("damaged")
    file_error = _refused(ctx, lambda: checkpoint.restore_checkpoint(damaged_file, placed))
    block_error = _refused(ctx, lambda: checkpoint.restore_checkpoint(damaged_block, placed))
    lap("damaged")

    # Shardings on a mesh of Explicit axes hash to the same digest.
    explicit = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    specs = sharding.partition_specs(host, mesh, rules)
    on_explicit = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(
            x.shape, jax.sharding.NamedSharding(explicit, s), lambda i: x[i]
        ),
        jax.tree.map(np.asarray, host),
        specs,
        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec),
    )
    explicit_digest = checkpoint.checkpoint_digest(on_explicit, meta)
    lap("explicit")

    return {
        "digest": digest,
        "explicit_digest": explicit_digest,
        "verify_digest": report.digest,
        "matches_ledger": report.matches_ledger,
        "arrays": report.arrays,
        "files": report.files,
        "generation": regenerated.generation,
        "regenerated_digest": regenerated.digest,
        "listing": listing,
        "shards_checked": shards,
        "exists_message": exists_message,
        "file_victim": victim,
        "tampered_block": tampered,
        "file_error": file_error,
        "block_error": block_error,
        "timings": timings,
    }


# ---- the unlearning case: train, unlearn with SSD and NPO, save and restore -------------------------
# A digits-sized classification problem and an MLP whose kernels are large enough (min_size 64) to be
# split by FSDP over the 4 devices. The same function runs in one process without a mesh (the test's
# reference) and in every process of the run on the global data x fsdp mesh.
UNLEARN_RULES = sharding.ShardingRules(min_size=64)


def unlearning_case():
    """``(task, state, forget, retain, train_batch)``: deterministic, identical in every process."""
    from flax.training.train_state import TrainState

    from unlearn_jax.data import Dataset
    from unlearn_jax.models import MLP, model_task

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 64)
    x = (rng.normal(size=(4, 16))[y] + rng.normal(size=(64, 16))).astype(np.float32)
    train = Dataset(x=x, y=y, ids=np.arange(64), num_classes=4)
    model = MLP(num_outputs=4, hidden_sizes=(32,))
    task = model_task(model)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    params = jax.tree.map(np.asarray, params)
    state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-2))
    batch = {"x": x, "y": y.astype(np.int32)}
    return task, state, train.take(np.arange(8)), train.take(np.arange(8, 64)), batch


def train_and_unlearn(mesh=None) -> dict[str, Any]:
    """A few full-batch Adam steps, then SSD and NPO (each from the trained model) through
    ``methods.unlearn``; returns the three parameter sets as host numpy (gathered from every
    process under a multi-process mesh)."""
    from unlearn_jax import methods

    task, state, forget, retain, batch = unlearning_case()
    placement = None if mesh is None else sharding.Placement(mesh, UNLEARN_RULES)

    def step(s, b):
        return s.apply_gradients(grads=jax.grad(task.batch_loss)(s.params, b))

    if placement is None:
        train_step = jax.jit(step)
    else:
        state_sh = placement.of(state)
        state = jax.device_put(state, state_sh)
        batch = placement.put_batch(batch)
        train_step = jax.jit(step, in_shardings=(state_sh, placement.batch()),
                             out_shardings=state_sh)  # fmt: skip
    for _ in range(5):
        state = train_step(state, batch)
    mesh_kwargs = {} if mesh is None else {"mesh": mesh, "rules": UNLEARN_RULES}
    ssd = methods.unlearn(methods.ssd(alpha=2.0, lam=0.5), state, task, forget, retain,
                          key=jax.random.key(1), batch_size=16, **mesh_kwargs)  # fmt: skip
    npo = methods.unlearn(methods.npo(optimizer=optax.adam(1e-2)), state, task, forget, retain,
                          key=jax.random.key(2), steps=3, batch_size=16, **mesh_kwargs)  # fmt: skip
    out = {"trained": state.params, "ssd": ssd.state.params, "npo": npo.state.params}
    if mesh is not None:
        from jax.experimental import multihost_utils

        for tree in out.values():  # the shardings each step returned are the ones it was given
            for leaf, want in zip(jax.tree.leaves(tree), jax.tree.leaves(placement.of(tree)),
                                  strict=True):  # fmt: skip
                assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
        out = multihost_utils.process_allgather(out, tiled=True)
    result = jax.tree.map(np.asarray, out)
    result["ssd_selected"] = int(ssd.metrics["ssd/num_selected"][0])
    result["npo_loss"] = [float(v) for v in npo.metrics["loss"]]
    return result


def check_unlearning(ctx: Context) -> dict[str, Any]:
    """Train, unlearn with SSD and NPO on the global mesh, save the NPO model sharded, restore it
    onto its sharding; returns the parameters (host lists) for the test to compare."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2})
    out = train_and_unlearn(mesh)
    # Save and restore the NPO result sharded (every process writes its own shards).
    _task, state, *_ = unlearning_case()
    placement = sharding.Placement(mesh, UNLEARN_RULES)
    npo_state = jax.device_put(state.replace(params=out["npo"]), placement.of(state))
    directory = ctx.workdir / "unlearned"
    checkpoint.save_checkpoint(directory, npo_state, {"method": "npo"}, step=1)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          npo_state)  # fmt: skip
    restored, meta = checkpoint.restore_checkpoint(directory, target)
    from jax.experimental import multihost_utils

    back = multihost_utils.process_allgather(restored.params, tiled=True)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(back), jax.tree.leaves(out["npo"]), strict=True))  # fmt: skip
    return {
        "params": {
            k: jax.tree.map(lambda a: np.asarray(a).tolist(), out[k])
            for k in ("trained", "ssd", "npo")
        },
        "ssd_selected": out["ssd_selected"],
        "npo_loss": out["npo_loss"],
        "restored_equal": bool(same),
        "restored_method": meta["method"],
    }


CHECKS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "checkpoint": check_checkpoint,
    "unlearning": check_unlearning,
}


def main(process_id: int, num_processes: int, port: int, workdir: str, checks: Sequence[str]):
    """One process of a run: joins it, runs ``checks``, prints its results, leaves it."""
    start = time.perf_counter()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )
    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()
    ctx = Context(process_id, num_processes, pathlib.Path(workdir))
    timings = {"start": round(time.perf_counter() - start, 3)}
    results = {}
    for name in checks:
        began = time.perf_counter()
        results[name] = CHECKS[name](ctx)
        timings[name] = round(time.perf_counter() - began, 3)
    print(RESULT_PREFIX + json.dumps({"process": process_id, "timings": timings,
                                      "checks": results}), flush=True)  # fmt: skip
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
