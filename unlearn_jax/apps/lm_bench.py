"""The language-model benchmark behind ``unlearn-jax bench --data facts``: TOFU's table, offline.

One run:

1. generates the fictitious facts (:func:`unlearn_jax.data.facts.generate_facts`: ``num_authors``
   training authors, holdout authors, world facts) and the forget request ``authors:FRACTION``
   (whole authors, the first of one seeded order, as TOFU's forget01/05/10);
2. trains ``seeds`` full models on everything and the retain-only oracles from the SAME
   initialisation keys, batch order and step schedule as ONE vectorised computation
   (:func:`~unlearn_jax.training.fit_many`; an oracle's member mask leaves the forget pairs out,
   which is exact retraining); records how many forget and retain questions the full models
   answer with ROUGE-L recall >= 0.9 (the issue asks for 90% of them);
3. runs each method (:mod:`unlearn_jax.apps.lm_registry`) on the full model of seed 0
   (:func:`~unlearn_jax.methods.unlearn`, timed) and on those of the other seeds in one
   :func:`~unlearn_jax.methods.unlearn_many`;
4. evaluates every model (:mod:`unlearn_jax.evaluation.lm`): TOFU's forget quality (the KS p-value
   of the forget truth ratios against a reference oracle's) and model utility (retain authors and
   world facts), forget and retain ROUGE-L recall, MUSE's PrivLeak (the Min-K%++ forget-vs-holdout
   MIA AUC relative to the reference oracle's), a relearning attack (fine-tune on a few forget
   answers, then the ROUGE-L recall on the other forget questions), and the time;
5. returns the rows (means over seeds; per-seed values in ``results.json``), and
   :func:`write_lm_outputs` writes ``results.json``, ``table.txt`` and plots.

The reference oracle. The model of seed ``s`` (unlearned, full, or oracle) is compared with the
oracle of seed ``(s + 1) mod S``, which shares no initialisation with it; with one seed, an oracle
of its own initialisation key is trained. So the retrain row's forget quality and PrivLeak are a
noise floor (independent retraining against retraining), not 1 and 0 by construction as when a
model is compared with itself.

Everything is recorded (data, request, model, training recipe, each method's hyper-parameters and
run, seeds, the attack's settings, versions) so that any row can be re-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import textwrap
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn_jax import _validate, evaluation, models, training
from unlearn_jax.apps import lm_registry
from unlearn_jax.data import facts as facts_data
from unlearn_jax.data.tokenizer import EOS_ID, PAD_ID
from unlearn_jax.evaluation import lm as lm_eval
from unlearn_jax.methods.driver import unlearn, unlearn_many

FORGET_PREFIX = "authors:"
TABLE_COLUMNS = (
    "method",
    "forget_quality",
    "model_utility",
    "forget_rouge",
    "retain_rouge",
    "privleak",
    "relearn",
    "time_s",
    "settings",
)
COLUMN_FORMATS = {"forget_quality": ".2e", "time_s": ".1f"}
FOOTER_WIDTH = 100
FIT_ROUGE = 0.9  # a question counts as answered when the greedy answer's ROUGE-L recall >= this


@dataclasses.dataclass(frozen=True)
class LMBenchConfig:
    """Everything that defines an LM benchmark run (recorded verbatim in ``results.json``).

    Attributes:
      model: a language model of :func:`unlearn_jax.models.get_model` (``"lm-tiny"``).
      model_kwargs: overrides of its hyper-parameters (e.g. ``{"num_layers": 4}``).
      forget: ``"authors:FRACTION"``, the fraction of training authors to forget.
      methods: names of :data:`unlearn_jax.apps.lm_registry.METHODS`, ``("all",)`` for every one,
        or ``("default",)`` for :data:`~unlearn_jax.apps.lm_registry.DEFAULT_METHODS`.
      seeds: models per row (``S``): full models, oracles from their initialisations, unlearned
        models. Forget quality and PrivLeak compare each with another seed's oracle.
      num_authors, num_holdout_authors, data_seed: the generated data
        (:func:`~unlearn_jax.data.facts.generate_facts`).
      epochs, batch_size, learning_rate, warmup_steps, weight_decay: the training recipe of full
        models and oracles: AdamW with a linear warm-up to ``learning_rate`` and a cosine decay to a
        tenth of it over the run.
      retain_eval: retain questions evaluated per model (a fixed random subset of the retain
        authors' questions, as TOFU evaluates a retain subset); 0: all.
      relearn_examples, relearn_steps, relearn_lr: the relearning attack: full-batch AdamW steps on
        that many forget question-answer pairs (a fixed random subset), then ROUGE-L recall on the
        other forget questions.
      mia_score: the membership score of PrivLeak (``"min_k++"``, MUSE's choice; ``"min_k"``,
        ``"loss"``, ``"zlib"``).
      eval_seed: seed of the retain subset, the relearning subset and the refusal answers.
      eval_batch_size: rows per jitted evaluation chunk.
    """

    model: str = "lm-tiny"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    forget: str = "authors:0.05"
    methods: tuple[str, ...] = ("default",)
    seeds: int = 3
    num_authors: int = 40
    num_holdout_authors: int = 10
    data_seed: int = 0
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    retain_eval: int = 60
    relearn_examples: int = 4
    relearn_steps: int = 10
    relearn_lr: float = 1e-3
    mia_score: str = "min_k++"
    eval_seed: int = 0
    eval_batch_size: int = 64

    def method_names(self) -> list[str]:
        """The methods to run, validated.

        Raises:
          ValueError: an unknown name (listing the valid ones).
        """
        if tuple(self.methods) in (("all",), ()):
            return list(lm_registry.METHODS)
        if tuple(self.methods) == ("default",):
            return list(lm_registry.DEFAULT_METHODS)
        for name in self.methods:
            _validate.one_of("LM method", name, lm_registry.METHODS)
        return list(self.methods)

    def fraction(self) -> float:
        """The forget fraction of ``forget`` (``"authors:0.05"`` -> 0.05).

        Raises:
          ValueError: another form, or a fraction outside ``(0, 1)``.
        """
        spec = self.forget.strip()
        value = math.nan
        if spec.startswith(FORGET_PREFIX):
            with contextlib.suppress(ValueError):
                value = float(spec[len(FORGET_PREFIX) :])
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"the facts benchmark forgets whole authors: --forget must be "
                f"'{FORGET_PREFIX}FRACTION' with 0 < FRACTION < 1 (e.g. authors:0.05), got "
                f"{self.forget!r}."
            )
        return value

    def validate(self) -> None:
        """Checks every field before any work.

        Raises:
          ValueError: naming the field and the valid range.
        """
        self.fraction()
        self.method_names()
        _validate.one_of("model", self.model, models.LANGUAGE_MODELS)
        models.get_model(self.model, num_outputs=2, **self.model_kwargs)  # unknown keywords
        _validate.one_of("mia_score", self.mia_score, ("min_k++", "min_k", "loss", "zlib"))
        _validate.positive_int(
            seeds=self.seeds, num_authors=self.num_authors, epochs=self.epochs,
            batch_size=self.batch_size, relearn_examples=self.relearn_examples,
            relearn_steps=self.relearn_steps, eval_batch_size=self.eval_batch_size,
            num_holdout_authors=self.num_holdout_authors,
        )  # fmt: skip
        _validate.positive(learning_rate=self.learning_rate, relearn_lr=self.relearn_lr)
        _validate.non_negative(
            warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
            retain_eval=self.retain_eval, data_seed=self.data_seed, eval_seed=self.eval_seed,
        )  # fmt: skip
        count = max(1, round(self.fraction() * self.num_authors))
        if count >= self.num_authors:
            raise ValueError(
                f"forget {self.forget} of {self.num_authors} authors leaves no retain author."
            )


def training_optimizer(config: LMBenchConfig, size: int) -> optax.GradientTransformation:
    """The training recipe's AdamW for a data set of ``size`` examples: linear warm-up over
    ``warmup_steps`` to ``learning_rate``, cosine decay to a tenth of it at the run's last step
    (``epochs * ceil(size / batch_size)`` steps; the oracles run the same steps, forget rows
    masked out)."""
    steps = config.epochs * math.ceil(size / min(config.batch_size, size))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        min(config.warmup_steps, steps - 1),
        steps,
        end_value=config.learning_rate / 10,
    )
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def refusal_answers(data, ids: Any, seed: int):
    """One refusal per id (:data:`~unlearn_jax.data.facts.REFUSALS`, drawn with ``seed``), encoded
    with the questions of ``ids``: the alternate answers of IdK and IdkDPO."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, np.int64)
    choice = rng.integers(len(facts_data.REFUSALS), size=ids.size)
    return data.with_answers(ids, [facts_data.REFUSALS[c] for c in choice], name="facts/refusals")


# ---- the relearning attack ------------------------------------------------------------------------
@functools.partial(
    jax.jit, static_argnames=("task", "learning_rate", "weight_decay", "steps")
)  # fmt: skip
def _relearn(params, batch, *, task, learning_rate, weight_decay, steps):
    """``steps`` full-batch AdamW steps on the sequence loss of ``batch`` (module-level: one
    compilation per task, settings and batch shape, shared by every row)."""
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

    def step(carry, _):
        p, state = carry
        grads = jax.grad(task.batch_loss)(p, batch)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def relearning_attack(
    task, params, relearn_set, held_out, *, decode, steps: int, learning_rate: float,
    weight_decay: float = 0.01, batch_size: int = 64,
) -> dict[str, float]:  # fmt: skip
    r"""The relearning attack on a language model: fine-tune on a few forget question-answer pairs,
    measure what comes back on the OTHER forget questions.

    ``steps`` full-batch AdamW steps minimise the sequence loss (answer tokens) of ``relearn_set``;
    then the held-out forget questions are answered greedily. Facts of different questions are
    independent draws, so a model that truly lost them cannot infer the held-out answers from the
    relearned ones: what comes back was hidden, not removed (the SAM robust-unlearning paper's
    protocol; compare with the attack on the oracle).

    Args:
      task, params: the (unlearned) model.
      relearn_set: the sequence dataset the attacker fine-tunes on.
      held_out: a sequence dataset of the other forget pairs.
      decode: token ids -> text.
      steps, learning_rate, weight_decay: the attack's AdamW.
      batch_size: rows per evaluation chunk.

    Returns:
      ``{"relearn/rouge_before", "relearn/rouge_after", "relearn/prob_before",
      "relearn/prob_after"}``: mean ROUGE-L recall and mean :math:`P(a|q)^{1/|a|}` on
      ``held_out``, before and after the attack.
    """
    batch = {k: jnp.asarray(v) for k, v in relearn_set.as_batch().items()}
    attacked = _relearn(
        params, batch, task=task, learning_rate=float(learning_rate),
        weight_decay=float(weight_decay), steps=int(steps),
    )  # fmt: skip
    out = {}
    for when, p in (("before", params), ("after", attacked)):
        stats = lm_eval.qa_statistics(
            task, p, held_out, decode=decode, eos_id=EOS_ID, pad_id=PAD_ID, batch_size=batch_size
        )
        out[f"relearn/rouge_{when}"] = float(np.mean(stats["rouge_l/recall"]))
        out[f"relearn/prob_{when}"] = float(np.mean(stats["prob"]))
    return out


# ---- setup --------------------------------------------------------------------------------------
def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


class _Setup:
    """Data, models, evaluation sets, full models and oracles of one run."""

    def __init__(self, config: LMBenchConfig, progress: Callable[[str], None]):
        self.prepare(config)
        self.train(progress)

    def prepare(self, config: LMBenchConfig) -> None:
        """The data, the request, the evaluation sets and the model (no training)."""
        self.config = cfg = config
        fraction = cfg.fraction()
        self.data = facts_data.generate_facts(
            seed=cfg.data_seed,
            num_authors=cfg.num_authors,
            num_holdout_authors=cfg.num_holdout_authors,
        )
        self.request = self.data.forget_split(fraction)
        self.forget, self.retain = self.request.forget, self.request.retain
        self.eval = self.data.split(fraction)
        rng = np.random.default_rng(cfg.eval_seed)
        retain_ids = self.eval.retain.ids
        if cfg.retain_eval and cfg.retain_eval < retain_ids.size:
            retain_ids = np.sort(rng.choice(retain_ids, cfg.retain_eval, replace=False))
        self.retain_eval = self.eval.retain.by_ids(retain_ids)
        forget_ids = self.eval.forget.ids
        count = min(cfg.relearn_examples, forget_ids.size - 1)
        if count < 1:
            raise ValueError(
                f"the relearning attack needs >= 2 forget questions, {self.request.spec} has "
                f"{forget_ids.size}."
            )
        chosen = np.sort(rng.choice(forget_ids, count, replace=False))
        self.relearn_set = self.eval.forget.qa.by_ids(chosen)
        self.relearn_held = self.eval.forget.qa.by_ids(np.setdiff1d(forget_ids, chosen))
        self.refusals = refusal_answers(self.data, self.forget.ids, cfg.eval_seed)

        vocab = self.data.tokenizer.vocab_size
        self.model = models.get_model(cfg.model, num_outputs=vocab, **cfg.model_kwargs)
        self.task = models.model_task(self.model)
        self.sample = jnp.asarray(self.data.train.x[:1])
        self.keys = jax.random.split(jax.random.key(0), cfg.seeds)
        self.data_key = jax.random.key(10_000)

    def train(self, progress: Callable[[str], None]) -> None:
        """The full models and the oracles in ONE :func:`~unlearn_jax.training.fit_many`.

        Models ``0 .. S-1`` are the full models (every pair a member), models ``S .. 2S-1`` the
        oracles of the same initialisation keys, whose member mask leaves the forget pairs out (a
        non-member has no influence on training: exact retraining); with one seed, model 2 is an
        oracle of its own key, the reference. All share the batch order and the step schedule, so a
        full model and its oracle differ only by the forget set.
        """
        cfg, seeds = self.config, self.config.seeds
        train = self.data.train
        retain_member = ~np.isin(train.ids, self.forget.ids)
        oracle_keys = self.keys if seeds > 1 else jnp.stack([self.keys[0], jax.random.key(30_000)])
        keys = jnp.concatenate([self.keys, oracle_keys])
        masks = np.stack([np.ones(len(train), bool)] * seeds + [retain_member] * len(oracle_keys))
        progress(
            f"training {seeds} full {cfg.model} models on {len(train)} question-answer pairs "
            f"({cfg.num_authors} authors + world facts) and {len(oracle_keys)} oracles without "
            f"{self.request.spec} ({len(self.forget)} pairs), in one vmap"
        )
        start = time.perf_counter()
        states, history = training.fit_many(
            self.model, self.task, self.sample, training_optimizer(cfg, len(train)), train,
            keys=keys, data_key=self.data_key, member_masks=masks, epochs=cfg.epochs,
            batch_size=cfg.batch_size, progress=False,
        )  # fmt: skip
        jax.block_until_ready(states.params)
        self.train_time = time.perf_counter() - start
        self.model_time = self.train_time / keys.shape[0]
        self.train_history = {k: np.asarray(v)[:seeds] for k, v in history.items()}
        self.originals = jax.tree_util.tree_map(lambda a: a[:seeds], states)
        self.set_oracles([_index(states.params, m) for m in range(seeds, keys.shape[0])])

    def set_oracles(self, oracle_params: list[Any]) -> None:
        """The oracles of seeds ``0 .. S-1`` (plus the extra reference when ``S = 1``)."""
        seeds = self.config.seeds
        self.oracle_params = oracle_params[:seeds]
        self.reference_params = (
            [oracle_params[(s + 1) % seeds] for s in range(seeds)]
            if seeds > 1
            else [oracle_params[1]]
        )
        self._oracles = oracle_params
        self._oracle_stats: dict[int, dict[str, Any]] = {}

    # ---- evaluation ----------------------------------------------------------------------------
    def statistics(self, params) -> dict[str, Any]:
        """Per-question statistics of one model: TOFU's on forget, retain (subset) and world facts
        (with truth ratios), and the membership scores of the forget and holdout answers."""
        cfg, decode = self.config, self.data.tokenizer.decode
        common = dict(decode=decode, eos_id=EOS_ID, pad_id=PAD_ID, batch_size=cfg.eval_batch_size)
        out = {}
        for name, qs in (("forget", self.eval.forget), ("retain", self.retain_eval),
                         ("world", self.eval.world)):  # fmt: skip
            out[name] = lm_eval.qa_statistics(
                self.task, params, qs.qa, paraphrased_answer=qs.paraphrased_answer,
                perturbed=qs.perturbed,
                paraphrased_question=qs.paraphrased_question if name == "forget" else None,
                **common,
            )  # fmt: skip
        for name, qa in (("forget", self.eval.forget.qa), ("holdout", self.eval.holdout.qa)):
            out[f"mia/{name}"] = lm_eval.lm_membership_scores(
                self.task, params, qa, decode=decode, batch_size=cfg.eval_batch_size
            )
        return out

    def oracle_statistics(self, params) -> dict[str, Any]:
        """:meth:`statistics`, computed once per oracle (oracles are also references)."""
        key = next(i for i, p in enumerate(self._oracles) if p is params)
        if key not in self._oracle_stats:
            self._oracle_stats[key] = self.statistics(params)
        return self._oracle_stats[key]

    def references(self) -> list[dict[str, Any]]:
        return [self.oracle_statistics(p) for p in self.reference_params]

    def metrics(self, stats, reference) -> dict[str, float]:
        """TOFU's and MUSE's numbers of one model against its reference oracle's statistics."""
        out = lm_eval.tofu_metrics(
            stats["forget"], stats["retain"], stats["world"],
            oracle_forget_truth_ratios=reference["forget"]["truth_ratio"],
        )  # fmt: skip
        score = self.config.mia_score
        auc = lm_eval.mia_auc(stats["mia/forget"][score], stats["mia/holdout"][score])
        ref_auc = lm_eval.mia_auc(reference["mia/forget"][score], reference["mia/holdout"][score])
        out["mia/auc"], out["mia/reference_auc"] = auc, ref_auc
        out["privleak"] = lm_eval.privleak(auc, ref_auc) if ref_auc < 1.0 else math.nan
        for name in ("forget", "retain"):
            rouge = stats[name]["rouge_l/recall"]
            out[f"{name}/answered"] = float(np.mean(rouge >= FIT_ROUGE))
        out["forget/paraphrased_rouge_l"] = float(
            np.mean(stats["forget"]["paraphrased_question/rouge_l/recall"])
        )
        return out

    def relearn(self, params) -> dict[str, float]:
        cfg = self.config
        return relearning_attack(
            self.task, params, self.relearn_set, self.relearn_held,
            decode=self.data.tokenizer.decode, steps=cfg.relearn_steps,
            learning_rate=cfg.relearn_lr, batch_size=cfg.eval_batch_size,
        )  # fmt: skip

    def evaluate(self, params_list, *, oracles: bool = False) -> list[dict[str, float]]:
        """Metrics and the relearning attack of each seed's model (``oracles``: the oracles)."""
        refs = self.references()
        out = []
        for s, params in enumerate(params_list):
            stats = self.oracle_statistics(params) if oracles else self.statistics(params)
            out.append({**self.metrics(stats, refs[s]), **self.relearn(params)})
        return out


# ---- rows -----------------------------------------------------------------------------------------
def _summary(per_seed: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = per_seed[0].keys()
    values = {k: np.array([m[k] for m in per_seed], np.float64) for k in keys}
    mean = {k: float(np.mean(v)) for k, v in values.items()}
    std = {k: float(np.std(v)) for k, v in values.items()}
    return mean, std


def _row(name: str, per_seed, wall: float | None, settings: str | None) -> dict[str, Any]:
    mean, std = _summary(per_seed)
    return {
        "method": name,
        "forget_quality": mean["forget_quality"],
        "model_utility": mean["model_utility"],
        "forget_rouge": mean["forget/rouge_l"],
        "retain_rouge": mean["retain/rouge_l"],
        "privleak": mean["privleak"],
        "relearn": mean["relearn/rouge_after"],
        "time_s": wall,
        "settings": settings,
        "mean": mean,
        "std": std,
        "per_seed": per_seed,
    }


def _settings_cell(name: str) -> str:
    hparams, run = lm_registry.resolve(name)
    shown = {k: v for k, v in {**hparams, **run}.items() if k != "retain"}
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def _run_method(setup: _Setup, name: str, key) -> tuple[Any, list[Any], float, dict]:
    method, run = lm_registry.build(name, answers=setup.refusals)
    start = time.perf_counter()
    result = unlearn(
        method, _index(setup.originals, 0), setup.task, setup.forget,
        setup.retain, key=key, progress=False, **run,
    )  # fmt: skip
    wall = time.perf_counter() - start
    params = [result.state.params]
    if setup.config.seeds > 1:
        rest = jax.tree_util.tree_map(lambda a: a[1:], setup.originals)
        many = unlearn_many(method, rest, setup.task, setup.forget, setup.retain, key=key, **run)
        params += [_index(many.states.params, i) for i in range(setup.config.seeds - 1)]
    record = {
        "hparams": result.hparams,
        "run": run,
        "guarantee": result.guarantee,
        "final_metrics": {
            k: float(np.asarray(v)[-1]) for k, v in result.metrics.items() if np.ndim(v) == 1
        },
    }
    return method, params, wall, record


def run_lm_benchmark(
    config: LMBenchConfig,
    *,
    progress: Callable[[str], None] = print,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs the LM benchmark and returns a JSON-ready record (``rows``, ``config``, ...).

    ``on_row(row)``, if given, is called with each row as soon as it is evaluated (a long run can
    save what it has).

    Raises:
      ValueError: a bad configuration (naming the field), before any training.
    """
    config.validate()
    names = config.method_names()
    started = time.perf_counter()
    setup = _Setup(config, progress)
    seeds = config.seeds
    progress("evaluating the oracles and the full models")
    originals = [_index(setup.originals.params, s) for s in range(seeds)]
    rows = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    add(_row("retrain", setup.evaluate(setup.oracle_params, oracles=True), setup.model_time, None))
    add(_row("original", setup.evaluate(originals), None, None))
    methods_record = {}
    for i, name in enumerate(names):
        cell = _settings_cell(name)
        progress(f"[{i + 1}/{len(names)}] {name} ({cell})")
        try:
            _, params, wall, record = _run_method(setup, name, jax.random.key(100 + i))
        except FloatingPointError as error:
            progress(f"  {name} failed: {error}")
            methods_record[name] = {"error": str(error)}
            add({"method": name, "error": str(error), "settings": cell})
            continue
        add(_row(name, setup.evaluate(params), wall, cell))
        methods_record[name] = record
    original = rows[1]["mean"]
    return {
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "data": {
            "name": "facts",
            "forget_spec": setup.request.spec,
            "forget_authors": setup.data.forget_authors(config.fraction()).tolist(),
            "forget_size": len(setup.forget),
            "retain_size": len(setup.retain),
            "holdout_size": len(setup.eval.holdout),
            "world_size": len(setup.eval.world),
            "retain_eval_size": len(setup.retain_eval),
            "relearn_ids": setup.relearn_set.ids.tolist(),
            "seq_len": int(setup.data.train.x.shape[1]),
            "vocab_size": setup.data.tokenizer.vocab_size,
        },
        "model": {**models.model_config(setup.model), "num_params": _num_params(setup)},
        "training": {
            "optimizer": f"adamw(warmup {config.warmup_steps}, cosine to lr/10, "
            f"weight_decay {config.weight_decay})",
            "learning_rate": config.learning_rate,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "models_trained": 2 * config.seeds + (config.seeds == 1),
            "wall_time_s": setup.train_time,
            "retrain_wall_time_s": setup.model_time,
            "final_loss": np.asarray(setup.train_history["loss"])[:, -1].tolist(),
            "answered": {
                "forget": original["forget/answered"],
                "retain": original["retain/answered"],
                "threshold_rouge_l_recall": FIT_ROUGE,
            },
        },
        "reference": "the oracle of seed (s + 1) mod S for seed s (one more oracle when S = 1)",
        "relearn": {
            "examples": len(setup.relearn_set),
            "held_out": len(setup.relearn_held),
            "steps": config.relearn_steps,
            "learning_rate": config.relearn_lr,
            "optimizer": "adamw(weight_decay=0.01), full batch",
        },
        "rows": rows,
        "methods": methods_record,
        "wall_time_s": time.perf_counter() - started,
    }


def _num_params(setup: _Setup) -> int:
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(setup.oracle_params[0])))


def _versions() -> dict[str, str]:
    import platform

    import flax

    import unlearn_jax

    return {
        "unlearn_jax": unlearn_jax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
    }


# ---- output -------------------------------------------------------------------------------------
def _footer(record: dict[str, Any]) -> list[str]:
    cfg, data, tr = record["config"], record["data"], record["training"]
    answered = tr["answered"]
    return [
        f"{data['forget_spec']}: {data['forget_size']} forget pairs "
        f"({len(data['forget_authors'])} authors), {data['retain_size']} retain pairs; "
        f"{cfg['model']} ({record['model']['num_params']} parameters), {cfg['seeds']} seeds: "
        "every number is the mean over seeds (per-seed values and standard deviations in "
        "results.json).",
        f"The full models answer {100 * answered['forget']:.0f}% of forget and "
        f"{100 * answered['retain']:.0f}% of retain questions with ROUGE-L recall >= "
        f"{answered['threshold_rouge_l_recall']:g}.",
        "forget_quality: KS-test p-value of the forget truth ratios against the oracle of another "
        "seed (the retrain row: independent oracles, the noise floor); model_utility: harmonic "
        "mean of probability, ROUGE-L recall and truth-ratio score on retain authors and world "
        "facts; forget/retain_rouge: ROUGE-L recall of greedy answers; privleak: MUSE's relative "
        f"{cfg['mia_score']} forget-vs-holdout AUC gap to the reference oracle (0: like it, -1: "
        "the forget set fully recognised); relearn: forget ROUGE-L recall on the "
        f"{record['relearn']['held_out']} held-out forget questions after "
        f"{record['relearn']['steps']} AdamW steps on {record['relearn']['examples']} others; "
        "time_s: seed 0's unlearning (retrain: one model's share of the joint training), "
        "compilation included.",
    ]


def format_lm_table(record: dict[str, Any]) -> str:
    """The table ``unlearn-jax bench --data facts`` prints, with a footer on its columns."""
    table = evaluation.format_table(
        record["rows"], columns=TABLE_COLUMNS, formats=COLUMN_FORMATS, float_format=".3f"
    )
    footer = [textwrap.fill(line, FOOTER_WIDTH, subsequent_indent="  ") for line in _footer(record)]
    return "\n".join([table, "", *footer])


def plot_forget_quality_vs_utility(rows, path) -> None:
    """Model utility (x) against log10 forget quality (y): each seed a dot, each row's mean a
    labelled marker (the view of the NPO and TOFU papers' trade-off figures)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(r for r in rows if "error" not in r):
        color = f"C{i % 10}"
        seeds = row["per_seed"]
        ax.scatter(
            [m["model_utility"] for m in seeds],
            [np.log10(max(m["forget_quality"], 1e-300)) for m in seeds],
            color=color, alpha=0.35, s=14,
        )  # fmt: skip
        ax.scatter(
            row["model_utility"], np.log10(max(row["forget_quality"], 1e-300)), color=color,
            marker="D", s=40, label=row["method"],
        )  # fmt: skip
    ax.set_xlabel("model utility")
    ax.set_ylabel("log10 forget quality")
    ax.set_title("Forget quality vs model utility (higher is better on both)")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def write_lm_outputs(record: dict[str, Any], out_dir) -> dict[str, str]:
    """Writes ``results.json``, ``table.txt``, ``fq_vs_utility.png`` and ``relearn.png``."""
    import pathlib

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.json",
        "table": out / "table.txt",
        "tradeoff_plot": out / "fq_vs_utility.png",
        "relearn_plot": out / "relearn.png",
    }
    evaluation.write_json(paths["results"], record)
    paths["table"].write_text(format_lm_table(record) + "\n")
    rows = [r for r in record["rows"] if "error" not in r]
    plot_forget_quality_vs_utility(rows, paths["tradeoff_plot"])
    _plot_relearn(rows, paths["relearn_plot"])
    return {k: str(v) for k, v in paths.items()}


def _plot_relearn(rows, path) -> None:
    """Held-out forget ROUGE-L recall before and after the relearning attack, per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    before = [r["mean"]["relearn/rouge_before"] for r in rows]
    after = [r["mean"]["relearn/rouge_after"] for r in rows]
    ax.bar(x - 0.2, before, 0.4, label="before the attack")
    ax.bar(x + 0.2, after, 0.4, label="after the attack")
    ax.set_xticks(x)
    ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("held-out forget ROUGE-L recall")
    ax.set_title("Relearning attack")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


__all__ = [
    "LMBenchConfig",
    "format_lm_table",
    "refusal_answers",
    "relearning_attack",
    "run_lm_benchmark",
    "training_optimizer",
    "write_lm_outputs",
]
