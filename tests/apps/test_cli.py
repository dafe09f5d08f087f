"""End-to-end runs of the command-line tool on tiny configurations, and every bad input named.

The bad-input tests fail before any training (arguments are checked first), so they are cheap; the
checkpoint-related ones share one tiny trained checkpoint per module, copied where a test damages it.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import optax
import pytest

from unlearn_jax import checkpoint, data
from unlearn_jax.apps import cli
from unlearn_jax.models import get_model, model_config
from unlearn_jax.training import create_train_state


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny checkpoint for the module: a linear model, one epoch on digits."""
    out = tmp_path_factory.mktemp("trained") / "model"
    assert (
        cli.main(["train", "--model", "linear", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    )
    return out


def _run(argv, capfd):
    """(exit status, stdout, stderr) of one command, argparse's exits included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


def _snapshot(directory: pathlib.Path) -> dict:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_train_unlearn_evaluate_verify_keep_a_ledger(tmp_path, trained, capfd):
    after, again = tmp_path / "unlearned", tmp_path / "again"
    ids = data.load("digits").train.ids[:5]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(str(i) for i in ids))
    before = checkpoint.verify_checkpoint(trained).digest
    code, _, err = _run([
        "unlearn", "--checkpoint", trained, "--forget-ids", ids_file, "--method", "finetune",
        "--set", "steps=2", "--record-ids", "--request-id", "ticket-7", "--out", after, "--quiet",
    ], capfd)  # fmt: skip
    assert code == 0, err
    code, out, _ = _run(["evaluate", "--checkpoint", after], capfd)
    assert code == 0
    metrics = json.loads(out)
    assert metrics["deletions"] == 1 and metrics["forget_spec"].startswith("ids:5@")
    report = checkpoint.verify_checkpoint(after)
    (record,) = report.ledger
    assert record.request_id == "ticket-7" and record.ids == tuple(sorted(ids.tolist()))
    assert record.forget_ids_hash == data.forget_ids_hash(ids) and record.count == 5
    assert record.method == "finetune" and record.config["steps"] == 2
    assert record.guarantee == "approximate" and record.epsilon is None
    assert record.checkpoint_before == before and record.checkpoint_after == report.digest
    assert set(record.metrics) >= {"UA", "RA", "TA", "MIA-Efficacy", "wall_time_s"}
    assert metrics["ledger_head"] == record.hash == report.ledger.head_hash
    code, out, _ = _run(["verify", "--checkpoint", after, "--anchor", record.hash], capfd)
    assert code == 0
    assert f"ledger: 1 request(s) (approximate), hash chain intact, head {record.hash}" in out
    # Asking to delete the same ids again is refused, naming the earlier request; nothing trains.
    code, _, err = _run([
        "unlearn", "--checkpoint", after, "--forget-ids", ids_file, "--method", "ssd",
        "--out", again,
    ], capfd)  # fmt: skip
    assert code == 2 and "deleted by an earlier request" in err and not again.exists()


def test_ids_stay_out_of_the_ledger_unless_asked_for(tmp_path, trained, capfd):
    first, second = tmp_path / "first", tmp_path / "second"
    train = data.load("digits").train
    # A spec the ledger can re-derive: class 3, not recorded.
    code, _, err = _run([
        "unlearn", "--checkpoint", trained, "--forget", "class:3", "--method", "finetune",
        "--set", "steps=1", "--out", first, "--quiet",
    ], capfd)  # fmt: skip
    assert code == 0, err
    (record,) = checkpoint.read_ledger(first)
    class3 = train.ids[train.y == 3]
    assert record.ids is None and record.count == class3.size and record.forget_spec == "class:3"
    assert record.forget_ids_hash == data.forget_ids_hash(class3)
    (step,) = first.iterdir()
    assert json.loads((step / "ledger.json").read_text())["records"][0]["ids"] is None
    code, out, _ = _run(["evaluate", "--checkpoint", first], capfd)  # re-derived, hash checked
    assert code == 0 and json.loads(out)["forget_spec"] == data.ids_forget(train, class3).spec
    # Explicit ids, not recorded: the next request chains on, but what it removed is unknown.
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps({"ids": train.ids[train.y == 4][:3].tolist()}))
    code, _, err = _run([
        "unlearn", "--checkpoint", first, "--forget-ids", ids_file, "--method", "finetune",
        "--set", "steps=1", "--out", second, "--quiet",
    ], capfd)  # fmt: skip
    assert code == 0, err
    report = checkpoint.verify_checkpoint(second)
    one, two = report.ledger
    assert two.ids is None and two.count == 3 and two.previous == one.hash
    assert two.checkpoint_before == one.checkpoint_after and report.gaps == ()
    code, _, err = _run(["evaluate", "--checkpoint", second], capfd)
    assert code == 2 and "ledger request 1 ('request-1', ids:3@" in err
    assert "recorded only the SHA-256 of its ids" in err and err.count("\n") == 1


# ---- every bad input: one line that names the value, exit status 2, nothing changed -------------------
def _unwritable(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory path this user may not create (root ignores file modes: use sysfs then)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() != 0:
        return locked / "out"
    return pathlib.Path("/sys/unlearn-jax-test/out")


def _bad_checkpoint(tmp_path, model, data_name):
    """A checkpoint whose metadata names a data set its model does not fit (saved by the library)."""
    x = (
        data.load(data_name).train.x[:1]
        if model.__class__.__name__ != "CNN"
        else np.zeros((1, 8, 8, 1), np.float32)
    )
    abstract = jax.eval_shape(
        lambda k: create_train_state(model, x, optax.adam(1e-3), k), jax.random.key(0)
    )
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    meta = {"model": model_config(model), "data": data_name,
            "optimizer": {"name": "adam", "learning_rate": 1e-3}}  # fmt: skip
    out = tmp_path / f"bad-{data_name}"
    checkpoint.save_checkpoint(out, state, meta)
    return out


def _case(name, tmp_path, trained):
    """(argv, what stderr must name) of one bad input."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    binary = tmp_path / "ids.bin"
    binary.write_bytes(b"\x00\xff\xfe\x01ids")
    huge = tmp_path / "huge.txt"
    huge.write_text("1\n99999999999999999999\n")
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    base = ["unlearn", "--checkpoint", trained, "--method", "finetune"]
    cases = {
        "out is a file": (["train", "--out", a_file], f"--out {a_file} is a file"),
        "out under a file": (["train", "--out", a_file / "sub"], f"lies under {a_file}"),
        "out not writable": (["train", "--out", _unwritable(tmp_path)], "cannot be written"),
        "out not empty": (["train", "--out", tmp_path], "never overwritten"),
        "out inside the source": (
            [*base, "--forget", "class:3", "--out", trained / "7"],
            "lies inside the checkpoint being read",
        ),
        "out inside another checkpoint": (
            ["train", "--out", trained / "sub" / "x"],
            "lies inside the checkpoint directory",
        ),
        "checkpoint is a file": (
            ["evaluate", "--checkpoint", a_file],
            "is a file, not a checkpoint directory",
        ),
        "checkpoint missing": (
            ["evaluate", "--checkpoint", tmp_path / "nothing"],
            "no checkpoint directory",
        ),
        "ids file is a directory": ([*base, "--forget-ids", tmp_path], "is a directory"),
        "ids file is binary": ([*base, "--forget-ids", binary], "is not a text file (byte 0xff"),
        "ids file missing": ([*base, "--forget-ids", tmp_path / "no.txt"], "does not exist"),
        "id beyond int64": (
            [*base, "--forget-ids", huge],
            "holds 99999999999999999999, outside the id range",
        ),
        "ids and spec together": (
            [*base, "--forget-ids", ids, "--forget", "class:3"],
            "argument --forget: not allowed with argument --forget-ids",
        ),
        "no forget set": (base, "give the examples to forget"),
        "bad --set": ([*base, "--forget", "class:3", "--set", "epochs"], "KEY=VALUE, got 'epochs'"),
        "unknown method": (
            ["unlearn", "--checkpoint", trained, "--method", "nope", "--forget", "class:3"],
            "unknown method 'nope'",
        ),
        "tfds not available": (["train", "--data", "tfds:mnist"], "--data 'tfds:mnist' cannot"),
        "lr nan": (
            ["train", "--lr", "nan"],
            "argument --lr: expected a finite number > 0, got 'nan'",
        ),
        "lr inf": (["train", "--lr", "inf"], "got 'inf'"),
        "lr zero": (["train", "--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
        "lr negative": (["bench", "--lr", "-0.001"], "got '-0.001'"),
        "epochs zero": (["train", "--epochs", "0"], "argument --epochs: expected an integer >= 1"),
        "shadows negative": (
            ["bench", "--shadows", "-1"],
            "argument --shadows: expected an integer >= 0, got '-1'",
        ),
        "seeds not a number": (["bench", "--seeds", "many"], "got 'many'"),
        "bench model does not fit the data": (
            ["bench", "--model", "cnn", "--data", "synthetic", "--methods", "finetune"],
            "model 'cnn' (--model) cannot take the inputs of data 'synthetic'",
        ),
        "bench bad forget spec": (["bench", "--forget", "klass:3"], "expected one of"),
        "labels beyond the model's outputs": (
            lambda: [
                "evaluate",
                "--checkpoint",
                _bad_checkpoint(tmp_path, get_model("linear", num_outputs=3), "digits"),
            ],
            "class labels up to 9, but model 'linear'",
        ),
        "inputs of the wrong shape": (
            lambda: [
                "evaluate",
                "--checkpoint",
                _bad_checkpoint(tmp_path, get_model("cnn", num_outputs=4), "synthetic"),
            ],
            "cannot take the inputs of data 'synthetic' (one example has shape (16,))",
        ),
        "bench unknown method": (["bench", "--methods", "npo,nope"], "unknown method 'nope'"),
        # Fails after --out was made (in the trainer's own checks): the new directories go again.
        "classifier on regression data": (
            ["train", "--data", "diabetes"],
            "model 'mlp' (--model) is a classification model, but",
        ),
        "unknown data": (["bench", "--data", "cifar", "--methods", "npo"], "'digits'"),
    }
    argv, expected = cases[name]
    return (argv() if callable(argv) else argv), expected


CASES = [
    "out is a file", "out under a file", "out not writable", "out not empty",
    "out inside the source", "out inside another checkpoint", "checkpoint is a file",
    "checkpoint missing", "ids file is a directory", "ids file is binary", "ids file missing",
    "id beyond int64", "ids and spec together", "no forget set", "bad --set", "unknown method",
    "tfds not available", "lr nan", "lr inf", "lr zero", "lr negative", "epochs zero",
    "shadows negative", "seeds not a number", "bench model does not fit the data",
    "bench bad forget spec", "labels beyond the model's outputs", "inputs of the wrong shape",
    "bench unknown method", "unknown data", "classifier on regression data",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_naming_it(case, tmp_path, trained, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out would land here
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no-tfds-data"))
    argv, expected = _case(case, tmp_path, trained)
    untouched = _snapshot(trained)
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(argv, capfd)
    assert code == 2, (out, err)
    assert expected in err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err
    # Nothing changed: the trained checkpoint is byte for byte the same, no directory was left.
    assert _snapshot(trained) == untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.mark.parametrize(
    "damage, item",
    [
        ("truncate", "has {n} bytes"),
        ("delete", "is missing"),
        ("metadata", "metadata.json was altered"),
        ("ledger", "ledger.json was altered"),
    ],
)
def test_a_damaged_checkpoint_is_refused_and_verify_names_the_damage(
    damage, item, tmp_path, trained, capfd
):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    step = next(copy.iterdir())
    array = sorted(p for p in (step / "state").rglob("*") if p.parent.name == "d")[-1]
    if damage == "truncate":
        array.write_bytes(array.read_bytes()[:7])
        item = item.format(n=7)
    elif damage == "delete":
        array.unlink()
    elif damage == "metadata":  # relu -> tanh would be another model
        meta = json.loads((step / "metadata.json").read_text())
        meta["model"]["activation"] = "tanh"
        (step / "metadata.json").write_text(json.dumps(meta))
    else:
        (step / "ledger.json").write_text('{"format": "unlearn_jax.ledger/1", "records": []}\n ')
    unlearn = ["unlearn", "--method", "finetune", "--forget", "class:3", "--out", tmp_path / "x"]
    for command in (["evaluate"], unlearn):
        code, _, err = _run([*command, "--checkpoint", copy], capfd)
        assert code == 2 and item in err and "does not verify" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err and "Exception" not in err
    code, out, err = _run(["verify", "--checkpoint", copy], capfd)
    assert code == 1 and out == "" and item in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_a_command_failing_after_making_its_output_directory_removes_it(
    tmp_path, capfd, monkeypatch
):
    from unlearn_jax import training

    def fail(*args, **kwargs):
        raise ValueError("training failed (simulated)")

    monkeypatch.setattr(training, "train_original", fail)
    out = tmp_path / "new" / "deeper"
    code, _, err = _run(["train", "--model", "linear", "--out", out], capfd)
    assert code == 2 and "simulated" in err
    assert list(tmp_path.iterdir()) == []  # both directories it made are gone


def test_help_lists_every_command(capfd):
    code, out, _ = _run(["--help"], capfd)
    assert code == 0
    for command in ("bench", "train", "unlearn", "evaluate", "verify"):
        assert command in out
    code, out, _ = _run(["unlearn", "--help"], capfd)
    assert "--record-ids" in out and "--request-id" in out


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
