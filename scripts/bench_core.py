"""Per-example gradient throughput on the CPU (unlearn_jax against a Python loop and torch.func),
and per-layer statistics (Fisher, gradient norms, projections) against one gradient pass.

Command (1.5-2 minutes per suite on a 2-core machine; PyTorch is optional, ``pip install torch``):

    python scripts/bench_core.py                       # both suites
    python scripts/bench_core.py --suites grads --models mlp --reps 30 --batch 128
    python scripts/bench_core.py --suites stats --stats-models mlp,cnn,block --stats-reps 5

Suite ``grads``, per-example gradients:

Models, in plain JAX (and, when PyTorch is importable, the same in PyTorch on the SAME weights and
batch, whose gradients are checked against ours before anything is timed):

* ``mlp``: 784-512-10, ReLU, softmax cross-entropy; 407k parameters.
* ``cnn``: 28x28x1 -> [3x3 conv 16, ReLU, 2x2 max-pool] -> [3x3 conv 32, ReLU, 2x2 max-pool] -> dense
  10, softmax cross-entropy; 20k parameters. PyTorch runs it in its native NCHW/OIHW layouts (the
  JAX arrays are transposed once, before timing) and flattens in JAX's NHWC order.

Rows of the table (all under ``jax.jit``, outputs blocked on):

* ``ours``: ``per_example_grads(loss, params, batch)``, default ``strategy="auto"``: on the CPU the
  jaxpr rewrites, and chunks of 32 where one example's intermediate values outweigh its gradient
  (the CNN; the line above the table says which).
* ``ours chunked``: the same with ``chunk_size=32``.
* ``ours, strategy=rewrite``: the rewrites, all examples at once.
* ``ours, strategy=vmap``: plain ``vmap(grad(loss))``, all at once, for reference.
* ``torch.func``: ``torch.func.vmap(torch.func.grad(loss))``, with as many torch threads as JAX's
  CPU client uses (the CPUs this process may run on).
* ``python loop``: ``jit(grad(loss))`` called per example from Python, its results kept in a list,
  timed on the first 32 examples (median of 5 passes) and extrapolated to the batch: it scales
  linearly in the number of calls.
* ``mean grad``: one ordinary gradient of the mean batch loss (``mean_grad``, all at once, with the
  rewrites of the default strategy), the baseline of the "x mean" column.

The timed rows are interleaved (one call of each per repetition, after warm-up) and the table shows
medians, so that load from other processes hits all of them alike. Memory is XLA's buffer assignment
of the compiled program (``compiled.memory_analysis()``): ``temp`` is the scratch allocation the
call needs besides its arguments and outputs, ``output`` the result buffers (for per-example
gradients, ``B x`` the parameter count), arguments (params and batch) excluded. It is shown for
``per_example_grads`` and for ``per_example_grad_norms`` (output ``[B]``), where chunking bounds the
total.

Measured 2026-11-23 on a shared 2-core AMD EPYC VM at a quiet moment (load average 1.3-2.3; other
jobs run there, and at load 5 absolute times vary by +-30%), batch 256, median (fastest) of 15
interleaved reps in ms; "1 CPU" is ``taskset -c 0 python scripts/bench_core.py``, one thread each:

    ms                      MLP, 2 threads  MLP, 1 CPU    CNN, 2 threads  CNN, 1 CPU
    ours (strategy=auto)      82.4 ( 78.8)   169 ( 157)    59.8 ( 47.2)   72.1 ( 56.2)
    ours chunked (32)          104 ( 96.7)   189 ( 177)    56.2 ( 47.1)   66.0 ( 56.1)
    strategy=rewrite          92.7 ( 78.2)   171 ( 154)    75.3 ( 63.3)    118 (  100)
    strategy=vmap              230 (  209)   437 ( 410)     121 (  112)    209 (  188)
    torch.func                 100 ( 91.7)   191 ( 178)    63.2 ( 49.8)    101 ( 80.3)
    python loop                237 (  221)   232 ( 198)     118 (  114)    105 (  103)
    mean grad                  3.1 (  2.8)   7.0 ( 4.9)    50.7 ( 46.8)   71.9 ( 62.0)
    ratio ours/torch.func     0.82 (0.86)   0.88 (0.88)    0.95 (0.95)    0.72 (0.70)

Under load 3-5 the same script gave 0.77-0.91 (MLP) and 0.37-0.72 (CNN): torch.func's medians
suffer most from other jobs (its OpenMP threads spin while they wait). XLA memory (temp + output,
MiB): MLP all at once 0.0 + 397.5, chunked 0.2 + 397.5, plain vmap 392 + 397.5 (the transposed
copy); CNN all at once 46.7 + 20.0, chunked 6.0 + 20.0, plain vmap 141.6 + 20.0; gradient norms
only: MLP 1.5 -> 0.3, CNN 48.3 -> 6.1 chunked. The MLP's per-example gradients are 400 MB: both
libraries spend their time writing them (a Python loop, whose 1.6 MB results stay in the cache, is
no faster).

Suite ``stats``, per-layer statistics (:mod:`unlearn_jax.core.layer_stats`) over a data set of ``N``
examples in batches, each pass timed as a whole (one call per batch, results accumulated on the
device) and shown as a ratio to ONE ordinary gradient pass over the same batches (the gradient of
each batch's mean loss, compiled, with the CPU rewrites of ``mean_grad``), interleaved in the same
run so that load from other processes hits all of them alike. Models (``unlearn_jax.models``):

* ``mlp``: ``MLP(hidden_sizes=(512,))``, 784-512-10 on Gaussian inputs, ``N = 2048``, batches of 256;
* ``cnn``: ``CNN()`` (convolutions 32 and 64, max-pooling, dense 256) on 28x28x1 inputs, ``N = 1024``
  in batches of 256;
* ``block``: an untied token embedding (vocabulary 256, width 128), ONE pre-norm transformer block
  (``unlearn_jax.models.transformer.Block``: LayerNorm, 4-head causal attention with RoPE, GELU MLP
  512), a LayerNorm and a dense head on every position, sequence loss, length 128, ``N = 256`` in
  batches of 32.

Rows: ``capture`` (the forward and backward pass that records every layer's inputs and output
gradients, no statistic), ``Fisher`` (``diag_fisher_sum``), ``norms`` (``per_example_sq_norms``),
``projection`` (``projected_grads``, ``k_in = k_out = 16``), and ``Fisher, generic`` (the same with
``method="generic"``: ``vmap(grad)`` of every example, squared; the reference). The Fisher of the
capture is checked against the generic one on the first batch before anything is timed. Targets
(issue 10): Fisher and norms <= 1.5x a gradient pass on the MLP, <= 3x on the CNN and the block.

Measured 2026-11-23 on the shared 2-core VM under load (load average 3.7-9.9 during the run: other
jobs ran; the ratios come from interleaved reps, absolute times do not carry over), 5 reps, median
(fastest) ms per pass over the whole data set, ratio of medians to the gradient pass:

    ms (x grad)          mlp, N 2048 / 256      cnn, N 1024 / 256       block, N 256 / 32
    gradient pass          86.1 (54.1) 1.00     3613 (3330) 1.00        7831 ( 6103) 1.00
    capture only           34.7 (24.1) 0.40     1503 ( 945) 0.42        5231 ( 4230) 0.67
    Fisher                 69.1 (47.3) 0.80     2349 (1895) 0.65        8489 ( 6355) 1.08
    norms                  36.7 (29.5) 0.43     2416 (2014) 0.67        8079 ( 7079) 1.03
    projection             54.8 (50.6) 0.64     1814 (1488) 0.50        7329 ( 6266) 0.94
    Fisher, generic        1737 (1347) 20.2     4697 (4121) 1.30       11617 (10125) 1.48

Every target is met. The Fisher of the capture matched the generic one to 1e-6 (relative to the
largest entry) on all three. On the CNN the ordinary gradient pass is slow on XLA:CPU (its batched
kernel-gradient convolutions), so everything else looks cheap next to it, even the generic path;
the capture never forms a kernel gradient of the batch (per-example kernel gradients come from
unfolded patches and a batched matmul).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax.core import capture as capture_mod
from unlearn_jax.core import cpu_rewrites, layer_stats
from unlearn_jax.core.grads import mean_grad, per_example_grad_norms, per_example_grads
from unlearn_jax.core.task import flax_task
from unlearn_jax.models import get_model
from unlearn_jax.models.transformer import Block

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the optional `bench` extra
    torch = None

CHUNK = 32
LOOP_SUBSET = 32
SETTLE = 0.1  # seconds between timed calls, see interleaved_times
TORCH_RTOL = 1e-4  # float32 on both sides; differences are summation order in different kernels


# ----------------------------------------------------------------------------------------- models


def mlp_problem(batch_size: int, rng: np.random.Generator):
    params = {
        "l1": {
            "w": rng.normal(size=(784, 512)).astype(np.float32) * np.float32(784**-0.5),
            "b": rng.normal(size=(512,)).astype(np.float32) * np.float32(0.01),
        },
        "l2": {
            "w": rng.normal(size=(512, 10)).astype(np.float32) * np.float32(512**-0.5),
            "b": np.zeros((10,), np.float32),
        },
    }
    batch = {
        "x": rng.normal(size=(batch_size, 784)).astype(np.float32),
        "y": rng.integers(0, 10, size=batch_size).astype(np.int32),
    }

    def loss(p, ex):
        h = jax.nn.relu(ex["x"] @ p["l1"]["w"] + p["l1"]["b"])
        return -jax.nn.log_softmax(h @ p["l2"]["w"] + p["l2"]["b"])[ex["y"]]

    def torch_inputs(p, b):
        tp = {f"{k}{n}": torch.from_numpy(np.array(p[k][n])) for k in p for n in ("w", "b")}
        return tp, torch.from_numpy(b["x"]), torch.from_numpy(b["y"]).long()

    def torch_loss(tp, x, y):
        h = torch.relu(x @ tp["l1w"] + tp["l1b"])
        return F.cross_entropy((h @ tp["l2w"] + tp["l2b"])[None], y[None])

    def torch_to_jax_layout(tg):
        return {k: {n: tg[f"{k}{n}"] for n in ("w", "b")} for k in ("l1", "l2")}

    return params, batch, loss, (torch_inputs, torch_loss, torch_to_jax_layout)


def cnn_problem(batch_size: int, rng: np.random.Generator):
    def normal(shape, fan_in):
        return rng.normal(size=shape).astype(np.float32) * np.float32(fan_in**-0.5)

    params = {
        "c1": {"w": normal((3, 3, 1, 16), 9), "b": np.full((16,), 0.01, np.float32)},
        "c2": {"w": normal((3, 3, 16, 32), 144), "b": np.full((32,), 0.01, np.float32)},
        "d": {"w": normal((7 * 7 * 32, 10), 7 * 7 * 32), "b": np.zeros((10,), np.float32)},
    }
    batch = {
        "x": rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32),
        "y": rng.integers(0, 10, size=batch_size).astype(np.int32),
    }

    def block(h, w, b):
        h = jax.lax.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + b)
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def loss(p, ex):
        h = block(ex["x"][None], p["c1"]["w"], p["c1"]["b"])  # one example as a batch of one
        h = block(h, p["c2"]["w"], p["c2"]["b"])
        logits = h.reshape(1, -1) @ p["d"]["w"] + p["d"]["b"]
        return -jax.nn.log_softmax(logits[0])[ex["y"]]

    def torch_inputs(p, b):
        def t(a, perm=None):
            a = np.asarray(a)
            return torch.from_numpy(np.ascontiguousarray(a if perm is None else a.transpose(perm)))

        tp = {
            "c1w": t(p["c1"]["w"], (3, 2, 0, 1)),  # HWIO -> OIHW
            "c1b": t(p["c1"]["b"]),
            "c2w": t(p["c2"]["w"], (3, 2, 0, 1)),
            "c2b": t(p["c2"]["b"]),
            "dw": t(p["d"]["w"]),
            "db": t(p["d"]["b"]),
        }
        return tp, t(b["x"], (0, 3, 1, 2)), torch.from_numpy(b["y"]).long()  # NHWC -> NCHW

    def torch_loss(tp, x, y):
        h = F.max_pool2d(F.relu(F.conv2d(x[None], tp["c1w"], tp["c1b"], padding=1)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, tp["c2w"], tp["c2b"], padding=1)), 2)
        h = h.permute(0, 2, 3, 1).reshape(1, -1)  # flatten in JAX's NHWC order
        return F.cross_entropy(h @ tp["dw"] + tp["db"], y[None])

    def torch_to_jax_layout(tg):  # per-example OIHW -> HWIO
        return {
            "c1": {"w": tg["c1w"].transpose(0, 3, 4, 2, 1), "b": tg["c1b"]},
            "c2": {"w": tg["c2w"].transpose(0, 3, 4, 2, 1), "b": tg["c2b"]},
            "d": {"w": tg["dw"], "b": tg["db"]},
        }

    return params, batch, loss, (torch_inputs, torch_loss, torch_to_jax_layout)


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem}


# -------------------------------------------------------------------------------------- measuring


def block(tree):
    return jax.block_until_ready(tree)


def interleaved_times(calls: dict[str, Callable[[], object]], reps: int, warmup: int = 3):
    """Seconds per call of each zero-argument callable, one call of each per repetition.

    Each call's result is freed after its timer stops, followed by a pause of ``SETTLE`` seconds:
    JAX frees large buffers in the background (about 50 ms for 400 MB), which would otherwise be
    charged to the next call (on one CPU, a mean gradient then looks 10x slower).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            result = call()
            times[name].append(time.perf_counter() - start)
            del result
            time.sleep(SETTLE)
    return times


def compile_(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def memory(compiled):
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


def mib(n_bytes):
    return f"{n_bytes / 2**20:8.1f}"


def bench_model(name: str, batch_size: int, reps: int) -> float | None:
    params_np, batch_np, loss, torch_parts = PROBLEMS[name](batch_size, np.random.default_rng(0))
    params = jax.tree_util.tree_map(jnp.asarray, params_np)
    batch = jax.tree_util.tree_map(jnp.asarray, batch_np)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))

    auto_chunk = cpu_rewrites.auto_chunk_size(
        lambda ex: jax.grad(loss)(params, ex), batch, jax.tree_util.tree_leaves(batch)[0].shape[0]
    )
    variants = {
        "ours": lambda p, b: per_example_grads(loss, p, b),
        f"ours chunked ({CHUNK})": lambda p, b: per_example_grads(loss, p, b, chunk_size=CHUNK),
        "ours, strategy=rewrite (all at once)": lambda p, b: per_example_grads(
            loss, p, b, strategy="rewrite"
        ),
        "ours, strategy=vmap (all at once)": lambda p, b: per_example_grads(
            loss, p, b, strategy="vmap"
        ),
        "mean grad": lambda p, b: mean_grad(loss, p, b),
        # The floor of materialised per-example gradients: writing their bytes once (a broadcast
        # of one value into buffers of the same shapes), compiled and timed in the same run.
        "write the same bytes once": lambda p, b: jax.tree_util.tree_map(
            lambda a: jnp.broadcast_to(b["x"][0, 0].astype(a.dtype), (batch_size, *a.shape)) + 0, p
        ),
    }
    compiled = {label: compile_(fn, params, batch) for label, fn in variants.items()}
    calls = {label: lambda c=c: block(c(params, batch)) for label, c in compiled.items()}

    reference = compiled["ours"](params, batch)
    for label in list(variants)[1:4]:
        jax.tree_util.tree_map(
            lambda a, b, label=label: np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-6, err_msg=label
            ),
            compiled[label](params, batch),
            reference,
        )

    torch_error = None
    if torch is not None:
        torch_inputs, torch_loss, to_jax_layout = torch_parts
        tp, tx, ty = torch_inputs(params_np, batch_np)
        torch_grads = torch.func.vmap(torch.func.grad(torch_loss), in_dims=(None, 0, 0))
        got = to_jax_layout({k: v.numpy() for k, v in torch_grads(tp, tx, ty).items()})
        torch_error = max(
            float(np.max(np.abs(t - np.asarray(o))) / np.max(np.abs(np.asarray(o))))
            for t, o in zip(
                jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference), strict=True
            )
        )
        if not torch_error < TORCH_RTOL:
            sys.exit(f"{name}: torch.func and ours disagree: max relative error {torch_error:.2e}")
        calls["torch.func"] = lambda: torch_grads(tp, tx, ty)

    times = interleaved_times(calls, reps)
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    minima = {label: min(ts) for label, ts in times.items()}

    # The Python loop: timed on a subset (median of 5 passes over it) and extrapolated.
    grad_one = jax.jit(jax.grad(loss))
    examples = [jax.tree_util.tree_map(lambda a, i=i: a[i], batch) for i in range(LOOP_SUBSET)]
    block(grad_one(params, examples[0]))
    loop_times = []
    for _ in range(5):
        start = time.perf_counter()
        results = [block(grad_one(params, example)) for example in examples]
        loop_times.append((time.perf_counter() - start) * batch_size / LOOP_SUBSET)
        del results
    loop_label = f"python loop (extrapolated from {LOOP_SUBSET})"
    medians[loop_label], minima[loop_label] = statistics.median(loop_times), min(loop_times)

    norms = {
        "norms only (default)": lambda p, b: per_example_grad_norms(loss, p, b),
        "norms only, strategy=rewrite": lambda p, b: per_example_grad_norms(
            loss, p, b, strategy="rewrite"
        ),
        f"norms only, chunked ({CHUNK})": lambda p, b: per_example_grad_norms(
            loss, p, b, chunk_size=CHUNK
        ),
    }
    mem = {label: memory(compiled[label]) for label in list(variants)[:4]}
    mem.update({label: memory(compile_(fn, params, batch)) for label, fn in norms.items()})

    print(f"\n== {name}: batch {batch_size}, {n_params:,} parameters, {reps} interleaved reps")
    print(
        "ours = per_example_grads(loss, params, batch), default strategy='auto': "
        + (f"chunks of {auto_chunk}" if auto_chunk else "all at once")
    )
    if torch_error is not None:
        print(f"torch.func gradients agree with ours: max relative error {torch_error:.1e}")
    print(f"{'median of reps (min)':38s} {'ms':>17s} {'examples/s':>11s} {'x mean':>7s}")
    for label, seconds in medians.items():
        if label in ("mean grad", "write the same bytes once"):
            continue
        ratio = seconds / medians["mean grad"]
        print(
            f"{label:38s} {seconds * 1e3:8.2f} ({minima[label] * 1e3:6.1f}) "
            f"{batch_size / seconds:11.0f} {ratio:7.1f}"
        )
    mean_ms = f"{medians['mean grad'] * 1e3:8.2f} ({minima['mean grad'] * 1e3:6.1f})"
    print(f"{'mean grad (one backward pass)':38s} {mean_ms}")
    write = "write the same bytes once"
    gib_s = n_params * batch_size * 4 / medians[write] / 2**30
    print(
        f"{name}: per-example gradients / writing their {n_params * batch_size * 4 / 2**20:.0f} MiB "
        f"once ({gib_s:.1f} GiB/s) = {medians['ours'] / medians[write]:.2f} (target <= 3)"
    )
    print(f"\n{'XLA memory (MiB)':38s} {'temp':>8s} {'output':>8s} {'total':>8s}")
    for label, (temp, out) in mem.items():
        print(f"{label:38s} {mib(temp)} {mib(out)} {mib(temp + out)}")

    if "torch.func" not in medians:
        print(f"{name}: ratio ours/torch.func = n/a (PyTorch not installed)")
        return None
    ratio = medians["ours"] / medians["torch.func"]
    chunked = f"ours chunked ({CHUNK})"
    print(f"\n{name}: ratio ours/torch.func = {ratio:.2f}")
    print(
        f"{name}: ratio ours chunked/torch.func = "
        f"{medians[chunked] / medians['torch.func']:.2f}; of the fastest reps: ours "
        f"{minima['ours'] / minima['torch.func']:.2f}, chunked "
        f"{minima[chunked] / minima['torch.func']:.2f}"
    )
    return ratio


# -------------------------------------------------------------------------- per-layer statistics


class BlockLM(nn.Module):
    """Token embedding, one pre-norm transformer block, LayerNorm, dense head on every position."""

    vocab: int = 256
    width: int = 128

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.width)(tokens)
        h, _ = Block(num_heads=4, head_dim=self.width // 4, mlp_dim=4 * self.width,
                     norm="layernorm")(h)  # fmt: skip
        return nn.Dense(self.vocab)(nn.LayerNorm()(h))


# name: (module, task kind, input shape of one example, N, batch size)
STATS_MODELS = {
    "mlp": (get_model("mlp", num_outputs=10, hidden_sizes=(512,)), "classification", (784,),
            2048, 256),
    "cnn": (get_model("cnn", num_outputs=10), "classification", (28, 28, 1), 1024, 256),
    "block": (BlockLM(), "sequence", (128,), 256, 32),
}  # fmt: skip
STATS_TARGETS = {"mlp": 1.5, "cnn": 3.0, "block": 3.0}
PROJECTION = layer_stats.Projection(k_in=16, k_out=16, k_dense=256)


def stats_data(name: str, rng: np.random.Generator):
    module, kind, shape, n, batch_size = STATS_MODELS[name]
    if kind == "sequence":
        x = rng.integers(0, module.vocab, size=(n, *shape)).astype(np.int32)
        y = rng.integers(0, module.vocab, size=(n, *shape)).astype(np.int32)
    else:
        x = rng.normal(size=(n, *shape)).astype(np.float32)
        y = rng.integers(0, 10, size=n).astype(np.int32)
    batches = [
        {"x": jnp.asarray(x[i : i + batch_size]), "y": jnp.asarray(y[i : i + batch_size])}
        for i in range(0, n, batch_size)
    ]
    variables = jax.jit(module.init)(jax.random.key(0), batches[0]["x"][:2])
    return flax_task(module, kind), nn.unbox(variables)["params"], batches


def over_batches(step, batches, combine):
    """A zero-argument callable: ``step`` on every batch, results combined on the device."""

    def run():
        total = None
        for batch in batches:
            part = step(batch)
            total = part if total is None else combine(total, part)
        return block(total)

    return run


def bench_stats(name: str, reps: int) -> dict[str, float]:
    task, params, batches = stats_data(name, np.random.default_rng(0))
    n_examples = sum(int(b["y"].shape[0]) for b in batches)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
    grad = jax.jit(cpu_rewrites.with_strategy(jax.grad(task.batch_loss), "auto"))
    key = jax.random.key(0)

    def add(a, b):
        return jax.tree_util.tree_map(jnp.add, a, b)

    def concat(a, b):
        return jnp.concatenate([a, b])

    capture = jax.jit(
        cpu_rewrites.with_strategy(lambda p, b: capture_mod.capture(task, p, b).grads, "auto")
    )
    calls = {
        "gradient pass": over_batches(lambda b: grad(params, b), batches, add),
        "capture only": over_batches(lambda b: capture(params, b), batches, lambda a, b: b),
        "Fisher": over_batches(lambda b: layer_stats.diag_fisher_sum(task, params, b), batches,
                               add),
        "norms": over_batches(lambda b: layer_stats.per_example_sq_norms(task, params, b),
                              batches, concat),
        "projection": over_batches(
            lambda b: layer_stats.projected_grads(task, params, b, key, PROJECTION), batches,
            concat,
        ),
        "Fisher, generic": over_batches(
            lambda b: layer_stats.diag_fisher_sum(task, params, b, method="generic"), batches, add
        ),
    }  # fmt: skip

    first = batches[0]
    fast = layer_stats.diag_fisher_sum(task, params, first)
    generic = layer_stats.diag_fisher_sum(task, params, first, method="generic")
    error = max(
        float(jnp.max(jnp.abs(f - g)) / jnp.max(jnp.abs(g)))
        for f, g in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(generic),
                        strict=True)
    )  # fmt: skip
    plan = capture_mod.plan_capture(task, params, first["x"])
    width = sum(stop - start for _, start, stop in layer_stats.projection_layout(
        task, params, first["x"], PROJECTION))  # fmt: skip

    times = interleaved_times(calls, reps, warmup=1)
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    minima = {label: min(ts) for label, ts in times.items()}
    base = medians["gradient pass"]
    print(
        f"\n== {name}: N = {n_examples} in batches of {first['y'].shape[0]}, {n_params:,} "
        f"parameters, {len(plan.layers)} captured layers, {len(plan.fallback)} generic leaves, "
        f"{width} projected features; {reps} interleaved reps"
    )
    print(f"Fisher of the capture against the generic path: max relative error {error:.1e}")
    print(f"{'median of reps (min), whole data set':38s} {'ms':>17s} {'x grad':>7s}")
    for label, seconds in medians.items():
        print(f"{label:38s} {seconds * 1e3:8.1f} ({minima[label] * 1e3:6.1f}) "
              f"{seconds / base:7.2f}")  # fmt: skip
    target = STATS_TARGETS[name]
    ratios = {label: medians[label] / base for label in ("Fisher", "norms")}
    verdict = ", ".join(
        f"{label} {ratio:.2f}x ({'meets' if ratio <= target else 'MISSES'} <= {target}x)"
        for label, ratio in ratios.items()
    )
    print(f"{name}: {verdict}")
    return ratios


# -------------------------------------------------------------------------- deletion requests


def bench_requests(num_requests: int = 4) -> dict[str, float]:
    """An SSD deletion request with cached full-data importances against a compiled retrain.

    The CNN (``unlearn_jax.models`` ``cnn``) trained 15 epochs on digits (Adam 1e-3, batch 64). The
    retrain (15 epochs on the retain set, the same recipe) is run twice and the second run timed:
    its step is compiled already. The training-set importances are computed once
    (``full_data_importances``, per-example Fisher through the per-layer statistics); then
    ``num_requests`` requests of different sizes (random forget sets of 1%, 3%, 6%, ... of the
    training set) each run ``unlearn(ssd(full_importances=...), ...)`` end to end (the forget set's
    importance pass, the dampening, the driver's checks), timed after ``block_until_ready``. The
    first request compiles; the ratio is over the second and later ones.
    """
    from unlearn_jax import data, methods, models, training

    splits = data.load("digits")
    model = models.get_model("cnn", num_outputs=10)
    task = models.model_task(model)
    recipe = dict(epochs=15, batch_size=64, progress=False)
    optimizer = optax.adam(1e-3)
    sample = splits.train.x[:1]
    original = training.train_original(
        model, task, sample, optimizer, splits.train, init_key=jax.random.key(0),
        data_key=jax.random.key(1), **recipe,
    ).state  # fmt: skip
    split = data.random_forget(splits.train, 0.05, seed=0)
    retrain_times = [
        training.retrain(
            model, task, sample, optimizer, splits.train, split.forget.ids,
            init_key=jax.random.key(0), data_key=jax.random.key(1), **recipe,
        ).wall_time
        for _ in range(2)
    ]  # fmt: skip
    start = time.perf_counter()
    full = methods.full_data_importances(task, original.params, splits.train)
    cache_s = time.perf_counter() - start
    times = []
    for r in range(num_requests):
        request = data.random_forget(splits.train, 0.01 + 0.025 * r, seed=10 + r)
        method = methods.ssd(5.0, 0.1, full_importances=full)
        result = methods.unlearn(method, original, task, request.forget, key=jax.random.key(r))
        block(result.state.params)
        times.append(result.wall_time)
        print(f"  request {r}: {len(request.forget):4d} forget examples, {result.wall_time:.3f} s, "
              f"{int(result.metrics['ssd/num_selected'][0])} parameters dampened")  # fmt: skip
    later = statistics.median(times[1:])
    print(
        f"\n== requests (CNN on digits): compiled retrain (15 epochs) {retrain_times[1]:.2f} s "
        f"(first, compiling: {retrain_times[0]:.2f} s); full-data importances once {cache_s:.2f} s; "
        f"SSD request, first {times[0]:.3f} s, later (median) {later:.3f} s"
    )
    ratio = retrain_times[1] / later
    print(f"requests: compiled retrain / SSD request = {ratio:.0f}x (target >= 50x)")
    return {"retrain_s": retrain_times[1], "request_s": later, "ratio": ratio}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument(
        "--suites", default="grads,stats,requests", help="comma-separated: grads,stats,requests"
    )
    parser.add_argument(
        "--stats-models", default="mlp,cnn,block", help="comma-separated: mlp,cnn,block"
    )
    parser.add_argument("--stats-reps", type=int, default=5)
    args = parser.parse_args(argv)

    def names(value, valid, option):
        chosen = [m.strip() for m in value.split(",") if m.strip()]
        unknown = sorted(set(chosen) - set(valid))
        if unknown:
            parser.error(f"unknown {option} {unknown}; expected some of {sorted(valid)}")
        return chosen

    models = names(args.models, PROBLEMS, "models")
    suites = names(args.suites, ("grads", "stats", "requests"), "suites")
    stats_models = names(args.stats_models, STATS_MODELS, "stats models")
    if args.batch < LOOP_SUBSET or args.reps < 1 or args.stats_reps < 1:
        parser.error(f"need --batch >= {LOOP_SUBSET}, --reps >= 1 and --stats-reps >= 1")

    jax.config.update("jax_platforms", "cpu")
    n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = f"jax {jax.__version__}"
    if torch is not None:
        torch.set_num_threads(n_threads)
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"{versions}; {n_threads} CPUs; load average before: {os.getloadavg()[0]:.1f}")
    if "grads" in suites:
        for name in models:
            bench_model(name, args.batch, args.reps)
    if "stats" in suites:
        for name in stats_models:
            bench_stats(name, args.stats_reps)
            print(f"load average: {os.getloadavg()[0]:.1f}")
    if "requests" in suites:
        bench_requests()
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
