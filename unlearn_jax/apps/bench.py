"""The benchmark behind ``unlearn-jax bench``: originals, oracles, every method, every metric.

One run:

1. loads the data and selects the forget set (``class:3``, ``random:0.1``, ``ids:FILE``);
2. trains ``seeds`` original models as ONE vectorised computation (:func:`~unlearn_jax.training.fit_many`)
   and the same number of retrained oracles on the retain set from the same initialisations; the
   oracle of seed 0 is also retrained alone and timed: that is the "retrain" row and the wall time
   every speed-up is measured against;
3. runs each method on the original of seed 0 (timed: the method's row) and on every seed
   (:func:`~unlearn_jax.methods.unlearn_many`, for KLoM);
4. evaluates every model: UA / RA / TA and MIA-Efficacy (:func:`~unlearn_jax.evaluation.evaluate_unlearning`),
   the gap to the retrained model, KLoM against the oracles, a relearning attack, and time;
5. returns the rows, and :func:`write_outputs` writes ``results.json``, ``table.txt`` and plots.

Every result records the full configuration (data, forget spec, model, training recipe, each method's
hyper-parameters and run length, seeds, library and JAX versions), so any row can be re-run.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate, data, evaluation, models, training
from unlearn_jax.apps import registry
from unlearn_jax.evaluation import mia
from unlearn_jax.methods.driver import unlearn, unlearn_many

TABLE_COLUMNS = (
    "method",
    "UA",
    "RA",
    "TA",
    "MIA-Efficacy",
    "LiRA-AUC",
    "avg_gap",
    "KLoM95(f)",
    "relearn",
    "time_s",
    "speedup",
)
COLUMN_FORMATS = {"time_s": ".2f", "speedup": ".1f", "KLoM95(f)": ".2f", "LiRA-AUC": ".3f"}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run (recorded verbatim in ``results.json``).

    Attributes:
      data: data set name for :func:`unlearn_jax.data.load`.
      model: model name for :func:`unlearn_jax.models.get_model`.
      forget: forget spec for :func:`unlearn_jax.data.select_forget`.
      methods: method names from :data:`unlearn_jax.apps.registry.METHODS`, or ``("all",)``.
      seeds: number of original models / oracles (KLoM compares distributions over seeds).
      epochs, batch_size, learning_rate: the training recipe (Adam) of originals and oracles.
      forget_seed: seed of a random forget set.
      relearn_steps, relearn_examples, relearn_lr: the relearning attack.
      sweep: grid-search each method's hyper-parameters on a validation forget set first.
      eval_key: seed of the membership-inference attack's subsampling.
      shadows: shadow models for LiRA (0: no LiRA); each is trained on a random half of
        train + test, every example IN exactly half of them.
    """

    data: str = "digits"
    model: str = "mlp"
    forget: str = "random:0.1"
    methods: tuple[str, ...] = ("all",)
    seeds: int = 8
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    forget_seed: int = 0
    relearn_steps: int = 30
    relearn_examples: int = 10
    relearn_lr: float = 1e-3
    sweep: bool = False
    eval_key: int = 0
    shadows: int = 8

    def method_names(self) -> list[str]:
        if tuple(self.methods) in (("all",), ()):
            return list(registry.METHODS)
        for name in self.methods:
            _validate.one_of("method", name, registry.METHODS)
        return list(self.methods)


def _versions() -> dict[str, str]:
    import flax
    import orbax.checkpoint

    import unlearn_jax

    return {
        "unlearn_jax": unlearn_jax.__version__,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": getattr(orbax.checkpoint, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": str(jax.devices()),
    }


def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


@functools.cache
def _stacked_apply(task):
    """One jitted ``vmap`` of ``task.apply`` per task, so every call reuses its compilations."""
    return jax.jit(jax.vmap(task.apply, in_axes=(0, None)))


def _logits(task, stacked_params, dataset) -> np.ndarray:
    """Logits ``[M, N, C]`` of ``M`` stacked models on a data set."""
    return np.asarray(_stacked_apply(task)(stacked_params, jnp.asarray(dataset.x)))


class _Setup:
    """The shared part of a run: data, model, originals and oracles."""

    def __init__(self, config: BenchConfig, progress: Callable[[str], None]):
        self.config = config
        splits = data.load(config.data)
        self.splits = splits
        self.split = data.select_forget(splits.train, config.forget, seed=config.forget_seed)
        num_outputs = splits.num_classes or int(np.prod(splits.train.y.shape[1:]) or 1)
        self.model = models.get_model(config.model, num_outputs=num_outputs)
        self.task = models.model_task(self.model)
        if self.task.kind != "classification":
            raise ValueError(
                f"the benchmark evaluates classifiers (UA/RA/TA, MIA); {config.data!r} is regression."
            )
        self.optimizer = optax.adam(config.learning_rate)
        self.sample = jnp.asarray(splits.train.x[:1])
        self.keys = jax.random.split(jax.random.key(0), config.seeds)
        self.data_key = jax.random.key(10_000)
        fit_kwargs = dict(epochs=config.epochs, batch_size=config.batch_size, progress=False)

        progress(f"training {config.seeds} original {config.model} models on {config.data}")
        self.originals, _ = training.fit_many(
            self.model,
            self.task,
            self.sample,
            self.optimizer,
            splits.train,
            keys=self.keys,
            data_key=self.data_key,
            **fit_kwargs,
        )
        progress(f"retraining {config.seeds} oracles without the forget set ({self.split.spec})")
        self.oracles, _ = training.fit_many(
            self.model,
            self.task,
            self.sample,
            self.optimizer,
            self.split.retain,
            keys=self.keys,
            data_key=self.data_key,
            **fit_kwargs,
        )
        progress("retraining the seed-0 oracle alone, timed")
        self.retrain = training.retrain(
            self.model,
            self.task,
            self.sample,
            self.optimizer,
            splits.train,
            self.split.forget.ids,
            init_key=self.keys[0],
            data_key=self.data_key,
            **fit_kwargs,
        )
        self.original0 = _index(self.originals, 0)
        self.lira_setup = self._train_shadows(fit_kwargs, progress) if config.shadows else None
        self.eval_sets = {
            "forget": self.split.forget,
            "retain": self.split.retain,
            "test": splits.test,
        }
        self.oracle_logits = {
            g: _logits(self.task, self.oracles.params, d) for g, d in self.eval_sets.items()
        }

    def _train_shadows(self, fit_kwargs, progress):
        """LiRA's shadow models: one ``fit_many`` over member masks on the pool train + test."""
        cfg, train, test = self.config, self.splits.train, self.splits.test
        pool = data.Dataset(
            x=np.concatenate([train.x, test.x]), y=np.concatenate([train.y, test.y]),
            ids=np.concatenate([train.ids, test.ids]), name="shadow-pool",
            num_classes=train.num_classes,
        )  # fmt: skip
        m, n = cfg.shadows, len(pool)
        # Every example IN exactly half of the shadow models (a balanced design: LiRA fits an
        # IN and an OUT Gaussian per example, so both sides need models).
        ranks = np.argsort(np.random.default_rng(cfg.eval_key).random((m, n)), axis=0)
        members = ranks < m // 2
        progress(f"training {m} LiRA shadow models on random halves of train + test")
        shadows, _ = training.fit_many(
            self.model, self.task, self.sample, self.optimizer, pool,
            keys=jax.random.split(jax.random.key(20_000), m), data_key=self.data_key,
            member_masks=members, **fit_kwargs,
        )  # fmt: skip
        # The attack's targets: forget examples (members of the original) and test examples.
        eval_pos = np.concatenate([pool.positions(self.split.forget.ids), pool.positions(test.ids)])
        targets = pool.take(eval_pos)
        shadow_phi = mia.logit_margins(_logits(self.task, shadows.params, targets), targets.y)
        truth = np.concatenate([np.ones(len(self.split.forget), bool), np.zeros(len(test), bool)])
        return targets, shadow_phi, members[:, eval_pos], truth

    def lira(self, params) -> dict[str, float]:
        """LiRA (online, fixed variance) on forget-vs-test; AUC near 0.5 means forgotten."""
        if self.lira_setup is None:
            return {}
        targets, shadow_phi, shadow_in, truth = self.lira_setup
        phi = mia.logit_margins(_logits(self.task, _stack1(params), targets)[0], targets.y)
        _, metrics = mia.lira(shadow_phi, shadow_in, phi, target_in=truth, fix_variance=True)
        return metrics

    def evaluate(self, params) -> dict[str, float]:
        metrics = evaluation.evaluate_unlearning(
            self.task,
            params,
            forget=self.split.forget,
            retain=self.split.retain,
            test=self.splits.test,
            key=self.config.eval_key,
        )
        return {**metrics, **self.lira(params)}

    def relearn(self, params) -> dict[str, float]:
        cfg = self.config
        return evaluation.relearning_attack(
            self.task,
            params,
            self.split.forget,
            key=jax.random.key(7),
            num_examples=cfg.relearn_examples,
            steps=cfg.relearn_steps,
            learning_rate=cfg.relearn_lr,
        ).metrics

    def klom(self, stacked_params) -> dict[str, float]:
        out = {}
        for group, dataset in self.eval_sets.items():
            values = evaluation.klom(
                _logits(self.task, stacked_params, dataset), self.oracle_logits[group], dataset.y
            )
            out.update(evaluation.klom_summary(values, {group: np.ones(len(values), bool)}))
        return out

    def roc(self, params) -> tuple[np.ndarray, np.ndarray]:
        """Loss-threshold MIA ROC: forget examples (labelled members) against test examples."""
        f = _logits(self.task, _stack1(params), self.split.forget)[0]
        t = _logits(self.task, _stack1(params), self.splits.test)[0]
        scores = np.concatenate(
            [
                mia.membership_scores(f, self.split.forget.y, "loss"),
                mia.membership_scores(t, self.splits.test.y, "loss"),
            ]
        )
        labels = np.concatenate([np.ones(len(f), bool), np.zeros(len(t), bool)])
        fpr, tpr, _ = mia.roc_curve(scores, labels)
        return fpr, tpr


def _stack1(params):
    return jax.tree_util.tree_map(lambda a: a[None], params)


def _row(name, metrics, retrain_metrics, relearn, klom, wall, retrain_time) -> dict[str, Any]:
    gaps = evaluation.gap_to_retrain(metrics, retrain_metrics) if retrain_metrics else {}
    return {
        "method": name,
        "UA": metrics["UA"],
        "RA": metrics["RA"],
        "TA": metrics["TA"],
        "MIA-Efficacy": metrics["MIA-Efficacy"],
        "LiRA-AUC": metrics.get("mia/lira/auc"),
        "avg_gap": gaps.get("avg_gap", 0.0),
        "KLoM95(f)": klom.get("klom/forget/p95", float("nan")),
        "relearn": 100.0
        * relearn.get("relearn/heldout_acc_after", relearn["relearn/forget_acc_after"]),
        "time_s": wall if wall > 0 else None,
        "speedup": evaluation.speedup(wall, retrain_time) if wall > 0 else None,
        "metrics": metrics,
        "gaps": gaps,
        "klom": klom,
        "relearn_metrics": relearn,
    }


def _run_method(setup: _Setup, name: str, overrides: dict, key: jax.Array):
    method, run_kwargs = registry.build(name, num_classes=setup.splits.num_classes, **overrides)
    start = time.perf_counter()
    result = unlearn(
        method,
        setup.original0,
        setup.task,
        setup.split.forget,
        setup.split.retain,
        key=key,
        progress=False,
        **run_kwargs,
    )
    wall = time.perf_counter() - start
    return method, run_kwargs, result, wall


def _sweep(setup: _Setup, name: str, progress) -> dict[str, Any]:
    """Grid search on a validation forget set; keeps the setting with the smallest Avg. Gap."""
    spec = registry.METHODS[name]
    grid = spec.grid
    if not grid:
        return {"grid": {}, "best": {}, "trials": []}
    cfg = setup.config
    val_split = _validation_split(setup)
    val_retrain = training.retrain(
        setup.model,
        setup.task,
        setup.sample,
        setup.optimizer,
        setup.splits.train,
        val_split.forget.ids,
        init_key=setup.keys[0],
        data_key=setup.data_key,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        progress=False,
    )
    val_metrics = lambda p: evaluation.evaluate_unlearning(
        setup.task,
        p,
        forget=val_split.forget,
        retain=val_split.retain,
        test=setup.splits.test,
        key=cfg.eval_key,
    )
    reference = val_metrics(val_retrain.state.params)
    names = sorted(grid)
    trials = []
    for values in _product([grid[k] for k in names]):
        overrides = dict(zip(names, values, strict=True))
        method, run_kwargs = registry.build(name, num_classes=setup.splits.num_classes, **overrides)
        try:
            res = unlearn(
                method,
                setup.original0,
                setup.task,
                val_split.forget,
                val_split.retain,
                key=jax.random.key(1),
                progress=False,
                **run_kwargs,
            )
            gap = evaluation.gap_to_retrain(val_metrics(res.state.params), reference)["avg_gap"]
        except FloatingPointError:
            gap = float("inf")
        trials.append({"overrides": overrides, "avg_gap": gap})
        progress(f"  sweep {name} {overrides}: validation Avg. Gap {gap:.2f}")
    best = min(trials, key=lambda t: t["avg_gap"])
    return {
        "grid": grid,
        "validation_forget": val_split.spec,
        "best": best["overrides"],
        "best_avg_gap": best["avg_gap"],
        "trials": trials,
    }


def _validation_split(setup: _Setup):
    """A different forget set of the same kind, disjoint in spirit from the final one."""
    spec = setup.split.spec
    train = setup.splits.train
    if spec.startswith("class:"):
        cls = int(spec.split(":")[1])
        return data.class_forget(train, (cls + 1) % setup.splits.num_classes)
    fraction = len(setup.split.forget) / len(train)
    remaining = train.without_ids(setup.split.forget.ids)
    chosen = data.random_forget(
        remaining,
        min(fraction * len(train) / len(remaining), 0.5),
        seed=setup.config.forget_seed + 1,
    )
    return data.ids_forget(train, chosen.forget.ids)


def _product(lists: Sequence[Sequence[Any]]):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head, *tail)


def run_benchmark(
    config: BenchConfig, *, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the benchmark and returns a JSON-ready record (``rows``, ``config``, ``versions``, ...).

    Raises:
      ValueError: an unknown data set, model or method (naming the valid ones), a bad forget spec.
    """
    _validate.positive_int(seeds=config.seeds, epochs=config.epochs, batch_size=config.batch_size)
    names = config.method_names()
    started = time.perf_counter()
    setup = _Setup(config, progress)
    retrain_time = setup.retrain.wall_time
    retrain_metrics = setup.evaluate(setup.retrain.state.params)

    half = config.seeds // 2
    floor = {}
    if half >= 1 and config.seeds >= 2:
        first = _index_slice(setup.oracles.params, 0, half)
        for group, dataset in setup.eval_sets.items():
            vals = evaluation.klom(
                _logits(setup.task, first, dataset), setup.oracle_logits[group][half:], dataset.y
            )
            floor.update(evaluation.klom_summary(vals, {group: np.ones(len(vals), bool)}))
    rows = [
        _row(
            "retrain",
            retrain_metrics,
            None,
            setup.relearn(setup.retrain.state.params),
            floor,
            retrain_time,
            retrain_time,
        ),
        _row(
            "original",
            setup.evaluate(setup.original0.params),
            retrain_metrics,
            setup.relearn(setup.original0.params),
            setup.klom(setup.originals.params),
            0.0,
            retrain_time,
        ),
    ]
    rows[0]["avg_gap"] = 0.0
    rocs = {
        "retrain": setup.roc(setup.retrain.state.params),
        "original": setup.roc(setup.original0.params),
    }
    methods_record = {}
    for i, name in enumerate(names):
        sweep = _sweep(setup, name, progress) if config.sweep else None
        overrides = dict(sweep["best"]) if sweep else {}
        progress(f"[{i + 1}/{len(names)}] {name}")
        key = jax.random.key(100 + i)
        try:
            method, run_kwargs, result, wall = _run_method(setup, name, overrides, key)
            many = unlearn_many(
                method, setup.originals, setup.task, setup.split.forget, setup.split.retain,
                key=key, **run_kwargs,
            )  # fmt: skip
        except FloatingPointError as error:
            # A method that diverges (NaN loss, lost definiteness) is a result, not a crash.
            progress(f"  {name} failed: {error}")
            methods_record[name] = {"error": str(error), "sweep": sweep}
            rows.append({"method": name, "error": str(error)})
            continue
        metrics = setup.evaluate(result.state.params)
        klom = setup.klom(many.states.params)
        rows.append(
            _row(
                name, metrics, retrain_metrics, setup.relearn(result.state.params), klom, wall,
                retrain_time,
            )
        )  # fmt: skip
        rocs[name] = setup.roc(result.state.params)
        methods_record[name] = {
            "hparams": result.hparams,
            "run": run_kwargs,
            "sweep": sweep,
            "guarantee": result.guarantee,
            "final_metrics": {
                k: float(np.asarray(v)[-1]) for k, v in result.metrics.items() if np.ndim(v) == 1
            },
        }
    return {
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "data": {
            "name": config.data,
            "forget_spec": setup.split.spec,
            "forget_size": len(setup.split.forget),
            "retain_size": len(setup.split.retain),
            "test_size": len(setup.splits.test),
            "forget_ids_hash": data.forget_ids_hash(setup.split.forget.ids),
        },
        "model": models.model_config(setup.model),
        "training": {
            "optimizer": "adam",
            "learning_rate": config.learning_rate,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "retrain_wall_time_s": retrain_time,
        },
        "klom_noise_floor": floor,
        "rows": rows,
        "methods": methods_record,
        "roc": {k: {"fpr": v[0], "tpr": v[1]} for k, v in rocs.items()},
        "wall_time_s": time.perf_counter() - started,
    }


def _index_slice(tree, start, stop):
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def format_results_table(record: dict[str, Any]) -> str:
    """The one table ``unlearn-jax bench`` prints."""
    return evaluation.format_table(
        record["rows"], columns=list(TABLE_COLUMNS), formats=COLUMN_FORMATS
    )


def write_outputs(record: dict[str, Any], out_dir) -> dict[str, str]:
    """Writes ``results.json``, ``table.txt``, ``gap_to_retrain.png`` and ``mia_roc.png``."""
    import pathlib

    out = pathlib.Path(out_dir)
    paths = {
        "results": out / "results.json",
        "table": out / "table.txt",
        "gap_plot": out / "gap_to_retrain.png",
        "roc_plot": out / "mia_roc.png",
    }
    evaluation.write_json(paths["results"], record)
    paths["table"].write_text(format_results_table(record) + "\n")
    evaluation.plot_gap_bars([r for r in record["rows"] if "error" not in r], paths["gap_plot"])
    evaluation.plot_roc_curves(
        {k: (np.asarray(v["fpr"]), np.asarray(v["tpr"])) for k, v in record["roc"].items()},
        paths["roc_plot"],
    )
    return {k: str(v) for k, v in paths.items()}
