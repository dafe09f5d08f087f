"""Gradient-based unlearning on scikit-learn digits: every recipe next to the original and retrained MLP.

Command (from the repository root, CPU is enough):

    python experiments/digits_gradient_methods.py            # both scenarios, ~1-2 minutes on 2 CPU cores
    python experiments/digits_gradient_methods.py --scenario class

Setup: the default MLP (128, 128) trained 20 epochs with Adam 1e-3, batch 64 (init key 0, data key 1);
the retrained oracle uses the same recipe and keys on the retain set only. Two scenarios: every
training example of class 3 forgotten (145 of 1437), and a uniformly random 10% (144, seed 0). Each
method runs once (key 2, batch 64 per side) with the settings in ``CONFIG`` below: the papers'
objectives and hyper-parameters (beta, gamma, temperature, mask fraction, ...) with learning rates and
budgets chosen for this small MLP (the papers' CIFAR / LLM learning rates do not transfer). Wall time is
``UnlearnResult.wall_time`` (compilation included; the retrain time is ``RetrainResult.wall_time``).

Expected results (2 CPU cores, jax 0.10.2, protocol v2; accuracies are deterministic on one machine,
times are not and include compilation, ~1 s per method at a quiet moment):
class 3 (146 forget examples): original forget/retain/test 1.000/0.998/0.961, retrain 0.000/0.996/0.869
(class 3 is ~10% of test); GA, GradDiff, RL, NPO, SimNPO, SalUn, SCRUB and their SAM versions reach
forget <= 0.014 with retain >= 0.976 and test 0.83-0.86; FT and l1-sparse (2 retain epochs) leave forget
at 0.94; Bad Teacher (paper lr 1e-4, 2 epochs) 0.56.
random 10% (144): original 0.986/0.999/0.961, retrain 0.944/0.999/0.961; GradDiff, NPO, GA and SAM-NPO
reach 0.965 and SimNPO 0.938 (the retrain forget accuracy is 0.944), every method keeps retain >= 0.991
and test >= 0.94. Under protocol v1 (batches straddling epochs) GradDiff and NPO landed on 0.944: the
3-example difference comes from the batch order (each pass now sees every example once, the last
batch padded), within the spread of seeds.
Measured 2026-11-30 at load 6-8 (times inflated 3-5x): 300 s in all.
"""

from __future__ import annotations

import argparse
import time

import jax
import optax

from unlearn_jax import data
from unlearn_jax.methods import gradient as G
from unlearn_jax.methods.driver import unlearn
from unlearn_jax.models import get_model, model_task
from unlearn_jax.training import evaluate_accuracy, retrain, train_original


def clipped_sgd(learning_rate):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(learning_rate))


def get_config():
    """Per scenario: method name -> (factory, run length for ``unlearn``)."""
    common = {
        "finetune": (lambda: G.finetune(learning_rate=0.01), {"epochs": 2}),
        "l1_sparse": (lambda: G.l1_sparse(learning_rate=0.01, gamma=5e-4), {"epochs": 2}),
        "random_label": (lambda: G.random_label(learning_rate=5e-3), {"epochs": 1}),
        "salun": (lambda: G.salun(learning_rate=5e-3), {"epochs": 1}),
        "scrub": (lambda: G.scrub(learning_rate=5e-3), {"epochs": 3}),
        "bad_teacher": (lambda: G.bad_teacher(learning_rate=1e-4), {"epochs": 2}),
    }
    return {
        "class": {
            **common,
            "gradient_ascent": (
                lambda: G.gradient_ascent(optimizer=clipped_sgd(0.02)),
                {"steps": 26},
            ),
            "grad_diff": (lambda: G.grad_diff(optimizer=optax.adam(5e-4)), {"steps": 15}),
            "npo": (lambda: G.npo(optimizer=optax.adam(5e-4)), {"steps": 15}),
            "simnpo": (lambda: G.simnpo(optimizer=optax.adam(5e-4)), {"steps": 15}),
            "sam+npo": (lambda: G.sam(G.npo(optimizer=optax.adam(5e-4)), rho=0.01), {"steps": 15}),
            "sam+salun": (lambda: G.sam(G.salun(learning_rate=5e-3), rho=0.01), {"epochs": 1}),
        },
        "random": {
            **common,
            "gradient_ascent": (
                lambda: G.gradient_ascent(optimizer=clipped_sgd(0.02)),
                {"steps": 5},
            ),
            "grad_diff": (lambda: G.grad_diff(optimizer=optax.adam(2e-4)), {"epochs": 2}),
            "npo": (lambda: G.npo(optimizer=optax.adam(2e-4)), {"epochs": 2}),
            "simnpo": (lambda: G.simnpo(optimizer=optax.adam(2e-4)), {"epochs": 2}),
            "sam+npo": (lambda: G.sam(G.npo(optimizer=optax.adam(2e-4)), rho=0.01), {"epochs": 2}),
            "sam+salun": (lambda: G.sam(G.salun(learning_rate=5e-3), rho=0.01), {"epochs": 1}),
        },
    }


ORDER = [
    "finetune", "gradient_ascent", "grad_diff", "random_label", "npo", "simnpo", "l1_sparse",
    "salun", "scrub", "bad_teacher", "sam+npo", "sam+salun",
]  # fmt: skip


def run_scenario(name, split, splits, model, task, original, methods):
    def accs(params):
        return [
            evaluate_accuracy(task, params, d) for d in (split.forget, split.retain, splits.test)
        ]

    rows = [("original", *accs(original.state.params), original.wall_time)]
    oracle = retrain(
        model, task, splits.train.x[:1], optax.adam(1e-3), splits.train, split.forget.ids,
        epochs=20, batch_size=64, init_key=jax.random.key(0), data_key=jax.random.key(1),
        progress=False,
    )  # fmt: skip
    rows.append(("retrain", *accs(oracle.state.params), oracle.wall_time))
    for method_name in ORDER:
        make, run = methods[method_name]
        result = unlearn(
            make(), original.state, task, split.forget, split.retain, key=jax.random.key(2),
            batch_size=64, progress=False, **run,
        )  # fmt: skip
        rows.append((method_name, *accs(result.state.params), result.wall_time))
    print(
        f"\n{name}: |forget| = {len(split.forget)}, |retain| = {len(split.retain)}, |test| = {len(splits.test)}"
    )
    print(f"{'method':<16} {'forget':>7} {'retain':>7} {'test':>7} {'time [s]':>9}")
    for method_name, f, r, t, wall in rows:
        print(f"{method_name:<16} {f:>7.3f} {r:>7.3f} {t:>7.3f} {wall:>9.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["class", "random", "both"], default="both")
    args = parser.parse_args()
    start = time.perf_counter()
    splits = data.load("digits")
    model = get_model("mlp", num_outputs=10)
    task = model_task(model)
    original = train_original(
        model, task, splits.train.x[:1], optax.adam(1e-3), splits.train, epochs=20, batch_size=64,
        init_key=jax.random.key(0), data_key=jax.random.key(1), progress=False,
    )  # fmt: skip
    config = get_config()
    if args.scenario in ("class", "both"):
        split = data.class_forget(splits.train, 3)
        run_scenario("class 3 forgotten", split, splits, model, task, original, config["class"])
    if args.scenario in ("random", "both"):
        split = data.random_forget(splits.train, 0.1, seed=0)
        run_scenario("random 10% forgotten", split, splits, model, task, original, config["random"])
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s, jax {jax.__version__}, {jax.devices()[0].platform}"
    )


if __name__ == "__main__":
    main()
