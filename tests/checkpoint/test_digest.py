"""The block digests of array leaves against a transcription of their definition, and the helpers
that let several processes agree (in one process; the two-process run is test_multihost.py)."""

import hashlib
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.checkpoint import (
    CheckpointError,
    CheckpointVerificationError,
    LedgerError,
    _multihost,
    checkpoint_digest,
    store,
)
from unlearn_jax.checkpoint import _digest as digests


def _blocks_by_hand(arr: np.ndarray, block: int) -> list[str]:
    """SHA-256s of the C-order bytes cut after every max(1, block // R) leading slices of R
    elements; one block for a 0-d or empty array."""
    raw = arr.tobytes(order="C")
    if arr.ndim == 0 or arr.size == 0:
        return [hashlib.sha256(raw).hexdigest()]
    slice_elements = int(np.prod(arr.shape[1:]))
    step = max(1, block // slice_elements) * slice_elements * arr.itemsize
    return [hashlib.sha256(raw[i : i + step]).hexdigest() for i in range(0, len(raw), step)]


@pytest.mark.parametrize(
    "shape, block, count",
    [
        ((), 8, 1),
        ((0,), 8, 1),
        ((3, 0), 8, 1),
        ((7,), 8, 1),
        ((20,), 8, 3),  # 8 + 8 + 4 elements
        ((5, 3), 8, 3),  # 2 rows of 3 per block: rows 0-1, 2-3, 4
        ((2, 9), 8, 2),  # a row (9) larger than a block: one row per block
        ((4, 2, 3), 12, 2),  # slices of 6, two per block
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "int8", "bool"])
def test_leaf_blocks_follow_the_definition(shape, block, count, dtype):
    rng = np.random.default_rng(sum(shape) + block)
    arr = (rng.standard_normal(shape) * 50).astype(dtype)
    info = digests.leaf_infos({"x": arr}, block)["x"]
    assert info["shape"] == list(shape) and info["dtype"] == dtype
    assert info["blocks"] == _blocks_by_hand(arr, block)
    assert len(info["blocks"]) == count == digests.num_blocks(shape, block)
    raw = b"".join(bytes.fromhex(b) for b in info["blocks"])
    assert info["sha256"] == hashlib.sha256(raw).hexdigest()
    # A jax.Array on one device is hashed from its (single) shard: the same digests.
    assert digests.leaf_infos({"x": jnp.asarray(arr)}, block)["x"] == info


def test_checkpoint_digest_at_the_real_block_size_by_hand():
    """Leaves of several blocks of 2**20 elements: rows under a block (g = 1 row of 700000), a flat
    vector (g = 2**20), and rows larger than a block (one row each)."""
    rng = np.random.default_rng(0)
    params = {
        "rows": rng.standard_normal((3, 700_000)).astype(np.float32),
        "flat": rng.integers(-100, 100, 2_200_000).astype(np.int8),
        "wide": rng.standard_normal((2, 1_100_000)).astype(np.float16),
    }
    state = types.SimpleNamespace(params=params, opt_state={}, step=np.int32(4))
    meta = {"note": "by hand"}
    leaves = {}
    for name, arr in [*(("params/" + k, v) for k, v in params.items()), ("step", np.int64(4))]:
        arr = np.asarray(arr)
        blocks = _blocks_by_hand(arr, 2**20)
        leaves[name] = {
            "shape": list(arr.shape),
            "dtype": arr.dtype.name,
            "sha256": hashlib.sha256(b"".join(bytes.fromhex(b) for b in blocks)).hexdigest(),
        }
    assert [len(_blocks_by_hand(params[k], 2**20)) for k in ("rows", "flat", "wide")] == [3, 3, 2]
    body = {"format": "unlearn_jax.checkpoint-digest/2", "leaves": leaves, "metadata": meta}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert checkpoint_digest(state, meta) == hashlib.sha256(canonical.encode()).hexdigest()


def test_prng_key_leaves_are_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"jax\.random\.key_data"):
        digests.leaf_infos({"key": jax.random.key(0)})


def test_files_are_split_by_size_the_same_way_everywhere():
    """Largest first, each to the least loaded process (ties: the lower index)."""
    sizes = {"a": 5, "b": 3, "c": 3, "d": 1, "e": 0}
    # a -> 0 (5); b -> 1 (3); c -> 1 (6); d -> 0 (6); e -> 0 (tie at 6: the lower index)
    assert _multihost.assign(sizes, 2) == [["a", "d", "e"], ["b", "c"]]
    assert _multihost.assign(sizes, 1) == [["a", "b", "c", "d", "e"]]
    assert _multihost.assign({}, 3) == [[], [], []]


def test_errors_cross_processes_with_their_class_and_fields():
    path = pathlib.Path("/ckpt/7")
    err = CheckpointVerificationError("checkpoint /ckpt/7 does not verify: x", path, "state/d/1")
    rebuilt = store._rebuild(store._describe(err), 1)
    assert type(rebuilt) is CheckpointVerificationError
    assert (str(rebuilt), rebuilt.path, rebuilt.item) == (str(err), path, "state/d/1")
    for error in (FileExistsError("exists"), LedgerError("bad chain"), ValueError("v")):
        rebuilt = store._rebuild(store._describe(error), 0)
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
    rebuilt = store._rebuild(store._describe(KeyError("k")), 1)
    assert type(rebuilt) is CheckpointError
    assert str(rebuilt) == "process 1 failed: KeyError: 'k'"
    # One process: the error itself, unchanged.
    with pytest.raises(FileExistsError, match="exists"):
        store._agree(FileExistsError("exists"))
    store._agree(None)
