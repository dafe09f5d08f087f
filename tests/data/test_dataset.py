"""Tests of unlearn_jax.data.dataset: the Dataset and Splits containers."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.data import Dataset, Splits


def toy(n=6, num_classes=3, first_id=100):
    """n examples with x[i] = [i, -i], labels i % num_classes, ids first_id + i."""
    x = np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float64)
    return Dataset(
        x=x,
        y=np.arange(n) % num_classes,
        ids=first_id + np.arange(n),
        name="toy",
        num_classes=num_classes,
    )


def test_construction_converts_dtypes():
    ds = toy()
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32 and ds.ids.dtype == np.int64
    assert len(ds) == 6
    assert ds.kind == "classification"
    assert ds.input_shape == (2,)
    np.testing.assert_array_equal(ds.x[:, 0], np.arange(6))


def test_regression_targets_are_float32_and_may_be_2d():
    ds = Dataset(x=np.ones((4, 3)), y=np.arange(8).reshape(4, 2), ids=np.arange(4))
    assert ds.kind == "regression" and ds.num_classes is None
    assert ds.y.dtype == np.float32 and ds.y.shape == (4, 2)


def test_integral_float_labels_are_accepted():
    ds = Dataset(x=np.ones((3, 1)), y=np.array([0.0, 2.0, 1.0]), ids=np.arange(3), num_classes=3)
    np.testing.assert_array_equal(ds.y, [0, 2, 1])


def test_frozen_and_repr_without_arrays():
    ds = toy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"
    assert repr(ds) == "Dataset(name='toy', n=6, x=float32[6, 2], y=int32[6], num_classes=3)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"y": np.zeros(5, int)},
            r"disagree on the number of examples: \{'x': 6, 'y': 5, 'ids': 6\}",
        ),
        ({"ids": np.array([1, 2, 3, 3, 4, 4])}, r"ids must be unique.*\[3, 4\]"),
        ({"ids": np.arange(6).reshape(2, 3)}, r"ids must be a 1-D array"),
        ({"ids": np.arange(6) - 1}, r"ids must lie in \[0, 2147483647\].*\[-1\]"),
        ({"ids": np.arange(6) + 2**31}, r"ids must lie in"),
        ({"ids": np.arange(6.0)}, r"ids must hold integer ids, got dtype float64"),
        ({"y": np.array([0, 1, 2, 3, 0, 1])}, r"labels must lie in \[0, 3\).*\[3\]"),
        ({"y": np.array([0, 1, 2, 0.5, 0, 1])}, r"class labels y must be integers"),
        ({"y": np.zeros((6, 2), int)}, r"class labels y must have shape \[N\]"),
        ({"x": np.array(["a"] * 6)}, r"x must be a numeric array"),
        ({"num_classes": 0}, r"num_classes must be an integer >= 1"),
    ],
)
def test_invalid_construction_names_the_problem(kwargs, message):
    base = {"x": np.zeros((6, 2)), "y": np.arange(6) % 3, "ids": np.arange(6), "num_classes": 3}
    with pytest.raises(ValueError, match=message):
        Dataset(**{**base, **kwargs})


def test_non_finite_values_name_the_examples():
    x = np.zeros((4, 2))
    x[2, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"x contains NaN or infinite values in 1 examples, ids \[12\]"
    ):
        Dataset(x=x, y=np.zeros(4, int), ids=np.arange(10, 14), num_classes=2)
    y = np.array([0.0, np.inf, 1.0, -np.inf])
    with pytest.raises(
        ValueError, match=r"y contains NaN or infinite values in 2 examples, ids \[1, 3\]"
    ):
        Dataset(x=np.zeros((4, 2)), y=y, ids=np.arange(4))


def test_by_ids_returns_rows_in_the_order_asked():
    ds = toy()
    sub = ds.by_ids([105, 101, 103])
    np.testing.assert_array_equal(sub.ids, [105, 101, 103])
    np.testing.assert_array_equal(sub.x[:, 0], [5, 1, 3])
    np.testing.assert_array_equal(sub.y, [2, 1, 0])
    assert sub.num_classes == 3 and sub.name == "toy"
    # A jax array and a single int work too.
    np.testing.assert_array_equal(ds.by_ids(jnp.array([100])).ids, [100])
    np.testing.assert_array_equal(ds.by_ids(104).x[:, 0], [4])


def test_by_ids_unknown_ids_are_named_with_their_count():
    ds = toy()
    with pytest.raises(
        ValueError, match=r"ids not in toy \(6 examples\): \[1, 2, 3, 4, 5, \.\.\.\] \(7 in all\)"
    ):
        ds.by_ids([100, 1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(ValueError, match=r"ids must not repeat.*\[101\]"):
        ds.by_ids([101, 101])
    with pytest.raises(ValueError, match=r"must hold integer ids"):
        ds.by_ids([1.5])


def test_without_ids_keeps_the_complement_in_order():
    ds = toy()
    rest = ds.without_ids([104, 100])
    np.testing.assert_array_equal(rest.ids, [101, 102, 103, 105])
    np.testing.assert_array_equal(rest.x[:, 1], [-1, -2, -3, -5])
    assert len(ds.without_ids([])) == 6
    with pytest.raises(ValueError, match=r"ids not in toy.*\[99\] \(1 in all\)"):
        ds.without_ids([101, 99])


def test_take_and_subset():
    ds = toy()
    np.testing.assert_array_equal(ds.take([4, 0]).ids, [104, 100])
    mask = np.array([True, False, True, False, False, True])
    np.testing.assert_array_equal(ds.subset(mask).ids, [100, 102, 105])
    np.testing.assert_array_equal(ds.subset([5, 1]).ids, [105, 101])
    assert len(ds.take([])) == 0
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\).*\[6, -1\]"):
        ds.take([0, 6, -1])
    with pytest.raises(ValueError, match=r"indices must not repeat.*\[2\]"):
        ds.take([2, 2])
    with pytest.raises(ValueError, match=r"boolean mask must have shape \(6,\).*\(3,\)"):
        ds.subset(np.ones(3, bool))


def test_positions_and_contains():
    ds = toy().take([3, 1, 5])  # ids 103, 101, 105 in that order
    np.testing.assert_array_equal(ds.positions([105, 103]), [2, 0])
    np.testing.assert_array_equal(ds.contains([101, 102, 105, 7]), [True, False, True, False])


def test_class_counts_match_bincount():
    ds = toy(n=7, num_classes=3)
    np.testing.assert_array_equal(ds.class_counts(), [3, 2, 2])
    reg = Dataset(x=np.ones((2, 1)), y=np.ones(2), ids=np.arange(2), name="reg")
    with pytest.raises(ValueError, match="needs a classification dataset, but 'reg' is regression"):
        reg.class_counts()


def test_as_batch():
    ds = toy()
    batch = ds.as_batch()
    assert set(batch) == {"x", "y", "id"}
    assert batch["x"].dtype == jnp.float32 and batch["y"].dtype == jnp.int32
    assert batch["id"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(batch["x"]), ds.x)
    np.testing.assert_array_equal(np.asarray(batch["id"]), np.arange(100, 106))
    with pytest.raises(ValueError, match="toy is empty"):
        ds.take([]).as_batch()


def test_splits_checks_train_and_test_agree():
    train, test = toy(), toy(first_id=200)
    splits = Splits(train=train, test=test, name="toy")
    assert splits.num_classes == 3 and splits.kind == "classification" and splits.info == {}
    with pytest.raises(ValueError, match=r"disagree on num_classes: 3 vs 4"):
        Splits(train=train, test=toy(num_classes=4), name="toy")
    wide = Dataset(x=np.zeros((2, 5)), y=np.zeros(2, int), ids=np.arange(2), num_classes=3)
    with pytest.raises(ValueError, match=r"disagree on input shape: \(2,\) vs \(5,\)"):
        Splits(train=train, test=wide, name="toy")
    with pytest.raises(TypeError, match=r"Splits\.test must be a Dataset"):
        Splits(train=train, test=None, name="toy")
