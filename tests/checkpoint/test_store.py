"""Checkpoints: bit-identical round trips, each restore error, and writes that fail half way."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests._training_setup import ADAM, BATCH, SGD, classification
from unlearn_jax import checkpoint
from unlearn_jax.checkpoint import (
    CheckpointCorruptedError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    latest_step,
    list_steps,
    restore_checkpoint,
    save_checkpoint,
)
from unlearn_jax.models import get_model, model_config, model_task
from unlearn_jax.training import create_train_state, fit

ROOT = pathlib.Path(__file__).resolve().parents[1]

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
    path = save_checkpoint(tmp_path / "ckpt", state, metadata)
    assert path == tmp_path / "ckpt" / "3"  # 24 rows in batches of 8: step 3
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


def _corrupt(path: pathlib.Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "flip":
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))


def _array_files(step_dir: pathlib.Path):
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("how", ["truncate", "garbage", "flip"])
def test_corrupted_array_files_are_reported_as_corruption(tmp_path, how):
    save_checkpoint(tmp_path, _state(), {})
    files = _array_files(tmp_path / "3")
    assert files
    for f in files:
        _corrupt(f, how)
    with pytest.raises(CheckpointCorruptedError, match=r"/3 is corrupted"):
        restore_checkpoint(tmp_path, _fresh_target())


@pytest.mark.parametrize("item", ["manifest", "metadata"])
def test_corrupted_metadata_files_are_reported_as_corruption(tmp_path, item):
    save_checkpoint(tmp_path, _state(), {"a": 1})
    _corrupt(tmp_path / "3" / item / "metadata", "truncate")
    with pytest.raises(CheckpointCorruptedError, match="manifest or metadata cannot be read"):
        restore_checkpoint(tmp_path, _fresh_target())


def test_a_silently_changed_array_is_caught_by_its_hash(tmp_path, monkeypatch):
    """Bytes that still decode (here: a tampered manifest hash) are caught by the SHA-256 check."""
    save_checkpoint(tmp_path, _state(), {})
    manifest_file = tmp_path / "3" / "manifest" / "metadata"
    text = manifest_file.read_text()
    start = text.index('"params/head/kernel"')
    digest_at = text.index('"sha256": "', start) + len('"sha256": "')
    tampered = text[:digest_at] + ("0" if text[digest_at] != "0" else "1") + text[digest_at + 1 :]
    manifest_file.write_text(tampered)
    with pytest.raises(CheckpointCorruptedError, match="'params/head/kernel' does not match"):
        restore_checkpoint(tmp_path, _fresh_target())


# ---- interrupted writes -----------------------------------------------------------------------------
def test_a_save_failing_half_way_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    good = _state(seed=0)
    save_checkpoint(tmp_path, good, {"which": "good"})

    def fail_mid_write(self, directory, *args, **kwargs):
        del self, args, kwargs
        # Called inside orbax's temporary checkpoint directory, after the state item's write began.
        assert directory.parent.name.endswith(".orbax-checkpoint-tmp") and directory.parent.exists()
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", fail_mid_write)
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


def test_a_commit_failing_between_renames_rolls_back(tmp_path, monkeypatch):
    good = _state(seed=0)
    save_checkpoint(tmp_path, good, {"which": "good"})
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith(".staging-") and os.path.basename(dst) == "3":
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.store.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, _state(seed=1), {"which": "new"}, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]
    restored, meta = restore_checkpoint(tmp_path, _fresh_target())
    assert meta == {"which": "good"}
    _assert_identical(restored.params, good.params)


def test_a_checkpoint_moved_aside_by_a_crashed_overwrite_is_still_found(tmp_path):
    good = _state(seed=0)
    save_checkpoint(tmp_path, good, {"which": "good"})
    # What a crash between the two renames of an overwrite leaves: the old checkpoint aside.
    os.rename(tmp_path / "3", tmp_path / ".old-3-0123abcd")
    assert list_steps(tmp_path) == [3]
    restored, meta = restore_checkpoint(tmp_path, _fresh_target())
    assert meta == {"which": "good"}
    _assert_identical(restored.params, good.params)
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path, good, {})
    save_checkpoint(tmp_path, _state(seed=1), {"which": "new"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]
    assert restore_checkpoint(tmp_path, _fresh_target())[1] == {"which": "new"}


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """A real crash: the child process dies (os._exit, no cleanup) while orbax is writing."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import jax, numpy as np, optax
        import orbax.checkpoint as ocp
        from unlearn_jax.checkpoint import save_checkpoint
        from unlearn_jax.models import get_model
        from unlearn_jax.training import create_train_state

        model = get_model("mlp", num_outputs=3, hidden_sizes=(8,))
        state = create_train_state(model, np.zeros((1, 5), np.float32), optax.adam(1e-2),
                                   jax.random.key(0))
        save_checkpoint(sys.argv[1], state.replace(step=1), {{"which": "good"}})
        print("saved", flush=True)

        def die(self, directory, *args, **kwargs):
            os._exit(17)  # killed mid-write: no exception handlers, no cleanup

        ocp.JsonCheckpointHandler.async_save = die
        bigger = state.replace(params=jax.tree.map(lambda a: a + 1, state.params))
        save_checkpoint(sys.argv[1], bigger.replace(step=1), {{"which": "bad"}}, overwrite=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert "saved" in proc.stdout
    assert any(p.name.startswith(".staging-") for p in tmp_path.iterdir())  # the torn write
    assert list_steps(tmp_path) == [1]
    model = _model()
    target = create_train_state(model, np.zeros((1, 5), np.float32), ADAM,
                                jax.random.key(0))  # fmt: skip
    restored, meta = restore_checkpoint(tmp_path, target)
    assert meta == {"which": "good"}
    _assert_identical(restored.params, target.params)  # the child saved exactly these values
