"""Sharded checkpoints saved and restored by two JAX processes (CPU devices, gloo, 127.0.0.1), and
compared with a save by one process of the same values. The processes run
:mod:`tests.multihost_check`; see its ``check_checkpoint`` for what each one does."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import multihost_check
from unlearn_jax.checkpoint import checkpoint_digest, restore_checkpoint, verify_checkpoint

# See test_store.py: orbax's closed event loop, reported during whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _manifest(directory: pathlib.Path) -> dict:
    return json.loads((directory / str(multihost_check.STEP) / "manifest.json").read_text())


def test_two_processes_save_and_restore_sharded_and_agree_with_one(tmp_path):
    # The same values saved by this process (numpy leaves, hashed on the host) into tmp_path/single.
    state, meta, digest = multihost_check.prepare_checkpoint(tmp_path)
    assert digest == checkpoint_digest(jax.tree.map(jnp.asarray, state), meta)

    results = multihost_check.run(["checkpoint"], tmp_path)

    first, second = (r["checks"]["checkpoint"] for r in results)
    for out in (first, second):
        # The digest of the sharded state, computed block by block on the devices holding each
        # block, is the one-process digest of the same values; so is what verify recomputes.
        assert out["digest"] == out["explicit_digest"] == digest
        assert out["verify_digest"] == digest
        assert out["regenerated_digest"] == digest and out["generation"] == 2
        assert out["matches_ledger"] is True
        assert out["listing"] == [str(multihost_check.STEP)]  # no staging copy, no trash
        assert (
            "already exists" in out["exists_message"] and "overwrite=True" in out["exists_message"]
        )
    # Each process checked only its own shards (2 of its 2 devices' worth per leaf, at least).
    assert first["shards_checked"] == second["shards_checked"] > 0
    # A damaged file and a tampered block digest, each found by process 1 only, are refused by both
    # processes with the same message naming the first mismatch.
    assert first["file_error"] == second["file_error"]
    assert first["file_error"]["type"] == "CheckpointVerificationError"
    assert first["file_error"]["item"] == first["file_victim"]
    assert "was altered after the save" in first["file_error"]["message"]
    assert first["block_error"] == second["block_error"]
    assert first["block_error"]["item"] == "array params/hidden_0/kernel"
    rows = 2**20 // multihost_check.HIDDEN  # leading rows per block of the [1023, 2200] kernel
    k = first["tampered_block"]
    where = f"block {k} (leading indices {k * rows}..{min(1023, (k + 1) * rows) - 1}) hashes to"
    assert where in first["block_error"]["message"]

    # The same arrays, whoever wrote them: the manifests agree leaf by leaf and block by block; the
    # files differ (each process wrote its own OCDBT shard files).
    single, multi = _manifest(tmp_path / "single"), _manifest(tmp_path / "multi")
    assert single["leaves"] == multi["leaves"] and single["digest"] == multi["digest"]
    assert len(multi["leaves"]["params/hidden_0/kernel"]["blocks"]) == 3
    writers = {f.split("/")[1] for f in multi["files"] if f.startswith("state/ocdbt.process_")}
    assert writers == {"ocdbt.process_0", "ocdbt.process_1"}

    # The two-process checkpoint, read back by one process (numpy, then placed): bit-identical.
    report = verify_checkpoint(tmp_path / "multi")
    assert report.digest == digest and report.matches_ledger is True and report.generation == 2
    assert verify_checkpoint(tmp_path / "single").digest == digest
    target = jax.eval_shape(lambda: state)
    restored, restored_meta = restore_checkpoint(tmp_path / "multi", target)
    assert restored_meta == meta
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)
    timings = {r["process"]: [r["timings"], r["checks"]["checkpoint"]["timings"]] for r in results}
    print(json.dumps(timings))
