"""The benchmark behind ``unlearn-jax bench``: originals, oracles, every method, every metric.

One run:

1. loads the data and selects the forget set (``class:3``, ``random:0.1``, ``ids:FILE``);
2. trains ``seeds`` original models as ONE vectorised computation (:func:`~unlearn_jax.training.fit_many`)
   and, in one more, ``2 seeds`` oracles on the retain set: the first ``seeds`` from the originals'
   initialisations (the retrain row's sample), the other ``seeds`` from initialisations of their own
   (the REFERENCE every distributional metric compares against). The oracle of seed 0 is also
   retrained alone and timed: that is the "retrain" row and the wall time every speed-up is measured
   against;
3. runs each method on the original of seed 0 (timed: the method's row) and on every original
   (:func:`~unlearn_jax.methods.driver.unlearn_many`, one ``vmap``), with the registry's settings for
   the scenario's kind (class or random forgetting) or those a validation sweep chose. The matching
   methods (``--methods oracle_matching,dmm``, not in ``all``) take their targets from the
   populations of step 2 through one :class:`~unlearn_jax.attribution.MatchingContext`: OM the mean
   logits of the first 10 oracles of the originals' initialisations (never the reference ones),
   DMM TRAK's per-class scores over the first 16 originals, computed once per run (its time is
   recorded apart: it is paid once per model, not per request);
4. evaluates every model: UA / RA / TA and MIA-Efficacy (:func:`~unlearn_jax.evaluation.evaluate_unlearning`),
   LiRA, the gap to the retrained model, a relearning attack and time on the seed-0 model; KLoM and
   the NeurIPS 2023 challenge score of the ``seeds`` models of each row against the reference
   oracles;
5. returns the rows, and :func:`write_outputs` writes ``results.json``, ``table.txt`` and plots.

Distributional metrics, on equal footing: every row's ``seeds`` models (unlearned, originals, or the
retrain row's oracles) are compared with the SAME ``seeds`` reference oracles, which share no
initialisation with them (a method that stays close to the oracle of its own seed would otherwise
look better than independent retraining does). The retrain row is therefore the noise floor:
independent retraining against independent retraining. KLoM needs many models per side (the
digits MLP, random:0.1, p95 over forget examples: floor 9.5 / 5.9 / 3.0 / 1.2 at 8 / 16 / 32 / 64
models per side, the original model 10.2 / 9.7 / 9.5 / 9.2); its column is shown only when the
floor is at most half the original model's value (:data:`KLOM_FLOOR_RATIO`), the reason given in
the table's footer otherwise.

Every result records the full configuration (data, forget spec, model, training recipe, each method's
hyper-parameters, where they came from and run length, seeds, the KLoM direction and the challenge's
parameters, library and JAX versions), so any row can be re-run.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate, data, evaluation, models, training
from unlearn_jax.apps import registry
from unlearn_jax.evaluation import challenge, mia
from unlearn_jax.evaluation.klom import DIRECTIONS as KLOM_DIRECTIONS
from unlearn_jax.evaluation.klom import UNLEARNED_ORACLE
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
    "challenge",
    "relearn",
    "time_s",
    "speedup",
    "settings",
)
COLUMN_FORMATS = {
    "time_s": ".2f",
    "speedup": ".1f",
    "KLoM95(f)": ".2f",
    "LiRA-AUC": ".3f",
    "challenge": ".3f",
}
# "Well below": the retrain row's KLoM (independent oracles against the reference) at most this
# fraction of the original model's; otherwise the column cannot tell a method from either.
KLOM_FLOOR_RATIO = 0.5
KLOM_PERCENTILE = "p95"
FOOTER_WIDTH = 100


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run (recorded verbatim in ``results.json``).

    Attributes:
      data: data set name for :func:`unlearn_jax.data.load`.
      model: model name for :func:`unlearn_jax.models.get_model`.
      forget: forget spec for :func:`unlearn_jax.data.select_forget`; its kind (``class:``,
        ``random:``) selects the registry's per-kind settings.
      methods: method names from :data:`unlearn_jax.apps.registry.METHODS` or
        :data:`~unlearn_jax.apps.registry.MATCHING_METHODS`, or ``("all",)`` (every one of
        ``METHODS``).
      seeds: models per side of KLoM and the challenge score: originals (each unlearned by every
        method), oracles from the same initialisations, and as many reference oracles from others.
        The digits MLP needs about 32 for KLoM to separate the original model from retraining.
      epochs, batch_size, learning_rate: the training recipe (Adam) of originals and oracles.
      forget_seed: seed of a random forget set.
      relearn_steps, relearn_examples, relearn_lr: the relearning attack.
      sweep: grid-search each method's hyper-parameters on a validation forget set first.
      eval_key: seed of the membership-inference attack's subsampling (and of the challenge's
        forget-example subsample).
      shadows: shadow models for LiRA (0: no LiRA); each is trained on a random half of
        train + test, every example IN exactly half of them.
      klom_direction: ``"unlearned||oracle"`` (the datamodel-matching paper's) or
        ``"oracle||unlearned"`` (the KLoM benchmark's published numbers): the one the table shows;
        ``results.json`` holds both.
      challenge_examples: at most this many forget examples for the challenge score (a fixed
        random subsample of larger forget sets: it costs about 20 ms per example and row on
        2 CPU cores, 2.6 s for digits' 144); 0: all of them.
    """

    data: str = "digits"
    model: str = "mlp"
    forget: str = "random:0.1"
    methods: tuple[str, ...] = ("all",)
    seeds: int = 32
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
    klom_direction: str = UNLEARNED_ORACLE
    challenge_examples: int = 256

    def method_names(self) -> list[str]:
        if tuple(self.methods) in (("all",), ()):
            return list(registry.METHODS)
        for name in self.methods:
            registry.method_spec(name)  # an unknown name: the error lists the valid ones
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


def _logits(task, stacked_params, dataset, batch_size: int = 512) -> np.ndarray:
    """Logits ``[M, N, C]`` of ``M`` stacked models on a data set, one padded batch at a time."""
    apply = _stacked_apply(task)
    per_example = data.map_batches(
        lambda b: jnp.swapaxes(apply(stacked_params, b["x"]), 0, 1), dataset,
        min(batch_size, len(dataset)),
    )  # fmt: skip
    return np.swapaxes(per_example, 0, 1)


def _index_slice(tree, start, stop):
    return jax.tree_util.tree_map(lambda a: a[start:stop], tree)


def _accuracies(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-model accuracy ``[M]`` of logits ``[M, N, C]`` against labels ``[N]``."""
    return np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)[None, :], axis=1)


class _Setup:
    """The shared part of a run: data, model, originals, oracles and the reference oracles."""

    def __init__(self, config: BenchConfig, progress: Callable[[str], None]):
        self.config = config
        self.validation = None  # the sweep's validation forget set, retrained once (_validation)
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
        seeds = config.seeds
        self.keys = jax.random.split(jax.random.key(0), seeds)
        reference_keys = jax.random.split(jax.random.key(30_000), seeds)
        self.data_key = jax.random.key(10_000)
        fit_kwargs = dict(epochs=config.epochs, batch_size=config.batch_size, progress=False)

        progress(f"training {seeds} original {config.model} models on {config.data}")
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
        progress(
            f"retraining {2 * seeds} oracles without the forget set ({self.split.spec}): {seeds} "
            f"from the originals' initialisations, {seeds} reference"
        )
        oracles, _ = training.fit_many(
            self.model,
            self.task,
            self.sample,
            self.optimizer,
            self.split.retain,
            keys=jnp.concatenate([self.keys, reference_keys]),
            data_key=self.data_key,
            **fit_kwargs,
        )
        self.oracle_params = _index_slice(oracles.params, 0, seeds)
        self.reference_params = _index_slice(oracles.params, seeds, 2 * seeds)
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
        self.reference_logits = {
            g: _logits(self.task, self.reference_params, d) for g, d in self.eval_sets.items()
        }
        self._challenge_setup()

    @functools.cached_property
    def matching(self):
        """The :class:`~unlearn_jax.attribution.MatchingContext` of the originals and oracles.

        OM's targets: the mean logits of the first ``min(10, seeds)`` oracles from the originals'
        initialisations (the reference oracles stay independent of every row); DMM's scores: TRAK
        over the first ``min(16, seeds)`` originals, computed on first use, in memory.
        """
        from unlearn_jax.attribution import MatchingContext

        seeds = self.config.seeds
        return MatchingContext(
            self.task,
            self.splits.train,
            self.originals.params,
            self.oracle_params,
            num_oracles=min(10, seeds),
            num_checkpoints=min(16, seeds),
        )

    def _challenge_setup(self) -> None:
        """The challenge's forget examples (all, or a fixed subsample) and the reference side."""
        cfg, forget = self.config, self.split.forget
        n = len(forget)
        if cfg.challenge_examples and cfg.challenge_examples < n:
            rng = np.random.default_rng(cfg.eval_key)
            self.challenge_index = np.sort(rng.choice(n, cfg.challenge_examples, replace=False))
        else:
            self.challenge_index = np.arange(n)
        # 2 ceil(ln(M - 1)) - 1 >= 0, the first bucket earning points, needs M >= 3 models.
        self.challenge_on = cfg.seeds >= 3
        labels = np.asarray(forget.y)[self.challenge_index]
        self.reference_phi = evaluation.challenge_confidences(
            self.reference_logits["forget"][:, self.challenge_index], labels
        )
        self.reference_acc = {
            g: _accuracies(self.reference_logits[g], self.eval_sets[g].y)
            for g in ("retain", "test")
        }

    def distribution(self, stacked_params) -> tuple[dict[str, float], dict[str, float]]:
        """KLoM (both directions, forget / retain / test) and the challenge score of ``M`` models.

        Both compare the models' outputs with the reference oracles' (module docstring).

        Returns:
          ``(klom, challenge)``: :func:`~unlearn_jax.evaluation.klom_summary` keys for each direction
          and group, and :func:`~unlearn_jax.evaluation.challenge_score`'s dict (empty with fewer
          than 3 models per side).
        """
        logits = {g: _logits(self.task, stacked_params, d) for g, d in self.eval_sets.items()}
        kl = {}
        for direction in KLOM_DIRECTIONS:
            for group, dataset in self.eval_sets.items():
                values = evaluation.klom(
                    logits[group], self.reference_logits[group], dataset.y, direction=direction
                )
                kl.update(
                    evaluation.klom_summary(
                        values, {group: np.ones(len(values), bool)}, direction=direction
                    )
                )
        if not self.challenge_on:
            return kl, {}
        idx = self.challenge_index
        phi = evaluation.challenge_confidences(
            logits["forget"][:, idx], np.asarray(self.split.forget.y)[idx]
        )
        scores = evaluation.challenge_score(
            phi,
            self.reference_phi,
            ra_unlearned=_accuracies(logits["retain"], self.split.retain.y),
            ra_retrained=self.reference_acc["retain"],
            ta_unlearned=_accuracies(logits["test"], self.splits.test.y),
            ta_retrained=self.reference_acc["test"],
        )
        return kl, scores

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


def _row(name, metrics, retrain_metrics, relearn, dist, wall, retrain_time, direction, settings):
    klom, scores = dist
    gaps = evaluation.gap_to_retrain(metrics, retrain_metrics) if retrain_metrics else {}
    return {
        "method": name,
        "UA": metrics["UA"],
        "RA": metrics["RA"],
        "TA": metrics["TA"],
        "MIA-Efficacy": metrics["MIA-Efficacy"],
        "LiRA-AUC": metrics.get("mia/lira/auc"),
        "avg_gap": gaps.get("avg_gap", 0.0),
        "KLoM95(f)": klom.get(f"klom/{direction}/forget/{KLOM_PERCENTILE}"),
        "challenge": scores.get("challenge/score"),
        "relearn": 100.0
        * relearn.get("relearn/heldout_acc_after", relearn["relearn/forget_acc_after"]),
        "time_s": wall if wall > 0 else None,
        "speedup": evaluation.speedup(wall, retrain_time) if wall > 0 else None,
        "settings": settings,
        "metrics": metrics,
        "gaps": gaps,
        "klom": klom,
        "challenge_metrics": scores,
        "relearn_metrics": relearn,
    }


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _settings(name: str, scenario: str, overrides: dict, swept: bool) -> dict[str, Any]:
    """Where a row's settings come from, and the values of those that are tuned.

    The tuned keys are the sweep grid's and the scenario's overrides (``MethodSpec.kinds``); the
    full hyper-parameters are in the method's record.
    """
    spec = registry.method_spec(name)
    kind = registry.scenario_kind(scenario)
    kind_overrides = dict(spec.kinds.get(kind, {})) if kind else {}
    hparams, run = registry.resolve(name, scenario=scenario, **overrides)
    values = {**hparams, **run}
    keys = list(dict.fromkeys([*sorted(spec.grid), *kind_overrides, *overrides]))
    shown = {k: values[k] for k in keys if k in values}
    return {
        "scenario": kind,
        "source": "sweep" if swept else "registry",
        "kind_overrides": kind_overrides,
        "values": shown,
        "cell": ",".join(f"{k}={_format_value(v)}" for k, v in shown.items()),
    }


def _build(setup: _Setup, name: str, overrides: dict, models: int | None = None):
    """The registry's method for this run (matching methods: from the run's populations)."""
    context = {}
    if registry.needs_context(name):
        context = {"context": setup.matching, "forget": setup.split.forget, "models": models}
    return registry.build(
        name, scenario=setup.config.forget, num_classes=setup.splits.num_classes, **context,
        **overrides,
    )  # fmt: skip


def _run_method(setup: _Setup, name: str, overrides: dict, key: jax.Array):
    """The seed-0 run, timed from the request (for DMM: the row sums of its stored scores) to the
    unlearned parameters; then the method for :func:`unlearn_many` over every original."""
    start = time.perf_counter()
    method, run_kwargs = _build(setup, name, overrides)
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
    if registry.needs_context(name):  # the targets tiled per model
        method, _ = _build(setup, name, overrides, models=setup.config.seeds)
    return method, run_kwargs, result, wall


def _attribution(setup: _Setup, name: str, progress) -> dict[str, Any]:
    """What a matching method computes once per run, before its timed request (recorded)."""
    if name == "oracle_matching":
        return {"targets": f"mean logits of {setup.matching.num_oracles} retrained oracles"}
    if name != "dmm":
        return {}
    context = setup.matching
    fresh = "scores" not in vars(context)  # a cached_property: computed once per run
    start = time.perf_counter()
    if fresh:
        progress(f"  attribution for dmm: TRAK over {context.num_checkpoints} originals (once)")
    scores = context.scores
    record = {
        "targets": f"TRAK per-class scores {list(scores.shape)} over "
        f"{context.num_checkpoints} originals",
        "trak": dataclasses.asdict(context.spec),
    }
    if fresh:
        record["attribution_s"] = time.perf_counter() - start
    return record


def _validation(setup: _Setup):
    """The validation forget set, its retrained model and its metrics (computed once per run)."""
    if setup.validation is None:
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

        def val_metrics(params):
            return evaluation.evaluate_unlearning(
                setup.task,
                params,
                forget=val_split.forget,
                retain=val_split.retain,
                test=setup.splits.test,
                key=cfg.eval_key,
            )

        setup.validation = (val_split, val_metrics, val_metrics(val_retrain.state.params))
    return setup.validation


def _sweep(setup: _Setup, name: str, progress) -> dict[str, Any]:
    """Grid search on a validation forget set; keeps the setting with the smallest Avg. Gap.

    Every trial starts from the registry's settings for the scenario's kind.
    """
    grid = registry.method_spec(name).grid
    if not grid:
        return {"grid": {}, "best": {}, "trials": []}
    val_split, val_metrics, reference = _validation(setup)
    names = sorted(grid)
    trials = []
    for values in _product([grid[k] for k in names]):
        overrides = dict(zip(names, values, strict=True))
        method, run_kwargs = registry.build(
            name, scenario=setup.config.forget, num_classes=setup.splits.num_classes, **overrides
        )
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
      ValueError: an unknown data set, model, method or KLoM direction (naming the valid ones), a
        bad forget spec, a non-positive ``seeds``/``epochs``/``batch_size``.
    """
    _validate.positive_int(seeds=config.seeds, epochs=config.epochs, batch_size=config.batch_size)
    _validate.one_of("klom_direction", config.klom_direction, KLOM_DIRECTIONS)
    if config.challenge_examples < 0:
        raise ValueError(
            f"challenge_examples={config.challenge_examples} must be >= 0 (0: every forget example)."
        )
    names = config.method_names()
    started = time.perf_counter()
    setup = _Setup(config, progress)
    retrain_time = setup.retrain.wall_time
    retrain_metrics = setup.evaluate(setup.retrain.state.params)
    direction = config.klom_direction

    progress("KLoM and challenge score of the oracles and the originals against the reference")
    floor = setup.distribution(setup.oracle_params)
    rows = [
        _row(
            "retrain",
            retrain_metrics,
            None,
            setup.relearn(setup.retrain.state.params),
            floor,
            retrain_time,
            retrain_time,
            direction,
            None,
        ),
        _row(
            "original",
            setup.evaluate(setup.original0.params),
            retrain_metrics,
            setup.relearn(setup.original0.params),
            setup.distribution(setup.originals.params),
            0.0,
            retrain_time,
            direction,
            None,
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
        settings = _settings(name, config.forget, overrides, swept=sweep is not None)
        progress(f"[{i + 1}/{len(names)}] {name} ({settings['cell'] or 'no tuned settings'})")
        key = jax.random.key(100 + i)
        once = _attribution(setup, name, progress)
        try:
            method, run_kwargs, result, wall = _run_method(setup, name, overrides, key)
            many = unlearn_many(
                method, setup.originals, setup.task, setup.split.forget, setup.split.retain,
                key=key, **run_kwargs,
            )  # fmt: skip
        except FloatingPointError as error:
            # A method that diverges (NaN loss, lost definiteness) is a result, not a crash.
            progress(f"  {name} failed: {error}")
            methods_record[name] = {"error": str(error), "sweep": sweep, "settings": settings}
            rows.append({"method": name, "error": str(error), "settings": settings["cell"]})
            continue
        metrics = setup.evaluate(result.state.params)
        rows.append(
            _row(
                name, metrics, retrain_metrics, setup.relearn(result.state.params),
                setup.distribution(many.states.params), wall, retrain_time, direction,
                settings["cell"],
            )
        )  # fmt: skip
        rocs[name] = setup.roc(result.state.params)
        methods_record[name] = {
            "hparams": result.hparams,
            "run": run_kwargs,
            "settings": settings,
            "sweep": sweep,
            "guarantee": result.guarantee,
            **once,
            "first_metrics": {
                k: float(np.asarray(v)[0]) for k, v in result.metrics.items() if np.ndim(v) == 1
            },
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
            "scenario": registry.scenario_kind(config.forget),
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
        "klom": _klom_record(config, rows),
        "challenge": _challenge_record(setup, rows),
        "klom_noise_floor": floor[0],
        "rows": rows,
        "methods": methods_record,
        "roc": {k: {"fpr": v[0], "tpr": v[1]} for k, v in rocs.items()},
        "wall_time_s": time.perf_counter() - started,
    }


def _klom_record(config: BenchConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """KLoM's parameters, and whether the column can tell methods apart (module docstring)."""
    seeds, direction = config.seeds, config.klom_direction
    floor, original = rows[0]["KLoM95(f)"], rows[1]["KLoM95(f)"]
    shown = seeds >= 2 and floor <= KLOM_FLOOR_RATIO * original
    if shown:
        reason = (
            f"the retrain row's value (the noise floor) is at most {KLOM_FLOOR_RATIO:g} times the "
            "original model's"
        )
    else:
        reason = (
            f"with {seeds} models per side the retrain-vs-retrain floor ({floor:.2f}) is not below "
            f"{KLOM_FLOOR_RATIO:g} times the original model's ({original:.2f}), so the column cannot "
            "tell a method from either; more models per side (--seeds) lower the floor (the digits "
            "MLP needs about 32)"
        )
    return {
        "direction": direction,
        "directions_recorded": list(KLOM_DIRECTIONS),
        "statistic": f"{KLOM_PERCENTILE} over forget examples (column KLoM95(f))",
        "models_per_side": seeds,
        "reference": (
            f"{seeds} oracles retrained from initialisations shared with no row (keys from "
            "jax.random.key(30000)); the retrain row: the oracles of the originals' initialisations"
        ),
        "num_bins": 20,
        "clip": 100.0,
        "floor": 1e-5,
        "floor_value": floor,
        "original_value": original,
        "shown": bool(shown),
        "reason": reason,
    }


def _challenge_record(setup: _Setup, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The challenge score's parameters and its retrain-vs-retrain baseline."""
    seeds, n = setup.config.seeds, len(setup.split.forget)
    used = len(setup.challenge_index)
    baseline = rows[0]["challenge_metrics"]
    record = {
        "models_per_side": seeds,
        "forget_examples": used,
        "forget_examples_total": n,
        "forget_example_ids_hash": data.forget_ids_hash(
            np.asarray(setup.split.forget.ids)[setup.challenge_index]
        ),
        "statistic": "evaluation.challenge_confidences (the released scorer's)",
        "delta": challenge.DELTA,
        "cap": challenge.EPSILON_CAP,
        "bin_width": challenge.BIN_WIDTH,
        "last_bucket": baseline.get("challenge/last_bucket"),
        "baseline_score": baseline.get("challenge/score"),
        "baseline_forget_quality": baseline.get("challenge/forget_quality"),
        "shown": bool(setup.challenge_on),
    }
    if not setup.challenge_on:
        record["reason"] = (
            f"with {seeds} models per side no epsilon earns points (last bucket "
            "2 ceil(ln(M - 1)) - 1 < 0 below 3 models)"
        )
    return record


def _footer(record: dict[str, Any]) -> list[str]:
    """The table's footer: what the distributional columns compare and where settings come from."""
    kl, ch, cfg = record["klom"], record.get("challenge", {}), record["config"]
    seeds = kl["models_per_side"]
    lines = []
    if kl["shown"]:
        lines.append(
            f"KLoM95(f): 95th percentile over the {record['data']['forget_size']} forget examples "
            f"of KL({kl['direction'].replace('||', ' || ')}) between margin histograms, {seeds} "
            f"models per side against {seeds} reference oracles; the retrain row is the noise floor "
            f"(independent oracles; original: {kl['original_value']:.2f})."
        )
    else:
        lines.append(f"KLoM not shown ({kl['direction']}, in results.json): {kl['reason']}.")
    if ch.get("shown"):
        subsample = (
            f"{ch['forget_examples']} of {ch['forget_examples_total']} forget examples (a fixed "
            "random subsample)"
            if ch["forget_examples"] < ch["forget_examples_total"]
            else f"all {ch['forget_examples']} forget examples"
        )
        last = int(ch["last_bucket"])
        lines.append(
            f"challenge: NeurIPS 2023 unlearning score (organisers' rules) on {subsample}, {seeds} "
            f"models per side against the reference oracles; last bucket {last} (epsilon >= "
            f"{(last + 1) * ch['bin_width']:g} earns nothing); the retrain row is the "
            "retrain-vs-retrain baseline (identical distributions do not score 1)."
        )
    elif ch:
        lines.append(f"challenge not shown: {ch['reason']}.")
    scenario = record["data"].get("scenario")
    if cfg.get("sweep"):
        source = "chosen per method by --sweep on a validation forget set (results.json: trials)"
    elif scenario:
        source = f"the registry's for {scenario} forgetting (apps/registry.py)"
    else:
        source = "the registry's base settings (a forget set of no known kind)"
    lines.append(f"settings: {source}; every hyper-parameter in results.json.")
    return lines


def format_results_table(record: dict[str, Any]) -> str:
    """The one table ``unlearn-jax bench`` prints, with a footer on its distributional columns.

    The KLoM column is left out when its noise floor is not well below the original model's value,
    the challenge column when no epsilon can earn points; the footer says why.
    """
    hidden = set()
    if not record["klom"]["shown"]:
        hidden.add("KLoM95(f)")
    if not record.get("challenge", {}).get("shown"):
        hidden.add("challenge")
    columns = [c for c in TABLE_COLUMNS if c not in hidden]
    table = evaluation.format_table(record["rows"], columns=columns, formats=COLUMN_FORMATS)
    footer = [textwrap.fill(line, FOOTER_WIDTH, subsequent_indent="  ") for line in _footer(record)]
    return "\n".join([table, "", *footer])


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
