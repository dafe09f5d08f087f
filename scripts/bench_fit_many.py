"""Many models at once: ``fit_many`` (one vmapped computation) against a Python loop of ``fit``.

Command (from the repository root):

    python scripts/bench_fit_many.py                  # 16 MLPs on digits, ~1-2 minutes on 2 CPU cores
    python scripts/bench_fit_many.py --models 8 --epochs 5 --hidden 64

Both paths train the same models (same init keys, same batch order) and the script checks that they
agree before printing the times. Times include compilation, measured in one run: the loop compiles
its step once and reuses it for every model, the vmapped version compiles one batched step.
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

    start = time.perf_counter()
    stacked, _ = training.fit_many(
        model, task, sample, optimizer, splits.train, keys=keys, data_key=data_key, **common
    )
    jax.block_until_ready(stacked.params)
    t_many = time.perf_counter() - start

    start = time.perf_counter()
    singles = []
    for k in keys:
        state = training.create_train_state(model, sample, optimizer, k)
        state, _ = training.fit(state, task, splits.train, key=data_key, **common)
        singles.append(jax.block_until_ready(state.params))
    t_loop = time.perf_counter() - start

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
    print(f"  fit_many (vmap): {t_many:8.2f} s")
    print(f"  loop of fit    : {t_loop:8.2f} s")
    print(f"  speed-up       : {t_loop / t_many:8.2f}x   (max |param difference| {worst:.2e})")


if __name__ == "__main__":
    main()
