"""Tests of unlearn_jax.data.loaders: named data sets, their splits, ids and errors."""

import doctest
import json

import numpy as np
import pytest
import sklearn.datasets

from unlearn_jax import data
from unlearn_jax.data import batching, dataset, forget, loaders

tfds = pytest.importorskip("tensorflow_datasets")

DIGITS = sklearn.datasets.load_digits()
DIABETES = sklearn.datasets.load_diabetes(scaled=False)


def check_partition(splits, n_total):
    """Train and test ids are disjoint and together are exactly the rows 0..n_total-1."""
    ids = np.concatenate([splits.train.ids, splits.test.ids])
    np.testing.assert_array_equal(np.sort(ids), np.arange(n_total))


# ---- digits ------------------------------------------------------------------------------------
def test_digits_sizes_values_and_ids_match_sklearn():
    splits = data.load("digits")
    assert (len(splits.train), len(splits.test)) == (1437, 360)  # 360 = ceil(0.2 * 1797)
    assert splits.name == "digits" and splits.num_classes == 10
    check_partition(splits, 1797)
    for part in (splits.train, splits.test):
        assert part.x.shape[1:] == (8, 8, 1) and part.x.dtype == np.float32
        np.testing.assert_array_equal(part.x.reshape(len(part), 64), DIGITS.data[part.ids] / 16.0)
        np.testing.assert_array_equal(part.y, DIGITS.target[part.ids])
    assert splits.train.x.min() == 0.0 and splits.train.x.max() == 1.0
    assert splits.train.name == "digits/train" and splits.test.name == "digits/test"


def test_digits_split_is_stratified():
    splits = data.load("digits")
    per_class = np.bincount(DIGITS.target)
    test_counts = splits.test.class_counts()
    # Each class holds its share of the 360 test examples, up to rounding.
    assert np.all(np.abs(test_counts - per_class * 360 / 1797) < 1)
    np.testing.assert_array_equal(splits.train.class_counts() + test_counts, per_class)


def test_digits_split_is_deterministic_given_the_seed():
    a, b = data.load("digits", seed=0), data.load("digits", seed=0)
    np.testing.assert_array_equal(a.test.ids, b.test.ids)
    c = data.load("digits", seed=1)
    assert not np.array_equal(a.test.ids, c.test.ids)
    half = data.load("digits", test_fraction=0.5, seed=3)
    assert (len(half.train), len(half.test)) == (898, 899)


def test_info_is_json_serialisable_and_complete():
    for name in ("digits", "diabetes", "synthetic"):
        info = data.load(name).info
        assert json.loads(json.dumps(info)) == info
        for key in (
            "source",
            "kind",
            "num_classes",
            "input_shape",
            "num_train",
            "num_test",
            "seed",
        ):
            assert key in info, (name, key)
    info = data.load("digits").info
    assert info["input_shape"] == [8, 8, 1] and (info["num_train"], info["num_test"]) == (1437, 360)


# ---- diabetes ----------------------------------------------------------------------------------
def test_diabetes_is_standardised_with_training_statistics():
    splits = data.load("diabetes")
    assert (len(splits.train), len(splits.test)) == (353, 89)
    assert splits.kind == "regression" and splits.num_classes is None
    check_partition(splits, 442)
    train = splits.train
    assert train.x.shape == (353, 10) and train.y.shape == (353,) and train.y.dtype == np.float32
    np.testing.assert_allclose(train.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.x.std(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(train.y.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.y.std(), 1.0, atol=1e-5)
    info = splits.info
    for part in (splits.train, splits.test):
        raw_y = part.y * info["y_std"] + info["y_mean"]
        np.testing.assert_allclose(raw_y, DIABETES.target[part.ids], rtol=1e-5)
        raw_x = part.x * np.array(info["x_std"]) + np.array(info["x_mean"])
        np.testing.assert_allclose(raw_x, DIABETES.data[part.ids], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(info["y_mean"], DIABETES.target[train.ids].mean())
    assert info["feature_names"] == list(DIABETES.feature_names)


# ---- synthetic ---------------------------------------------------------------------------------
def test_synthetic_mixture_has_the_documented_statistics():
    n, dim, classes, separation = 3000, 8, 3, 4.0
    splits = data.load("synthetic", n=n, dim=dim, classes=classes, separation=separation, seed=5)
    assert (len(splits.train), len(splits.test)) == (2400, 600)
    check_partition(splits, n)
    x = np.concatenate([splits.train.x, splits.test.x])
    y = np.concatenate([splits.train.y, splits.test.y])
    np.testing.assert_array_equal(np.bincount(y), [1000, 1000, 1000])
    means = np.stack([x[y == c].mean(axis=0) for c in range(classes)])
    # Each mean is estimated from 1000 points with unit noise: error about sqrt(dim / 1000) = 0.09.
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), separation, atol=0.3)
    noise = x - means[y]
    np.testing.assert_allclose(noise.std(axis=0), 1.0, atol=0.05)
    np.testing.assert_array_equal(splits.test.class_counts(), [200, 200, 200])


def test_synthetic_is_deterministic_given_the_seed():
    a = data.load("synthetic", n=200, seed=1)
    b = data.load("synthetic", n=200, seed=1)
    c = data.load("synthetic", n=200, seed=2)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.ids, b.test.ids)
    assert not np.array_equal(a.train.x[:10], c.train.x[:10])
    assert a.train.input_shape == (16,) and a.num_classes == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"classes": 1}, ValueError, r"classes >= 2 and n >= 2 \* classes"),
        ({"n": 5, "classes": 3}, ValueError, r"got n=5, classes=3"),
        ({"dim": 0}, ValueError, r"dim must be an integer >= 1"),
        ({"separation": -1.0}, ValueError, r"separation must be a finite number > 0"),
        ({"test_fraction": 1.0}, ValueError, r"test_fraction must lie in \(0.0, 1.0\)"),
        ({"seed": -1}, ValueError, r"seed must be an integer >= 0"),
        ({"size": 10}, TypeError, r"unexpected keyword arguments \['size'\].*'n', 'dim'"),
    ],
)
def test_synthetic_invalid_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        data.load("synthetic", **kwargs)


# ---- load() errors -----------------------------------------------------------------------------
def test_unknown_name_lists_the_valid_names():
    with pytest.raises(
        ValueError, match=r"'diabetes', 'digits', 'facts', 'synthetic', 'tfds:<NAME>'"
    ):
        data.load("cifar10")
    with pytest.raises(ValueError, match=r"needs a data set name after the colon"):
        data.load("tfds:")
    with pytest.raises(TypeError, match="name must be a string"):
        data.load(3)


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, -0.2, 1.5])
def test_digits_bad_test_fraction(test_fraction):
    with pytest.raises(ValueError, match=r"test_fraction must lie in \(0.0, 1.0\)"):
        data.load("digits", test_fraction=test_fraction)


def test_split_indices_stratifies_with_largest_remainders():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    train, test = loaders.split_indices(10, 0.3, np.random.default_rng(0), labels)
    # Quotas 1.5, 0.9, 0.6 -> floors 1, 0, 0 and two extra slots to the largest remainders (1, 2).
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=3), [1, 1, 1])
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(10))


# ---- TensorFlow Datasets -----------------------------------------------------------------------
def test_tfds_through_mock_data():
    with tfds.testing.mock_data(num_examples=9):
        splits = data.load("tfds:mnist")
        reference = tfds.data_source("mnist", split="train", download=False)
        expected_x = np.stack([reference[i]["image"] for i in range(9)]) / 255.0
        expected_y = np.array([reference[i]["label"] for i in range(9)])
    assert splits.name == "tfds:mnist" and splits.num_classes == 10
    assert (len(splits.train), len(splits.test)) == (9, 9)
    train = splits.train
    assert train.x.shape == (9, 28, 28, 1) and train.x.dtype == np.float32
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0
    np.testing.assert_allclose(train.x, expected_x, rtol=1e-6)
    np.testing.assert_array_equal(train.y, expected_y)
    # Train ids are record indices; test ids follow the whole train split.
    np.testing.assert_array_equal(train.ids, np.arange(9))
    np.testing.assert_array_equal(splits.test.ids, 9 + np.arange(9))
    assert splits.info["input_shape"] == [28, 28, 1] and splits.info["id_offsets"] == [0, 9]


def test_tfds_max_examples_keeps_the_first_records_and_their_ids():
    with tfds.testing.mock_data(num_examples=20):
        full = data.load("tfds:mnist")
        small = data.load("tfds:mnist", max_examples=4)
    assert (len(small.train), len(small.test)) == (4, 4)
    np.testing.assert_array_equal(small.train.x, full.train.x[:4])
    np.testing.assert_array_equal(small.test.ids, [20, 21, 22, 23])


def test_tfds_unprepared_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(RuntimeError, match=r"must be prepared first.*tfds build mnist"):
        data.load("tfds:mnist", data_dir=str(tmp_path))


def test_tfds_errors():
    with pytest.raises(ValueError, match="no data set named 'no_such_set_xyz'"):
        data.load("tfds:no_such_set_xyz")
    with pytest.raises(ValueError, match=r"split must be a pair of TFDS split names"):
        data.load("tfds:mnist", split="train")
    with pytest.raises(ValueError, match=r"max_examples must be an integer >= 1"):
        data.load("tfds:mnist", max_examples=0)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['seed'\]"):
        data.load("tfds:mnist", seed=0)
    with (
        tfds.testing.mock_data(num_examples=3),
        pytest.raises(ValueError, match=r"no feature 'img'; its features are \['image', 'label'\]"),
    ):
        data.load("tfds:mnist", image_key="img")


# ---- documentation -----------------------------------------------------------------------------
@pytest.mark.parametrize("module", [data, dataset, loaders, forget, batching])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
