"""Checkpoints: bit-identical round trips, each restore error, what verification catches (and what it
cannot), and writes that fail or are killed half way."""

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._training_setup import ADAM, BATCH, SGD, classification
from unlearn_jax import checkpoint
from unlearn_jax.checkpoint import (
    GENESIS,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVerificationError,
    Ledger,
    LedgerError,
    checkpoint_digest,
    latest_step,
    list_steps,
    read_ledger,
    read_metadata,
    restore_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from unlearn_jax.models import get_model, model_config, model_task
from unlearn_jax.training import create_train_state, fit

ROOT = pathlib.Path(__file__).resolve().parents[2]

# After a failed read of a corrupted file, tensorstore may call back into orbax's already closed
# event loop; pytest reports the resulting "Event loop is closed" as an unraisable exception during
# whichever test runs when it is collected. It is noise from orbax, not a failure of ours.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _data():
    return classification(n=24)


def _model(hidden=(8,)):
    return get_model("mlp", num_outputs=3, hidden_sizes=hidden)


def _state(hidden=(8,), opt=None, seed=0, trained=True):
    """A TrainState with non-trivial params and Adam moments (a few steps of training)."""
    model = _model(hidden)
    ds = _data()
    state = create_train_state(model, ds.x[:1], opt or ADAM, jax.random.key(seed))
    if trained:
        state, _ = fit(state, model_task(model), ds, epochs=1, batch_size=BATCH,
                       key=jax.random.key(seed + 1), progress=False)  # fmt: skip
    return state


def _assert_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _fresh_target(hidden=(8,), opt=None):
    """An abstract target (ShapeDtypeStruct leaves): the structure without compiling an init."""
    model, x = _model(hidden), np.zeros((1, 5), np.float32)
    return jax.eval_shape(lambda k: create_train_state(model, x, opt or ADAM, k), jax.random.key(9))


# ---- round trips ----------------------------------------------------------------------------------
def test_round_trip_is_bit_identical_and_keeps_metadata(tmp_path):
    state = _state()
    metadata = {
        "model": model_config(_model()),
        "dataset": "toy",
        "forget_ids_hash": "abc123",
        "method": "retrain",
        "metrics": {"test/acc": np.float32(0.75), "curve": np.array([1.0, 0.5])},
    }
    digest = checkpoint_digest(state, metadata)
    ledger = Ledger().append([4, 1], method="retrain", guarantee="exact", before="e" * 64,
                             after=digest, record_ids=True)  # fmt: skip
    path = save_checkpoint(tmp_path / "ckpt", state, metadata, ledger=ledger)
    assert path == tmp_path / "ckpt" / "3"  # 24 rows in batches of 8: step 3
    assert read_ledger(tmp_path / "ckpt") == ledger
    assert read_metadata(tmp_path / "ckpt") == {
        **metadata,
        "metrics": {"test/acc": 0.75, "curve": [1.0, 0.5]},
    }
    concrete_target = _state(trained=False, seed=99)
    restored, meta = restore_checkpoint(tmp_path / "ckpt", concrete_target)
    _assert_identical(restored.params, state.params)
    _assert_identical(restored.opt_state, state.opt_state)
    assert int(restored.step) == 3
    assert type(restored.opt_state) is type(state.opt_state)
    assert meta == {**metadata, "metrics": {"test/acc": 0.75, "curve": [1.0, 0.5]}}
    # An abstract target gives the same concrete arrays.
    from_abstract, _ = restore_checkpoint(tmp_path / "ckpt", _fresh_target())
    _assert_identical(from_abstract, restored)
    # The restored state trains on exactly like the original.
    ds, task = _data(), model_task(_model())
    a, _ = fit(state, task, ds, epochs=1, batch_size=BATCH, key=jax.random.key(5), progress=False)
    b, _ = fit(
        restored, task, ds, epochs=1, batch_size=BATCH, key=jax.random.key(5), progress=False
    )
    _assert_identical(a.params, b.params)


def test_steps_are_listed_and_the_latest_is_restored_by_default(tmp_path):
    states = {s: _state(seed=s).replace(step=s) for s in (5, 20, 10)}
    for s, st in states.items():
        save_checkpoint(tmp_path, st, {"step": s})
    assert list_steps(tmp_path) == [5, 10, 20]
    assert latest_step(tmp_path) == 20
    assert latest_step(tmp_path / "nothing") is None
    restored, meta = restore_checkpoint(tmp_path, _fresh_target())
    assert meta == {"step": 20}
    _assert_identical(restored.params, states[20].params)
    restored, meta = restore_checkpoint(tmp_path, _fresh_target(), step=5)
    assert meta == {"step": 5}
    _assert_identical(restored.params, states[5].params)


def test_stacked_states_round_trip(tmp_path):
    """A model axis on every leaf, as fit_many returns: needs an explicit step."""
    states = jax.tree.map(lambda *xs: jnp.stack(xs), _state(seed=0), _state(seed=1))
    with pytest.raises(ValueError, match=r"pass step= explicitly"):
        save_checkpoint(tmp_path, states, {})
    save_checkpoint(tmp_path, states, {"models": 2}, step=1)
    restored, _ = restore_checkpoint(tmp_path, states)
    _assert_identical(restored, states)


# ---- refusing to overwrite, and overwriting atomically ---------------------------------------------
def test_an_existing_checkpoint_is_never_silently_overwritten(tmp_path):
    first, second = _state(seed=0), _state(seed=1)
    save_checkpoint(tmp_path, first, {"which": "first"})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path, second, {"which": "second"})
    restored, meta = restore_checkpoint(tmp_path, _fresh_target())
    assert meta == {"which": "first"}
    _assert_identical(restored.params, first.params)

    save_checkpoint(tmp_path, second, {"which": "second"}, overwrite=True)
    restored, meta = restore_checkpoint(tmp_path, _fresh_target())
    assert meta == {"which": "second"}
    _assert_identical(restored.params, second.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]  # nothing left behind


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match=r"metrics/fn is a builtin_function_or_method"):
        save_checkpoint(tmp_path, _state(trained=False), {"metrics": {"fn": len}})
    with pytest.raises(TypeError, match="keys must be strings"):
        save_checkpoint(tmp_path, _state(trained=False), {1: "a"})
    assert list_steps(tmp_path) == []


# ---- restore errors --------------------------------------------------------------------------------
def test_restoring_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        restore_checkpoint(tmp_path / "absent", _fresh_target())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        restore_checkpoint(tmp_path / "empty", _fresh_target())
    save_checkpoint(tmp_path / "one", _state(), {})
    with pytest.raises(
        CheckpointNotFoundError, match=r"no checkpoint of step 7.*available steps: \[3\]"
    ):
        restore_checkpoint(tmp_path / "one", _fresh_target(), step=7)
    # FileNotFoundError callers keep working.
    with pytest.raises(FileNotFoundError):
        restore_checkpoint(tmp_path / "absent", _fresh_target())
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(
        CheckpointNotFoundError, match="a-file is a file, not a checkpoint directory"
    ):
        read_metadata(tmp_path / "a-file")
    # A directory named like a step but without a commit marker is not a checkpoint.
    (tmp_path / "old" / "12").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError, match=r"without a commit marker: \['12'\]"):
        read_metadata(tmp_path / "old")


def test_a_directory_named_like_a_step_is_not_taken_for_one(tmp_path):
    """Another checkpoint directory saved inside this one (``--out ckpt/7``) is not step 7."""
    save_checkpoint(tmp_path, _state(), {"which": "source"})
    save_checkpoint(tmp_path / "7", _state(seed=1), {"which": "nested"})
    assert list_steps(tmp_path) == [3]
    assert restore_checkpoint(tmp_path, _fresh_target())[1] == {"which": "source"}


def test_a_structure_mismatch_names_the_differing_paths(tmp_path):
    save_checkpoint(tmp_path, _state(), {})
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, _fresh_target(hidden=(16,)))
    message = str(info.value)
    assert "params/hidden_0/kernel: shape [5, 8] saved, [5, 16] in target" in message
    assert "params/head/kernel" in message and "params/head/bias" not in message

    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, _fresh_target(opt=SGD))
    message = str(info.value)
    assert "in the checkpoint but not in the target" in message
    assert "opt_state/0/mu/hidden_0/kernel" in message

    with pytest.raises(CheckpointMismatchError, match="in the target but not in the checkpoint"):
        restore_checkpoint(tmp_path, _fresh_target(hidden=(8, 8)))


# ---- verification: what it recomputes, and every mismatch named -------------------------------------
def _leaf_by_hand(arr: np.ndarray, block: int = 2**20) -> dict:
    """A leaf's manifest summary from the definition: SHA-256 over the SHA-256s of its C-order bytes
    cut after every max(1, block // R) leading slices of R elements (one block if 0-d or empty)."""
    raw = arr.tobytes(order="C")
    slice_bytes = arr.itemsize * int(np.prod(arr.shape[1:]))
    step = max(1, block // max(1, int(np.prod(arr.shape[1:])))) * slice_bytes
    pieces = [raw[i : i + step] for i in range(0, len(raw), step)] if arr.ndim else [raw]
    blocks = [hashlib.sha256(piece).digest() for piece in pieces or [b""]]
    return {
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "sha256": hashlib.sha256(b"".join(blocks)).hexdigest(),
    }


def _leaf_digest_by_hand(state, metadata) -> str:
    """The checkpoint digest written out from its definition (independent of the store's helpers)."""
    leaves = {}
    trees = {
        "params": state.params,
        "opt_state": checkpoint.store.serialization.to_state_dict(state.opt_state),
        "step": np.int64(state.step),
    }
    for path, leaf in jax.tree_util.tree_flatten_with_path(trees)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        leaves[name] = _leaf_by_hand(np.asarray(leaf))
    body = {"format": "unlearn_jax.checkpoint-digest/2", "leaves": leaves, "metadata": metadata}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@pytest.fixture(scope="module")
def trained():
    return _state()


def _saved(tmp_path, state, *, record_ids=True):
    """A checkpoint with a one-request ledger whose 'after' is the saved model."""
    meta = {"model": {"name": "mlp", "activation": "relu"}, "data": "toy"}
    ledger = Ledger().append([5, 2, 8], method="finetune", before="e" * 64,
                             after=checkpoint_digest(state, meta), record_ids=record_ids)  # fmt: skip
    save_checkpoint(tmp_path, state, meta, ledger=ledger)
    return tmp_path / "3", meta, ledger


def test_verify_checkpoint_recomputes_every_digest(tmp_path, trained):
    path, meta, ledger = _saved(tmp_path, trained)
    report = verify_checkpoint(tmp_path)
    assert report.path == path and report.step == 3 and report.generation == 1
    assert report.digest == checkpoint_digest(trained, meta) == _leaf_digest_by_hand(trained, meta)
    # Every file but the manifest and the marker is hashed; every array leaf is read and hashed.
    files = [p for p in path.rglob("*") if p.is_file()]
    assert report.files == len(files) - 2 > 5
    assert report.arrays == len(jax.tree.leaves((trained.params, trained.opt_state))) + 1
    assert report.ledger == ledger and report.matches_ledger is True and report.gaps == ()
    # The digest does not depend on where or how often the state was saved.
    save_checkpoint(tmp_path, trained, meta, ledger=ledger, overwrite=True)
    again = verify_checkpoint(tmp_path)
    assert again.digest == report.digest and again.generation == 2
    # A model changed after its last deletion is reported, not hidden.
    save_checkpoint(tmp_path / "b", _state(seed=1), meta, ledger=ledger)
    assert verify_checkpoint(tmp_path / "b").matches_ledger is False


def _read_all(directory):
    """Every reader must refuse: restore, read_metadata, read_ledger, verify_checkpoint."""
    errors = []
    for read in (
        lambda: restore_checkpoint(directory, _fresh_target()),
        lambda: read_metadata(directory),
        lambda: read_ledger(directory),
        lambda: verify_checkpoint(directory),
    ):
        with pytest.raises(CheckpointVerificationError) as info:
            read()
        errors.append(info.value)
    return errors


def _edit_json(file: pathlib.Path, edit) -> None:
    value = json.loads(file.read_text())
    edit(value)
    file.write_text(json.dumps(value, sort_keys=True, indent=1) + "\n")


def test_edited_metadata_is_refused(tmp_path, trained):
    """relu -> tanh in the model config is another model: nothing may restore it silently."""
    path, _, _ = _saved(tmp_path, trained)
    _edit_json(path / "metadata.json", lambda m: m["model"].update(activation="tanh"))
    for error in _read_all(tmp_path):
        assert error.item == "metadata.json"
        assert "metadata.json was altered after the save: its SHA-256 is" in str(error)


@pytest.mark.parametrize(
    "edit, detail",
    [
        # One bit of a recorded id (5 = 0b101 -> 4).
        (lambda g: g["records"][0].update(ids=[2, 4, 8]), "recorded ids hash to"),
        # A forged ids hash.
        (lambda g: g["records"][0].update(forget_ids_hash="deadbeef"), "'deadbeef' is not a SHA"),
        (lambda g: g["records"][0].update(method="retrain"), "altered after it was appended"),
        (lambda g: g["records"].clear(), None),
    ],
)
def test_an_edited_ledger_is_refused_naming_the_record(tmp_path, trained, edit, detail):
    path, _, _ = _saved(tmp_path, trained)
    _edit_json(path / "ledger.json", edit)
    for error in _read_all(tmp_path):
        assert error.item == "ledger.json"
        assert "ledger.json was altered after the save" in str(error)
        if detail:
            assert "first record that does not check out: ledger record 0" in str(error)
            assert detail in str(error)


def test_a_forger_must_rewrite_manifest_marker_and_ledger_and_an_anchor_still_shows_it(
    tmp_path, trained
):
    path, _, ledger = _saved(tmp_path, trained, record_ids=False)
    # Edit the metadata and fix its hash in the manifest: the commit marker catches the manifest.
    _edit_json(path / "metadata.json", lambda m: m["model"].update(activation="tanh"))
    new_meta = json.loads((path / "metadata.json").read_text())
    _edit_json(path / "manifest.json", lambda m: m["files"]["metadata.json"].update(
        size=(path / "metadata.json").stat().st_size,
        sha256=hashlib.sha256((path / "metadata.json").read_bytes()).hexdigest()))  # fmt: skip
    for error in _read_all(tmp_path):
        assert error.item == "manifest.json"
        assert "the commit marker records" in str(error)
    # Fix the marker too: the files check out (no secret key), but the model's digest is no longer
    # the one the ledger's last request produced, and verify_checkpoint says so.
    _edit_json(path / "COMMITTED", lambda m: m.update(
        manifest_sha256=hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()))  # fmt: skip
    with pytest.raises(CheckpointVerificationError, match="records digest"):
        verify_checkpoint(tmp_path)  # the manifest's own digest field is stale
    digest = checkpoint_digest(trained, new_meta)
    _edit_json(path / "manifest.json", lambda m: m.update(digest=digest))
    _edit_json(path / "COMMITTED", lambda m: m.update(
        manifest_sha256=hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()))  # fmt: skip
    report = verify_checkpoint(tmp_path)
    assert report.digest == digest and report.matches_ledger is False
    # Rewriting the ledger to match (every hash recomputed) passes the chain; an anchor does not.
    anchor = ledger.head_hash
    record = dataclasses.replace(ledger[0], checkpoint_after=digest, previous=GENESIS)
    forged = Ledger([dataclasses.replace(record, hash=record.compute_hash())])
    (path / "ledger.json").write_text(json.dumps(forged.to_json(), sort_keys=True, indent=1) + "\n")
    _edit_json(path / "manifest.json", lambda m: m["files"]["ledger.json"].update(
        size=(path / "ledger.json").stat().st_size,
        sha256=hashlib.sha256((path / "ledger.json").read_bytes()).hexdigest()))  # fmt: skip
    _edit_json(path / "COMMITTED", lambda m: m.update(
        manifest_sha256=hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()))  # fmt: skip
    assert verify_checkpoint(tmp_path).matches_ledger is True
    with pytest.raises(CheckpointVerificationError, match=f"does not contain the anchor {anchor}"):
        verify_checkpoint(tmp_path, anchor=anchor)


def _flip(digest: str) -> str:
    return ("0" if digest[0] != "0" else "1") + digest[1:]


@pytest.mark.parametrize(
    "what, message",
    [
        ("leaf", r"does not match its recorded shape/dtype/SHA-256 \(saved \[8, 3\] float32"),
        (
            "block",
            r"does not match its recorded SHA-256: block 0 \(leading indices 0\.\.7\) hashes to",
        ),
    ],
)
def test_an_array_whose_decoded_bytes_differ_is_caught_by_its_hash(tmp_path, trained, what,
                                                                   message):  # fmt: skip
    """The innermost check: files that verify but decode to other values (here: a manifest whose
    leaf digest, or block digest and leaf digest over it, was changed, the marker fixed to match)."""
    path, _, _ = _saved(tmp_path, trained)

    def tamper(manifest):
        leaf = manifest["leaves"]["params/head/kernel"]
        if what == "leaf":
            leaf["sha256"] = _flip(leaf["sha256"])
        else:
            leaf["blocks"][0] = _flip(leaf["blocks"][0])
            raw = b"".join(bytes.fromhex(b) for b in leaf["blocks"])
            leaf["sha256"] = hashlib.sha256(raw).hexdigest()

    _edit_json(path / "manifest.json", tamper)
    _edit_json(path / "COMMITTED", lambda m: m.update(
        manifest_sha256=hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()))  # fmt: skip
    for read in (lambda: restore_checkpoint(tmp_path, _fresh_target()),
                 lambda: verify_checkpoint(tmp_path)):  # fmt: skip
        with pytest.raises(CheckpointVerificationError, match=message) as info:
            read()
        assert info.value.item == "array params/head/kernel"


def _array_files(step_dir: pathlib.Path):
    return sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncate", r"has \d+ bytes, the manifest records \d+ \(truncated or overwritten\)"),
        ("garbage", "was altered after the save: its SHA-256 is"),
        ("flip", "was altered after the save: its SHA-256 is"),
        ("delete", "is missing"),
    ],
)
def test_damaged_array_files_are_named_before_orbax_reads_them(tmp_path, trained, capfd, how,
                                                               message):  # fmt: skip
    save_checkpoint(tmp_path, trained, {})
    target = _array_files(tmp_path / "3")[-1]
    data = target.read_bytes()
    if how == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        target.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    else:
        target.unlink()
    rel = target.relative_to(tmp_path / "3").as_posix()
    for read in (lambda: restore_checkpoint(tmp_path, _fresh_target()),
                 lambda: verify_checkpoint(tmp_path)):  # fmt: skip
        with pytest.raises(CheckpointVerificationError, match=message) as info:
            read()
        assert info.value.item == rel and rel in str(info.value)
    # Metadata alone still reads (the arrays are checked by whoever reads them).
    assert read_metadata(tmp_path) == {}
    # No background-thread traceback leaks: orbax never touched the damaged file.
    assert "Traceback" not in capfd.readouterr().err


def test_a_ledger_that_does_not_verify_is_not_saved(tmp_path, trained):
    ledger = Ledger().append([1], method="ssd", before="a" * 64, after="b" * 64)
    bad = Ledger([dataclasses.replace(ledger[0], count=2)])
    with pytest.raises(LedgerError, match="altered after it was appended"):
        save_checkpoint(tmp_path, trained, {}, ledger=bad)
    with pytest.raises(TypeError, match=r"ledger must be an unlearn_jax\.checkpoint\.Ledger"):
        save_checkpoint(tmp_path, trained, {}, ledger=ledger.to_json())
    assert list_steps(tmp_path) == [] and list(tmp_path.iterdir()) == []


# ---- interrupted writes -----------------------------------------------------------------------------
def test_a_save_failing_half_way_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    good = _state(seed=0)
    save_checkpoint(tmp_path, good, {"which": "good"})
    real_write_state = checkpoint.store._write_state

    def fail_after_the_arrays(path, host_tree):
        real_write_state(path, host_tree)
        assert path.parent.name.startswith(".staging-") and any(path.iterdir())
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(checkpoint.store, "_write_state", fail_after_the_arrays)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, _state(seed=1), {"which": "new"}, overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, _state(seed=1).replace(step=50), {"which": "newer"})
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]  # failed writes cleaned up
    assert list_steps(tmp_path) == [3]
    restored, meta = restore_checkpoint(tmp_path, _fresh_target())
    assert meta == {"which": "good"}
    _assert_identical(restored.params, good.params)


def test_a_rename_failing_after_the_commit_point_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    """The marker's rename is the commit point: the new copy is the one readers find from then on,
    even where the rename to its final name fails; the next save finishes the move."""
    save_checkpoint(tmp_path, _state(seed=0), {"which": "old"})
    new = _state(seed=1)
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith(".staging-") and os.path.basename(dst) == "3":
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint._layout.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, new, {"which": "new"}, overwrite=True)
    monkeypatch.undo()
    # The old copy went to the trash, the new one stays under its staging name.
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".staging", ".trash"]
    restored, meta = restore_checkpoint(tmp_path, _fresh_target())
    assert meta == {"which": "new"}
    _assert_identical(restored.params, new.params)
    save_checkpoint(tmp_path, new.replace(step=9), {"which": "other"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "9"]
    assert verify_checkpoint(tmp_path, 3).generation == 2


KILLS = textwrap.dedent(
    """
    import json, os, shutil, sys, types
    # The checkpoint package alone: a bare parent package skips unlearn_jax/__init__.py, which
    # imports every subpackage (seconds of CPU this test does not need).
    parent = types.ModuleType("unlearn_jax")
    parent.__path__ = [os.path.join({root!r}, "unlearn_jax")]
    sys.modules["unlearn_jax"] = parent
    import numpy as np
    import orbax.checkpoint as ocp
    from unlearn_jax.checkpoint import save_checkpoint

    KILLED = 17

    def state(version):
        return types.SimpleNamespace(params={{"w": np.full((2, 3), version, np.float32)}},
                                     opt_state={{}}, step=np.int64(1))

    def exit_after(module, name, test):
        real = getattr(module, name)
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            if test(*args):
                os._exit(KILLED)
            return out
        setattr(module, name, wrapped)

    def arm(kill):
        if kill == "in orbax's write":
            def die(self, *args, **kwargs):
                os._exit(KILLED)
            ocp.PyTreeCheckpointHandler.save = die
        elif kill == "after the commit point":
            exit_after(os, "rename", lambda src, dst: str(dst).endswith("/COMMITTED"))
        elif kill == "with the old copy in the trash":
            exit_after(os, "rename", lambda src, dst: os.path.basename(src).isdigit())
        elif kill == "while deleting the trash":
            real_rmtree = shutil.rmtree
            def rmtree(path, *args, **kwargs):
                if not os.path.exists(os.path.join(path, "COMMITTED")):
                    return real_rmtree(path, *args, **kwargs)  # what an earlier kill left
                for name in ("COMMITTED", "manifest.json", "metadata.json"):
                    os.unlink(os.path.join(path, name))  # part of the old copy goes, then the kill
                os._exit(KILLED)
            shutil.rmtree = rmtree

    def run(directory, version, kill):
        # Each save in its own process: a fork of this one, which has not started orbax yet.
        pid = os.fork()
        if pid == 0:
            arm(kill)
            save_checkpoint(directory, state(version), {{"version": version}}, step=1,
                            overwrite=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def listing(directory):
        return sorted(name.split("-")[0] for name in os.listdir(directory))

    cases = json.loads(sys.argv[1])
    first = os.path.join(os.path.dirname(next(iter(cases))), "first")
    codes = [run(first, 1, None), run(first, 2, "while deleting the trash")]
    out = {{"first": codes, "after_first": listing(first), "second": {{}}}}
    for directory, second_kill in cases.items():
        shutil.copytree(first, directory)
        out["second"][directory] = run(directory, 3, second_kill)
    print(json.dumps(out))
    """
)


def test_two_processes_killed_in_a_row_leave_the_last_committed_save(tmp_path):
    """Real kills (os._exit: no handler, no cleanup) of orbax saves: the first while deleting the
    overwritten copy, the second (on copies of what the first left) at each stage of the next
    overwrite. The four combinations once restored the older version or reported corruption next to
    a complete newer copy."""
    expected = {
        "in orbax's write": 2,
        "after the commit point": 3,
        "with the old copy in the trash": 3,
        "while deleting the trash": 3,
    }
    dirs = {str(tmp_path / f"case{i}"): kill for i, kill in enumerate(expected)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLS.format(root=str(ROOT)), json.dumps(dirs)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["first"] == [0, 17] and out["after_first"] == [".trash", "1"]  # partly deleted
    for directory, kill in dirs.items():
        assert out["second"][directory] == 17, kill
        report = verify_checkpoint(directory)
        assert read_metadata(directory) == {"version": expected[kill]}, kill
        assert report.step == 1 and list_steps(directory) == [1]
        # The next save removes the staging copies and the trash the kills left.
        save_checkpoint(directory, _state(), {"version": 4}, step=1, overwrite=True)
        assert sorted(p.name for p in pathlib.Path(directory).iterdir()) == ["1"]
        assert read_metadata(directory) == {"version": 4}
