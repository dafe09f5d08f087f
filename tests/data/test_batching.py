"""Tests of unlearn_jax.data.batching: epochs, padding masks, endless streams and their errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax import data
from unlearn_jax.data import Dataset


def toy(n=10, y_shape=()):
    """x[i] = [i, 2i, 3i], ids 100 + i; classification labels i % 3 or regression targets."""
    x = np.arange(n, dtype=np.float32)[:, None] * np.array([1.0, 2.0, 3.0], np.float32)
    if y_shape:
        y = np.arange(n * math.prod(y_shape), dtype=np.float32).reshape(n, *y_shape)
        return Dataset(x=x, y=y, ids=100 + np.arange(n), name="toy")
    return Dataset(x=x, y=np.arange(n) % 3, ids=100 + np.arange(n), name="toy", num_classes=3)


def collect_ids(batch_iter):
    return np.concatenate([np.asarray(b["id"]) for b in batch_iter])


def test_batches_in_dataset_order_with_a_partial_last_batch():
    ds = toy(10)
    out = list(data.batches(ds, 4))
    assert [b["x"].shape for b in out] == [(4, 3), (4, 3), (2, 3)]  # last: 10 % 4 = 2
    assert len(out) == data.num_batches(10, 4) == 3
    for b in out:
        assert set(b) == {"x", "y", "id"}
        assert b["x"].dtype == jnp.float32 and b["y"].dtype == jnp.int32
        assert b["id"].dtype == jnp.int32
        rows = np.asarray(b["id"]) - 100
        np.testing.assert_array_equal(np.asarray(b["x"]), ds.x[rows])
        np.testing.assert_array_equal(np.asarray(b["y"]), ds.y[rows])
    np.testing.assert_array_equal(collect_ids(out), ds.ids)


def test_batches_drop_remainder():
    out = list(data.batches(toy(10), 4, drop_remainder=True))
    assert [b["x"].shape[0] for b in out] == [4, 4]
    assert len(out) == data.num_batches(10, 4, drop_remainder=True)
    np.testing.assert_array_equal(collect_ids(out), 100 + np.arange(8))


def test_batches_with_a_key_follow_jax_random_permutation():
    ds = toy(23)
    key = jax.random.key(3)
    ids = collect_ids(data.batches(ds, 5, key=key))
    np.testing.assert_array_equal(ids, 100 + np.asarray(jax.random.permutation(key, 23)))
    np.testing.assert_array_equal(np.sort(ids), ds.ids)  # every id exactly once per epoch
    np.testing.assert_array_equal(collect_ids(data.batches(ds, 5, key=key)), ids)
    assert not np.array_equal(collect_ids(data.batches(ds, 5, key=jax.random.key(4))), ids)
    assert not np.array_equal(ids, ds.ids)
    # Legacy uint32 keys work too.
    legacy = collect_ids(data.batches(ds, 5, key=jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(np.sort(legacy), ds.ids)


def test_batches_keep_regression_target_shapes():
    out = list(data.batches(toy(5, y_shape=(2,)), 2))
    assert [b["y"].shape for b in out] == [(2, 2), (2, 2), (1, 2)]
    assert out[0]["y"].dtype == jnp.float32


def test_batches_serve_as_a_streaming_iterable():
    # A consumer that accumulates over batches (as a streaming Fisher does) sees every example once.
    ds = toy(11)
    total = sum(float(jnp.sum(b["x"])) for b in data.batches(ds, 3, key=jax.random.key(0)))
    np.testing.assert_allclose(total, ds.x.sum(), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, None, "4"])
def test_batches_bad_batch_size_fails_at_the_call(batch_size):
    # Raised when batches() is called, before any iteration.
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        data.batches(toy(), batch_size)


def test_batches_errors():
    ds = toy(3)
    with pytest.raises(
        ValueError, match=r"batch_size=4 exceeds the 3 examples of toy, so drop_remainder"
    ):
        data.batches(ds, 4, drop_remainder=True)
    with pytest.raises(ValueError, match=r"toy is empty; there is nothing to batch"):
        data.batches(ds.take([]), 2)
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key such as jax.random.key\(0\)"):
        data.batches(ds, 2, key=0)
    with pytest.raises(
        TypeError, match=r"dataset must be an unlearn_jax.data.Dataset or StreamedDataset, got dict"
    ):
        data.batches({"x": ds.x}, 2)
    for fn in (data.padded_batches, data.batch_stream):
        with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
            fn(ds, 0)


@pytest.mark.parametrize(
    ("n", "batch_size"), [(0, 3), (1, 1), (10, 4), (12, 4), (3, 7), (1797, 128)]
)
def test_num_batches(n, batch_size):
    assert data.num_batches(n, batch_size) == -(-n // batch_size)
    assert data.num_batches(n, batch_size, drop_remainder=True) == n // batch_size
    assert data.num_batches(n, batch_size) == len(range(0, n, batch_size))


def test_num_batches_errors():
    with pytest.raises(ValueError, match=r"n must be an integer >= 0, got n=-1"):
        data.num_batches(-1, 2)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got batch_size=0"):
        data.num_batches(5, 0)


def test_padded_batches_have_one_shape_and_a_mask():
    ds = toy(10)
    key = jax.random.key(1)
    out = list(data.padded_batches(ds, 4, key=key))
    assert len(out) == 3
    for batch, mask in out:
        assert batch["x"].shape == (4, 3) and batch["y"].shape == (4,) and batch["id"].shape == (4,)
        assert mask.shape == (4,) and mask.dtype == jnp.float32
    masks = np.stack([np.asarray(m) for _, m in out])
    np.testing.assert_array_equal(masks.sum(axis=1), [4, 4, 2])  # 10 % 4 = 2 real rows last
    last, last_mask = out[-1]
    np.testing.assert_array_equal(np.asarray(last_mask), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(last["id"])[2:], [-1, -1])
    np.testing.assert_array_equal(np.asarray(last["x"])[2:], 0.0)
    np.testing.assert_array_equal(np.asarray(last["y"])[2:], 0)
    real_ids = np.concatenate([np.asarray(b["id"])[np.asarray(m) == 1] for b, m in out])
    np.testing.assert_array_equal(real_ids, collect_ids(data.batches(ds, 4, key=key)))


def test_padded_batches_compile_one_step_for_the_whole_epoch():
    ds = toy(10, y_shape=(2,))
    traces = []

    @jax.jit
    def masked_sums(batch, mask):
        traces.append(None)  # runs only when tracing
        return jnp.sum(mask[:, None] * batch["x"]), jnp.sum(mask[:, None] * batch["y"])

    sums = [masked_sums(b, m) for b, m in data.padded_batches(ds, 4)]
    assert len(traces) == 1
    np.testing.assert_allclose(sum(float(s[0]) for s in sums), ds.x.sum(), rtol=1e-6)
    np.testing.assert_allclose(sum(float(s[1]) for s in sums), ds.y.sum(), rtol=1e-6)


def test_padded_batches_smaller_than_one_batch():
    (batch, mask), *rest = list(data.padded_batches(toy(3), 8))
    assert not rest
    assert batch["x"].shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(mask), [1, 1, 1, 0, 0, 0, 0, 0])


def test_batch_stream_reshuffles_every_epoch():
    ds = toy(10)
    key = jax.random.key(7)
    stream = data.batch_stream(ds, 4, key=key)
    ids = np.concatenate([np.asarray(next(stream)["id"]) for _ in range(5)])  # 20 ids: 2 epochs
    epoch0 = 100 + np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), 10))
    epoch1 = 100 + np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), 10))
    np.testing.assert_array_equal(ids, np.concatenate([epoch0, epoch1]))
    assert not np.array_equal(epoch0, epoch1)


def test_batch_stream_batches_are_full_even_when_larger_than_the_dataset():
    stream = data.batch_stream(toy(3), 5)
    first, second = next(stream), next(stream)
    assert first["x"].shape == (5, 3) and second["x"].shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(first["id"]), [100, 101, 102, 100, 101])
    np.testing.assert_array_equal(np.asarray(second["id"]), [102, 100, 101, 102, 100])
