"""End-to-end runs of the command-line tool on tiny configurations."""

import json

import numpy as np
import pytest

from unlearn_jax import data
from unlearn_jax.apps import cli


def test_bench_writes_results_json_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main([
        "bench", "--model", "linear", "--seeds", "2", "--epochs", "2", "--forget", "class:3",
        "--methods", "finetune,ssd", "--shadows", "2", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "retrain" in printed and "ssd" in printed and "speedup" in printed
    record = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in record["rows"]}
    assert list(rows) == ["retrain", "original", "finetune", "ssd"]
    for row in rows.values():
        for key in ("UA", "RA", "TA", "MIA-Efficacy"):
            assert 0.0 <= row[key] <= 100.0
        assert 0.0 <= row["LiRA-AUC"] <= 1.0
    # The retrained model never saw class 3; the original did. Forget = the whole class.
    train = data.load("digits").train
    assert record["data"]["forget_size"] == int(np.sum(train.y == 3))
    assert record["data"]["forget_ids_hash"] == data.forget_ids_hash(train.ids[train.y == 3])
    assert rows["retrain"]["UA"] > 90.0 > rows["original"]["UA"]
    # Gap to retrain is the mean absolute difference over the four table metrics.
    orig, ret = rows["original"], rows["retrain"]
    want = np.mean([abs(orig[k] - ret[k]) for k in ("UA", "RA", "TA", "MIA-Efficacy")])
    assert orig["avg_gap"] == pytest.approx(want)
    # Reproducibility: the full configuration and versions are recorded.
    assert record["config"]["methods"] == ["finetune", "ssd"]
    assert record["methods"]["finetune"]["run"] == {"epochs": 2, "batch_size": 64}
    assert record["methods"]["ssd"]["hparams"]["alpha"] == 5.0
    assert "jax" in record["versions"]
    for name in ("table.txt", "gap_to_retrain.png", "mia_roc.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "mia_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_unlearn_evaluate_keeps_a_deletion_record(tmp_path, capsys):
    ckpt, after = tmp_path / "model", tmp_path / "unlearned"
    assert (
        cli.main(["train", "--model", "linear", "--epochs", "2", "--out", str(ckpt), "--quiet"])
        == 0
    )
    ids = data.load("digits").train.ids[:5]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(str(i) for i in ids))
    code = cli.main([
        "unlearn", "--checkpoint", str(ckpt), "--forget-ids", str(ids_file), "--method", "finetune",
        "--set", "epochs=1", "--out", str(after), "--quiet",
    ])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(after)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["deletions"] == 1
    assert metrics["forget_spec"].startswith("ids:5@")
    from unlearn_jax.checkpoint import read_metadata

    record = read_metadata(after)["deletions"]
    assert [d["ids"] for d in record] == [ids.tolist()]
    assert record[0]["method"] == "finetune" and record[0]["hparams"]["epochs"] == 1
    # Asking to delete the same ids again is refused, naming the earlier request.
    again = cli.main([
        "unlearn", "--checkpoint", str(after), "--forget-ids", str(ids_file), "--method", "ssd",
        "--out", str(tmp_path / "again"),
    ])  # fmt: skip
    assert again == 2
    assert "deleted by an earlier request" in capsys.readouterr().err


def test_bad_input_names_the_problem(tmp_path, capsys):
    assert cli.main(["bench", "--methods", "npo,nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert (
        cli.main(["bench", "--data", "cifar", "--methods", "npo", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "digits" in capsys.readouterr().err  # lists the valid data sets
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="never overwritten"):
        cli.main(["bench", "--methods", "npo", "--out", str(existing)])
    assert (existing / "results.json").read_text() == "{}"
    assert (
        cli.main(["bench", "--forget", "klass:3", "--methods", "npo", "--out", str(tmp_path / "z")])
        == 2
    )
    assert "expected one of" in capsys.readouterr().err
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_sweep_keeps_the_setting_with_the_smallest_validation_gap(tmp_path):
    out = tmp_path / "sweep"
    code = cli.main([
        "bench", "--model", "linear", "--seeds", "2", "--shadows", "0", "--epochs", "2",
        "--forget", "random:0.1", "--methods", "gradient_ascent", "--sweep", "--out", str(out),
        "--quiet",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    sweep = record["methods"]["gradient_ascent"]["sweep"]
    trials = sweep["trials"]
    assert [t["overrides"]["steps"] for t in trials] == sweep["grid"]["steps"]
    best = min(trials, key=lambda t: t["avg_gap"])
    assert sweep["best"] == best["overrides"]
    # The final row ran with the chosen setting, on a forget set other than the validation one.
    assert record["methods"]["gradient_ascent"]["run"]["steps"] == best["overrides"]["steps"]
    assert sweep["validation_forget"] != record["data"]["forget_spec"]
    assert "LiRA-AUC" not in record["rows"][0] or record["rows"][0]["LiRA-AUC"] is None
