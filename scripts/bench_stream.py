"""Streamed batches: host memory and throughput over a large generated source, and global batches on
8 fake CPU devices.

Command (about two minutes on a loaded 2-core machine with the defaults):

    python scripts/bench_stream.py                          # 200k records, both checks
    python scripts/bench_stream.py --n 1000000 --latency-us 50
    python scripts/bench_stream.py --skip-mesh

Memory and throughput: a source of ``--n`` records ``{"x": uint8 [28, 28, 1], "y": int}`` made when
read (``--latency-us`` of sleep per record stands for storage latency, which releases the GIL as a
file read does) is wrapped in a :class:`unlearn_jax.data.StreamedDataset` (``x_divisor=255``) and one
epoch of ``padded_batches(ds, --batch)`` in dataset order is consumed, each batch blocked on, with
``prefetch=0`` (reads in the loop) and ``prefetch=2`` (a background thread reads ahead). The table
gives records per second of the source alone (a Python loop over ``source[i]``), of each epoch, and
the tracemalloc peak of an epoch (a separate pass) next to the size of the data set: the peak holds
the index arrays (``[N]`` int64 ids and record indices) and a few batches, never the records.

Mesh: in a child process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
``global_batches`` over a ``data=4 x fsdp=2`` mesh is compared value for value with
``padded_batches`` and its shardings with ``batch_sharding(mesh)``.

Measured (2-core machine shared with other jobs, load ~9): 200k records, source alone 150k
records/s, prefetch=0 29k/s, prefetch=2 36k/s, peak 5.6-5.8 MB = 0.037 of the 157 MB data set;
"mesh: OK". With ``--latency-us 50`` (about 130 us per record in practice) both epochs run at the
source's rate (7.0-7.5k/s): one reader thread hides the device side of a batch, not the reads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np


class Generated:
    """``n`` records of 28 x 28 uint8 pixels and a label, each made when read."""

    def __init__(self, n: int, latency_us: float):
        self.n, self.latency = n, latency_us * 1e-6

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if self.latency:
            time.sleep(self.latency)
        return {"x": np.full((28, 28, 1), i % 251, np.uint8), "y": i % 10}


def epoch(n: int, batch: int, prefetch: int, latency_us: float, traced: bool) -> float:
    """Seconds of one epoch, or (``traced``) its tracemalloc peak in bytes, from the dataset's
    construction on (tracing slows every allocation, so the two are separate passes)."""
    import jax

    from unlearn_jax import data

    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    ds = data.StreamedDataset(
        Generated(n, latency_us), num_classes=10, x_divisor=255.0, prefetch=prefetch
    )
    for b, mask in data.padded_batches(ds, batch):
        jax.block_until_ready((b, mask))
    seconds = time.perf_counter() - start
    if not traced:
        return seconds
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def mesh_check() -> str:
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from unlearn_jax import data, sharding
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (37, 4, 4, 1), dtype=np.uint8)
        labels = rng.integers(0, 5, 37)
        records = [{"x": p, "y": l} for p, l in zip(pixels, labels)]
        streamed = data.StreamedDataset(records, ids=7 + np.arange(37), num_classes=5,
                                        x_divisor=255.0)
        memory = data.Dataset(pixels.astype(np.float32) / 255.0, labels, 7 + np.arange(37), "", 5)
        mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
        target = sharding.batch_sharding(mesh)
        key = jax.random.key(3)
        got = list(data.global_batches(streamed, 16, mesh=mesh, key=key))
        want = list(data.padded_batches(memory, 16, key=key))
        assert len(got) == len(want) == 3
        for (b, m), (wb, wm) in zip(got, want):
            for k in wb:
                assert b[k].sharding.is_equivalent_to(target, b[k].ndim), (k, b[k].sharding)
                assert b[k].dtype == wb[k].dtype, k
                np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(wb[k]))
            np.testing.assert_array_equal(np.asarray(m), np.asarray(wm))
        print("mesh: OK (data=4 x fsdp=2, 3 global batches of 16 equal padded_batches)")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=root,
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    return proc.stdout.strip() if proc.returncode == 0 else "mesh: FAILED\n" + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--latency-us", type=float, default=0.0)
    parser.add_argument("--skip-mesh", action="store_true")
    args = parser.parse_args()

    source = Generated(min(args.n, 20_000), args.latency_us)
    start = time.perf_counter()
    for i in range(len(source)):
        source[i]
    source_rate = len(source) / (time.perf_counter() - start)
    size = args.n * 28 * 28
    print(f"{args.n} records of 784 B ({size / 1e6:.0f} MB), batches of {args.batch}")
    print(f"{'':>12} {'records/s':>12} {'peak MB':>9} {'peak / data':>12}")
    print(f"{'source only':>12} {source_rate:>12.0f}")
    epoch(args.n, args.batch, 2, args.latency_us, traced=False)  # compile, warm up
    for prefetch in (0, 2):
        seconds = epoch(args.n, args.batch, prefetch, args.latency_us, traced=False)
        peak = epoch(args.n, args.batch, prefetch, args.latency_us, traced=True)
        print(
            f"{f'prefetch={prefetch}':>12} {args.n / seconds:>12.0f} {peak / 1e6:>9.1f} "
            f"{peak / size:>12.3f}"
        )
    if not args.skip_mesh:
        print(mesh_check())


if __name__ == "__main__":
    main()
