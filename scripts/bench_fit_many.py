"""Many models at once: ``fit_many`` (one vmapped computation) against a Python loop of ``fit``.

Command (from the repository root):

    python scripts/bench_fit_many.py                  # 16 MLPs on digits, ~1-2 minutes on 2 CPU cores
    python scripts/bench_fit_many.py --models 8 --epochs 5 --hidden 64

Both paths train the same models (same init keys, same batch order) and the script checks that they
agree before printing the times. Each path runs twice in one process: the first call includes
compilation (the loop compiles its step once and reuses it for every model; the vmapped version
compiles one batched step), the second reuses the compiled code.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from unlearn_jax import data, models, training


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()

    splits = data.load("digits")
    model = models.get_model("mlp", num_outputs=10, hidden_sizes=(args.hidden, args.hidden))
    task = models.model_task(model)
    optimizer = optax.adam(1e-3)
    sample = splits.train.x[:1]
    keys = jax.random.split(jax.random.key(0), args.models)
    data_key = jax.random.key(1)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, progress=False)

    def run_many():
        start = time.perf_counter()
        stacked, _ = training.fit_many(
            model, task, sample, optimizer, splits.train, keys=keys, data_key=data_key, **common
        )
        jax.block_until_ready(stacked.params)
        return stacked, time.perf_counter() - start

    def run_loop():
        start = time.perf_counter()
        singles = []
        for k in keys:
            state = training.create_train_state(model, sample, optimizer, k)
            state, _ = training.fit(state, task, splits.train, key=data_key, **common)
            singles.append(jax.block_until_ready(state.params))
        return singles, time.perf_counter() - start

    # First calls include compilation (each path compiles once); second calls reuse it.
    stacked, t_many_cold = run_many()
    singles, t_loop_cold = run_loop()
    _, t_many = run_many()
    _, t_loop = run_loop()

    worst = 0.0
    for j, params in enumerate(singles):
        for a, b in zip(
            jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, j=j: x[j], stacked.params)),
            jax.tree_util.tree_leaves(params),
            strict=True,
        ):
            worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    print(
        f"{args.models} MLPs ({args.hidden}, {args.hidden}) on digits, {args.epochs} epochs, batch {args.batch_size}"
    )
    print(f"{'':22}{'first call':>12}{'compiled':>12}")
    print(f"  fit_many (vmap)     {t_many_cold:10.2f} s{t_many:10.2f} s")
    print(f"  loop of fit         {t_loop_cold:10.2f} s{t_loop:10.2f} s")
    print(f"  speed-up (loop/vmap){t_loop_cold / t_many_cold:10.2f}x {t_loop / t_many:10.2f}x")
    print(
        f"  max |param difference| between the two: {worst:.2e} (float32 reassociation, {args.epochs} epochs)"
    )


if __name__ == "__main__":
    main()
