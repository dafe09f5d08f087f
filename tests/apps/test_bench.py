"""The bench's table logic and the registry's per-scenario settings, without training a model.

End-to-end runs of ``unlearn-jax bench`` are in ``test_cli.py``; here the pieces are checked on
hand-made inputs: which settings a scenario selects, when the KLoM and challenge columns are shown
and what the footer says, and that the distributional metrics compare a row's models with the
reference oracles (identical models: KLoM 0 and a challenge score of exactly 1).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unlearn_jax import data, evaluation, models
from unlearn_jax.apps import bench, registry


# ---- registry: per-scenario settings ------------------------------------------------------------
@pytest.mark.parametrize(
    "scenario, kind",
    [
        ("class:3", "class"),
        (" Class:7 ", "class"),
        ("random:0.1", "random"),
        ("random:0.1@seed2", "random"),
        ("random", "random"),
        ("ids:1,2,3", None),
        ("ids:/tmp/forget.txt", None),
        (None, None),
    ],
)
def test_scenario_kind(scenario, kind):
    assert registry.scenario_kind(scenario) == kind


def test_scenario_kind_rejects_a_non_string():
    with pytest.raises(ValueError, match="scenario must be a forget spec"):
        registry.scenario_kind(3)


def test_ssd_settings_follow_the_scenario_and_explicit_overrides_win():
    def alpha_lam(**kwargs):
        method, run = registry.build("ssd", **kwargs)
        assert run == {}  # one-shot
        return method.hparams["alpha"], method.hparams["lam"]

    assert alpha_lam(scenario="class:3") == (5.0, 0.1)
    assert alpha_lam(scenario="random:0.1") == (8.0, 1.0)
    # A forget set of unknown kind, or no scenario: the base, which is the random setting.
    assert alpha_lam(scenario="ids:1,2") == (8.0, 1.0)
    assert alpha_lam() == (8.0, 1.0)
    assert alpha_lam(scenario="class:3", lam=0.5) == (5.0, 0.5)


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_every_per_kind_setting_builds(name):
    spec = registry.METHODS[name]
    assert set(spec.kinds) <= set(registry.SCENARIOS)
    for kind in registry.SCENARIOS:
        method, run = registry.build(name, scenario=kind)
        for key, value in spec.kinds.get(kind, {}).items():
            assert (run[key] if key in registry.RUN_KEYS else method.hparams[key]) == value


def test_resolve_layers_run_keys_and_refuses_steps_for_one_shot_methods():
    hparams, run = registry.resolve("npo", scenario="class:3", steps=7)
    assert run == {"steps": 7, "batch_size": 64}  # steps replaces the default epochs
    assert hparams == registry.METHODS["npo"].hparams
    with pytest.raises(ValueError, match="ssd is one-shot: it takes no steps"):
        registry.resolve("ssd", steps=3)


def test_settings_cell_names_the_tuned_values_and_their_source():
    cell = bench._settings("ssd", "class:3", {}, swept=False)
    assert cell["scenario"] == "class" and cell["source"] == "registry"
    assert cell["cell"] == "alpha=5,lam=0.1"
    swept = bench._settings("ssd", "random:0.1", {"alpha": 2.0}, swept=True)
    assert swept["source"] == "sweep" and swept["cell"] == "alpha=2,lam=1"
    assert bench._settings("finetune", "ids:1,2", {}, swept=False)["cell"] == "learning_rate=0.01"


# ---- matching methods: built from a MatchingContext, named explicitly -----------------------------
def test_matching_methods_need_a_context_and_stay_out_of_all():
    assert not set(registry.MATCHING_METHODS) & set(registry.METHODS)
    assert not set(registry.MATCHING_METHODS) & set(bench.BenchConfig().method_names())
    named = bench.BenchConfig(methods=("dmm", "npo", "oracle_matching"))
    assert named.method_names() == ["dmm", "npo", "oracle_matching"]
    with pytest.raises(ValueError, match=r"dmm matches targets.*unlearn-jax bench --methods dmm"):
        registry.build("dmm", scenario="class:3")
    with pytest.raises(ValueError, match=r"npo takes no \['context', 'forget'\]"):
        registry.build("npo", context=object(), forget=np.arange(3))
    # Matching's epochs is a hyper-parameter (the method fixes its run); steps is refused.
    hparams, run = registry.resolve("oracle_matching", epochs=3)
    assert hparams["epochs"] == 3 and run == {"batch_size": 128}
    with pytest.raises(ValueError, match="oracle_matching runs whole epochs: set epochs"):
        registry.resolve("oracle_matching", steps=3)


def test_the_command_line_passes_named_matching_methods_to_the_bench(monkeypatch, tmp_path):
    # The whole run costs the bench's training (about 20 s for the smallest configuration): the
    # matching rows' plumbing is the fake setup's test below; here the command line's part.
    from unlearn_jax.apps import cli

    seen = {}

    def run_benchmark(config, progress):
        seen["methods"] = config.method_names()
        raise SystemExit(0)

    monkeypatch.setattr(bench, "run_benchmark", run_benchmark)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "dmm,oracle_matching", "--out", str(tmp_path / "b")])
    assert seen["methods"] == ["dmm", "oracle_matching"]


# ---- when KLoM and the challenge score are shown ------------------------------------------------
def test_klom_column_is_shown_only_when_its_floor_is_at_most_half_the_originals():
    config = bench.BenchConfig(seeds=32)
    # The digits MLP on random:0.1 (p95 over forget examples): 32 models per side, then 16.
    shown = bench._klom_record(config, [{"KLoM95(f)": 2.96}, {"KLoM95(f)": 9.54}])
    assert shown["shown"] and shown["floor_value"] == 2.96 and shown["original_value"] == 9.54
    hidden = bench._klom_record(config, [{"KLoM95(f)": 5.94}, {"KLoM95(f)": 9.67}])
    assert not hidden["shown"] and "(5.94)" in hidden["reason"] and "(9.67)" in hidden["reason"]
    assert bench._klom_record(config, [{"KLoM95(f)": 5.0}, {"KLoM95(f)": 10.0}])["shown"]
    assert hidden["direction"] == "unlearned||oracle" and hidden["models_per_side"] == 32


def _record(*, klom_shown, challenge_shown, direction="unlearned||oracle", used=64, sweep=False):
    row = {"method": "retrain", "UA": 5.0, "RA": 99.9, "TA": 95.6, "MIA-Efficacy": 14.6,
           "avg_gap": 0.0, "KLoM95(f)": 2.96, "challenge": 0.151, "relearn": 91.0,
           "time_s": 3.5, "speedup": 1.0, "settings": None}  # fmt: skip
    method = {**row, "method": "ssd", "KLoM95(f)": 7.25, "settings": "alpha=8,lam=1"}
    challenge_record = {
        "shown": challenge_shown, "models_per_side": 32, "forget_examples": used,
        "forget_examples_total": 144, "last_bucket": 7.0, "bin_width": 0.5,
        "reason": "with 2 models per side no epsilon earns points",
    }  # fmt: skip
    return {
        "rows": [row, method],
        "config": {"sweep": sweep},
        "data": {"forget_size": 144, "scenario": "random"},
        "klom": {
            "shown": klom_shown,
            "direction": direction,
            "models_per_side": 32,
            "original_value": 9.54,
            "reason": "the floor is too high",
        },
        "challenge": challenge_record,
    }


def _header(table: str) -> list[str]:
    return table.splitlines()[0].split()


def test_table_hides_uninformative_columns_and_says_why():
    table = bench.format_results_table(_record(klom_shown=False, challenge_shown=False))
    assert "KLoM95(f)" not in _header(table) and "challenge" not in _header(table)
    assert "KLoM not shown (unlearned||oracle, in results.json): the floor is too high." in table
    assert "challenge not shown: with 2 models per side no epsilon earns points." in table
    assert all(len(line) <= bench.FOOTER_WIDTH for line in table.split("\n\n")[1].splitlines())


def test_table_footer_states_direction_models_last_bucket_subsample_and_settings():
    record = _record(klom_shown=True, challenge_shown=True, direction="oracle||unlearned")
    table = bench.format_results_table(record)
    header = _header(table)
    assert header.index("KLoM95(f)") + 1 == header.index("challenge")
    assert header[-1] == "settings" and "alpha=8,lam=1" in table
    footer = " ".join(table.split("\n\n")[1].split())  # undo the wrapping
    assert "KL(oracle || unlearned)" in footer and "32 models per side" in footer
    assert "original: 9.54" in footer
    # 32 models: last bucket 2 ceil(ln 31) - 1 = 7, so epsilon >= 8 * 0.5 = 4 earns nothing.
    assert "last bucket 7 (epsilon >= 4 earns nothing)" in footer
    assert "64 of 144 forget examples" in footer
    assert "the registry's for random forgetting" in footer
    everything = bench.format_results_table({**_record(klom_shown=True, challenge_shown=True,
                                                       used=144, sweep=True)})  # fmt: skip
    assert "all 144 forget examples" in " ".join(everything.split())
    assert "chosen per method by --sweep" in " ".join(everything.split())


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("klom_direction", "oracle|unlearned", "klom_direction"),
        ("challenge_examples", -1, "challenge_examples=-1 must be >= 0"),
        ("seeds", 0, "seeds"),
    ],
)
def test_bad_benchmark_settings_fail_before_any_training(field, value, match):
    config = bench.BenchConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        bench.run_benchmark(config, progress=lambda message: pytest.fail(message))


# ---- the distributional metrics compare with the reference oracles ------------------------------
NUM_CLASSES = 3
SETS = ("forget", "retain", "test")


TEACHER = np.random.default_rng(7).normal(0, 2, (4, NUM_CLASSES))


def _dataset(n, seed, name, start):
    """Labels from a linear teacher, so that models near it are accurate."""
    x = np.random.default_rng(seed).normal(size=(n, 4))
    return data.Dataset(x=x, y=np.argmax(x @ TEACHER, axis=1), ids=np.arange(start, start + n),
                        name=name, num_classes=NUM_CLASSES)  # fmt: skip


@pytest.fixture(scope="module")
def fake_setup():
    """A ``_Setup`` whose 3 'reference oracles' are noisy copies of a linear teacher (untrained)."""
    model = models.get_model("linear", num_outputs=NUM_CLASSES)
    rng = np.random.default_rng(0)
    params = {  # the Linear model's parameters, stacked over 3 models: the teacher plus noise
        "head": {
            "kernel": jnp.asarray(TEACHER + rng.normal(0, 1, (3, 4, NUM_CLASSES)), jnp.float32),
            "bias": jnp.asarray(rng.normal(0, 0.5, (3, NUM_CLASSES)), jnp.float32),
        }
    }
    # One size for all three sets: the bench's stacked apply compiles once.
    forget, retain, test = (_dataset(12, s, name, 100 * s) for s, name in enumerate(SETS, 1))
    setup = object.__new__(bench._Setup)
    setup.config = bench.BenchConfig(seeds=3, challenge_examples=4)
    setup.task = models.model_task(model)
    setup.split = types.SimpleNamespace(forget=forget, retain=retain)
    setup.splits = types.SimpleNamespace(test=test)
    setup.eval_sets = {"forget": forget, "retain": retain, "test": test}
    setup.reference_params = params
    setup.reference_logits = {
        g: bench._logits(setup.task, params, d) for g, d in setup.eval_sets.items()
    }
    setup._challenge_setup()
    return setup, params


def _numpy_logits(tree, dataset):
    """``[3, N, C]`` logits of the stacked linear models: ``x W_m + b_m``, in numpy."""
    w, b = np.asarray(tree["head"]["kernel"]), np.asarray(tree["head"]["bias"])
    return np.einsum("nd,mdc->mnc", dataset.x, w) + b[:, None, :]


def test_challenge_subsample_is_fixed_sorted_and_recorded(fake_setup):
    setup, _ = fake_setup
    index = setup.challenge_index
    assert len(index) == 4 and len(set(index.tolist())) == 4
    assert np.all(np.diff(index) > 0) and index.max() < 12
    again = object.__new__(bench._Setup)
    vars(again).update({k: v for k, v in vars(setup).items() if k != "challenge_index"})
    again._challenge_setup()
    np.testing.assert_array_equal(again.challenge_index, index)


def test_models_identical_to_the_reference_score_klom_0_and_challenge_1(fake_setup):
    setup, params = fake_setup
    klom, scores = setup.distribution(params)
    for direction in ("unlearned||oracle", "oracle||unlearned"):
        for group in ("forget", "retain", "test"):
            assert klom[f"klom/{direction}/{group}/p95"] == 0.0
    # Identical samples: every attack has FNR = 1 - FPR, so epsilon 0, full points, ratios 1.
    assert scores["challenge/score"] == 1.0 and scores["challenge/epsilon_max"] == 0.0
    assert scores["challenge/last_bucket"] == 1.0  # 2 ceil(ln 2) - 1 for 3 models


def test_distribution_compares_with_the_reference_in_both_directions(fake_setup):
    setup, params = fake_setup
    # Model 0 becomes all zeros: constant logits, so it predicts class 0 everywhere.
    other = jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.concatenate([np.zeros_like(a[:1]), a[1:]])), params
    )
    klom, scores = setup.distribution(other)
    assert klom["klom/unlearned||oracle/forget/mean"] > 0.0 and scores["challenge/ra_ratio"] < 1.0

    forget, retain, test = setup.split.forget, setup.split.retain, setup.splits.test
    u, r = _numpy_logits(other, forget), _numpy_logits(params, forget)
    np.testing.assert_allclose(
        klom["klom/unlearned||oracle/forget/mean"],
        evaluation.klom(u, r, forget.y).mean(), rtol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(  # the other direction is the same KL with the sides swapped
        klom["klom/oracle||unlearned/forget/mean"],
        evaluation.klom(r, u, forget.y).mean(), rtol=1e-6,
    )  # fmt: skip

    def accuracies(logits, y):
        return np.array([np.mean(np.argmax(z, -1) == y) for z in logits])

    ra_r = accuracies(_numpy_logits(params, retain), retain.y)
    ta_r = accuracies(_numpy_logits(params, test), test.y)
    # Model 0 of the other stack scores the share of class 0; models 1 and 2 are the reference's.
    ra_u = (np.mean(retain.y == 0) + ra_r[1] + ra_r[2]) / 3
    ta_u = (np.mean(test.y == 0) + ta_r[1] + ta_r[2]) / 3
    assert scores["challenge/ra_ratio"] == pytest.approx(ra_u / ra_r.mean())
    assert scores["challenge/ta_ratio"] == pytest.approx(ta_u / ta_r.mean())
    idx = setup.challenge_index
    want = evaluation.challenge_score(
        evaluation.challenge_confidences(u[:, idx], forget.y[idx]),
        evaluation.challenge_confidences(r[:, idx], forget.y[idx]),
        ra_unlearned=ra_u, ra_retrained=ra_r, ta_unlearned=ta_u, ta_retrained=ta_r,
    )  # fmt: skip
    assert scores == pytest.approx(want)


def test_the_command_line_switches_on_the_persistent_compilation_cache(tmp_path, monkeypatch):
    import jax

    from unlearn_jax.apps import cli

    monkeypatch.setenv("UNLEARN_JAX_CACHE_DIR", str(tmp_path / "xla"))
    assert cli.default_cache_dir() == str(tmp_path / "xla")
    before = jax.config.jax_compilation_cache_dir
    try:
        cli.enable_compilation_cache(cli.default_cache_dir())
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert (tmp_path / "xla").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_matching_rows_take_om_targets_from_the_oracles_and_compute_dmm_scores_once(fake_setup):
    # The bench's plumbing on the hand-made setup: OM matches the mean logits of the oracles of
    # the originals' initialisations (never the reference ones); DMM's attribution is computed
    # once per run, and the many-model methods carry one target table per model.
    from unlearn_jax.training import TrainState

    base, reference = fake_setup
    setup = object.__new__(bench._Setup)
    vars(setup).update(vars(base))
    forget, retain = base.split.forget, base.split.retain
    train = data.Dataset(
        x=np.concatenate([forget.x, retain.x]), y=np.concatenate([forget.y, retain.y]),
        ids=np.concatenate([forget.ids, retain.ids]), name="train", num_classes=NUM_CLASSES,
    )  # fmt: skip
    setup.splits = types.SimpleNamespace(
        train=train, test=base.splits.test, num_classes=NUM_CLASSES
    )
    setup.config = bench.BenchConfig(seeds=3, forget="class:1")
    shift = {"head": {"kernel": 0.5, "bias": -0.25}}
    originals = jax.tree_util.tree_map(lambda a, s: a + s, reference, shift)
    setup.oracle_params = jax.tree_util.tree_map(lambda a, s: a - s, reference, shift)
    state = TrainState.create(apply_fn=None, params=originals, tx=optax.identity())
    setup.originals = state.replace(step=jnp.zeros(3, jnp.int32))  # stacked, as fit_many's
    setup.original0 = bench._index(setup.originals, 0)
    key = jax.random.key(0)

    method, run, result, _ = bench._run_method(setup, "oracle_matching", {}, key)
    table = method.feeds.statistics["targets"].value.value
    want = _numpy_logits(setup.oracle_params, train).mean(axis=0)  # ids already sorted
    assert table.outputs.shape == (3, 24, NUM_CLASSES) and run == {"batch_size": 128}
    np.testing.assert_allclose(table.outputs[2], want, rtol=1e-5, atol=1e-5)
    assert result.steps == 20  # 20 epochs of one step (12 forget examples, 128 rows)

    messages = []
    first = bench._attribution(setup, "dmm", messages.append)
    assert first["attribution_s"] > 0 and len(messages) == 1
    again = bench._attribution(setup, "dmm", messages.append)
    assert "attribution_s" not in again and len(messages) == 1  # computed once per run
    method, _, result, _ = bench._run_method(setup, "dmm", {}, key)
    table = method.feeds.statistics["targets"].value.value
    scores = np.asarray(setup.matching.scores.array)  # [24, 24, 3], rows in train's order
    assert scores.shape == (24, 24, NUM_CLASSES)
    np.testing.assert_allclose(table.outputs[1], scores[:12].sum(axis=0), rtol=1e-5, atol=1e-6)
    assert result.hparams["scale"] == 1.0
