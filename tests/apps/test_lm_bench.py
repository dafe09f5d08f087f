"""The LM benchmark's bookkeeping, its table and outputs, the relearning attack, the command line.

XLA takes seconds to compile each of a transformer's programs on a CPU, and a run compiles about
ten; so the run test replaces training, unlearning and the per-model statistics by fakes that tag
every model, and checks what the benchmark does with them: one ``fit_many`` for full models and
oracles (same keys, the forget pairs masked out of the oracles), the reference oracle of each seed,
the rows' means over seeds, the record and the files. The relearning attack runs for real on a toy
sequence model; the real table is experiments/lm_facts.py.
"""

import json
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unlearn_jax.apps import cli, lm_bench, lm_registry
from unlearn_jax.data.facts import generate_facts
from unlearn_jax.models import model_task
from unlearn_jax.training import TrainState

SMALL = dict(
    forget="authors:0.25", methods=("ga", "idkpo"), num_authors=4, num_holdout_authors=1,
    retain_eval=6, relearn_examples=2,
)  # fmt: skip


def _tagged(tags):
    """A stacked TrainState whose only parameter is a tag per model."""
    tags = jnp.asarray(tags, jnp.float32)
    return TrainState(
        step=jnp.zeros(tags.shape, jnp.int32), apply_fn=None, params={"tag": tags},
        tx=optax.identity(), opt_state=(),
    )  # fmt: skip


def _fake_statistics(self, params):
    t = float(params["tag"])
    rng = np.random.default_rng(int(t * 7) % 1000)
    n_f, n_r, n_w = len(self.eval.forget), len(self.retain_eval), len(self.eval.world)

    def qa(n, forget=False):
        out = {
            "prob": rng.uniform(0.1, 1, n), "rouge_l/recall": rng.uniform(0, 1, n),
            "truth_ratio": rng.uniform(0.1, 0.9, n), "choice_prob": rng.uniform(0.1, 1, n),
        }  # fmt: skip
        if forget:
            out["paraphrased_question/rouge_l/recall"] = rng.uniform(0, 1, n)
        return out

    holdout = len(self.eval.holdout)
    return {
        "tag": t, "forget": qa(n_f, True), "retain": qa(n_r), "world": qa(n_w),
        "mia/forget": {"min_k++": rng.normal(size=n_f)},
        "mia/holdout": {"min_k++": rng.normal(size=holdout)},
    }  # fmt: skip


def _fake_run(monkeypatch, config):
    calls = {"fit_many": [], "pairs": [], "unlearn": []}

    def fit_many(model, task, sample, optimizer, train, *, keys, member_masks, epochs, **kwargs):
        calls["fit_many"].append({"keys": keys, "masks": member_masks, "train": train})
        m = keys.shape[0]
        return _tagged(np.arange(m)), {"loss": np.ones((m, epochs))}

    def fake_unlearn(method, state, task, forget, retain, *, key, **run):
        calls["unlearn"].append((method.name, run))
        params = {"tag": state.params["tag"] + 100}
        return SimpleNamespace(
            state=SimpleNamespace(params=params), states=SimpleNamespace(params=params),
            hparams=dict(method.hparams), guarantee="approximate", metrics={"loss": np.zeros(3)},
        )  # fmt: skip

    original_metrics = lm_bench._Setup.metrics

    def metrics(self, stats, reference):
        calls["pairs"].append((stats["tag"], reference["tag"]))
        return original_metrics(self, stats, reference)

    relearn = {"relearn/rouge_before": 0.1, "relearn/rouge_after": 0.5,
               "relearn/prob_before": 0.0, "relearn/prob_after": 0.2}  # fmt: skip
    monkeypatch.setattr(lm_bench.training, "fit_many", fit_many)
    monkeypatch.setattr(lm_bench, "unlearn", fake_unlearn)
    monkeypatch.setattr(lm_bench, "unlearn_many", fake_unlearn)
    monkeypatch.setattr(lm_bench._Setup, "statistics", _fake_statistics)
    monkeypatch.setattr(lm_bench._Setup, "metrics", metrics)
    monkeypatch.setattr(lm_bench, "relearning_attack", lambda *a, **k: dict(relearn))
    calls["rows"] = []
    record = lm_bench.run_lm_benchmark(
        config, progress=lambda msg: None, on_row=calls["rows"].append
    )
    return record, calls


@pytest.mark.parametrize("seeds", [3, 1])
def test_run_trains_pairs_and_summarises_models_as_documented(monkeypatch, seeds, tmp_path):
    config = lm_bench.LMBenchConfig(seeds=seeds, **SMALL)
    record, calls = _fake_run(monkeypatch, config)
    # One fit_many: S full models, then the oracles from the same keys (plus a reference at S = 1).
    (fit,) = calls["fit_many"]
    oracles = seeds + (seeds == 1)
    assert fit["keys"].shape[0] == seeds + oracles
    keys = jax.random.key_data(fit["keys"])
    np.testing.assert_array_equal(keys[:seeds], keys[seeds : 2 * seeds])
    forget_ids = generate_facts(seed=0, num_authors=4, num_holdout_authors=1).forget_ids(0.25)
    in_forget = np.isin(fit["train"].ids, forget_ids)
    assert in_forget.sum() == 6
    assert fit["masks"][:seeds].all()
    np.testing.assert_array_equal(fit["masks"][seeds:], np.tile(~in_forget, (oracles, 1)))
    # Each model of seed s is compared with the oracle of seed (s + 1) mod S (tag S + that seed).
    reference = [seeds + (s + 1) % seeds for s in range(seeds)] if seeds > 1 else [2]
    pairs = calls["pairs"]
    oracle_tags = [seeds + s for s in range(seeds)]
    assert pairs[:seeds] == list(zip(oracle_tags, reference, strict=True))
    assert pairs[seeds : 2 * seeds] == list(zip(range(seeds), reference, strict=True))
    unlearned = [100.0 + s for s in range(seeds)]
    assert pairs[2 * seeds : 3 * seeds] == list(zip(unlearned, reference, strict=True))
    # Rows: means over the seeds' values; per-seed values and the methods' runs recorded.
    rows = {r["method"]: r for r in record["rows"]}
    assert list(rows) == ["retrain", "original", "ga", "idkpo"]
    assert [r["method"] for r in calls["rows"]] == list(rows)  # each row as soon as it is done
    for row in rows.values():
        assert len(row["per_seed"]) == seeds
        mu = [m["model_utility"] for m in row["per_seed"]]
        assert row["model_utility"] == pytest.approx(np.mean(mu))
        assert row["relearn"] == 0.5
    runs = 1 + (seeds > 1)  # seed 0 with unlearn, the others in one unlearn_many
    assert [c[0] for c in calls["unlearn"]] == ["ga"] * runs + ["idk_dpo"] * runs
    assert record["methods"]["idkpo"]["run"] == lm_registry.METHODS["idkpo"].run
    assert record["data"]["forget_size"] == 6 and record["relearn"]["held_out"] == 4
    assert rows["original"]["time_s"] is None and rows["ga"]["time_s"] >= 0
    if seeds == 1:  # the files do not depend on the number of seeds (plotting costs a second)
        return
    paths = lm_bench.write_lm_outputs(record, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["seeds"] == seeds
    for key in ("tradeoff_plot", "relearn_plot"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "table.txt").read_text()
    assert table.splitlines()[0].split()[:3] == ["method", "forget_quality", "model_utility"]
    assert "mean over seeds" in table


class _Bigram(nn.Module):
    num_outputs: int
    kind = "sequence"

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_outputs)(nn.Embed(self.num_outputs, 8)(x))


def test_relearning_attack_trains_on_the_relearn_set_and_scores_the_held_out_set():
    facts = generate_facts(seed=0, num_authors=2, num_holdout_authors=1)
    split = facts.split(0.5)
    model = _Bigram(facts.tokenizer.vocab_size)
    task = model_task(model)
    params = model.init(jax.random.key(0), facts.train.x[:1])["params"]
    qa = split.forget.qa
    out = lm_bench.relearning_attack(
        task, params, qa, qa, decode=facts.tokenizer.decode, steps=20, learning_rate=0.05,
        batch_size=8,
    )  # fmt: skip
    assert set(out) == {f"relearn/{m}_{w}" for m in ("rouge", "prob") for w in ("before", "after")}
    # Attacked on the very pairs it is scored on, the model's answers become far more likely.
    assert out["relearn/prob_after"] > out["relearn/prob_before"] + 0.1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("forget", "random:0.1", "authors:FRACTION"),
        ("forget", "authors:1.5", "authors:FRACTION"),
        ("methods", ("npo", "salun"), "LM method"),
        ("model", "mlp", "model"),
        ("seeds", 0, "seeds"),
        ("model_kwargs", {"depth": 3}, "depth"),
    ],
)
def test_bad_configurations_are_named_before_any_work(field, value, message):
    config = lm_bench.LMBenchConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_registry_builds_every_method_and_refusal_methods_need_answers():
    assert set(lm_registry.DEFAULT_METHODS) <= set(lm_registry.METHODS)
    for name in lm_registry.BASE:
        assert "sam_" + name in lm_registry.METHODS
    with pytest.raises(ValueError, match="pass answers="):
        lm_registry.build("idkpo")
    method, run = lm_registry.build("sam_npo", steps=3)
    assert method.name == "sam+npo" and run["steps"] == 3 and method.hparams["sam_rho"] > 0


def test_cli_facts_errors_are_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    for argv in (
        ["bench", "--data", "facts", "--forget", "class:3", "--out", str(out)],
        ["bench", "--data", "facts", "--sweep", "--out", str(out)],
        ["bench", "--data", "facts", "--methods", "salun", "--out", str(out)],
    ):
        assert cli.main(argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    assert not out.exists()
