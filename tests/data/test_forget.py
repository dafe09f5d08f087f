"""Tests of unlearn_jax.data.forget: forget-set selectors, spec parsing and the ids hash."""

import hashlib
import json
import struct

import numpy as np
import pytest

from unlearn_jax import data
from unlearn_jax.data import Dataset


@pytest.fixture(scope="module")
def train():
    return data.load("digits").train


def small(n=10, num_classes=2):
    return Dataset(
        x=np.arange(n, dtype=np.float32)[:, None],
        y=np.arange(n) % num_classes,
        ids=np.arange(n) * 10,
        name="small",
        num_classes=num_classes,
    )


def check_partition(split, train):
    """forget and retain are disjoint, in training order, and together the training set."""
    assert len(split.forget) + len(split.retain) == len(train)
    assert not np.intersect1d(split.forget.ids, split.retain.ids).size
    np.testing.assert_array_equal(
        np.sort(np.concatenate([split.forget.ids, split.retain.ids])), np.sort(train.ids)
    )
    for part in (split.forget, split.retain):
        positions = train.positions(part.ids)
        assert np.all(np.diff(positions) > 0)
        np.testing.assert_array_equal(part.x, train.x[positions])
        np.testing.assert_array_equal(part.y, train.y[positions])


# ---- class -------------------------------------------------------------------------------------
def test_class_forget_takes_the_whole_class(train):
    split = data.class_forget(train, 3)
    check_partition(split, train)
    assert split.spec == "class:3"
    assert np.all(split.forget.y == 3) and not np.any(split.retain.y == 3)
    assert len(split.forget) == int(np.sum(train.y == 3))
    assert split.forget.name == "digits/train/forget" and split.retain.name == "digits/train/retain"
    assert split.forget.num_classes == 10


def test_class_forget_errors(train):
    with pytest.raises(
        ValueError, match=r"class 7 has no examples in small; the classes present are \[0, 1\]"
    ):
        data.class_forget(small(), 7)
    one_class = Dataset(
        x=np.zeros((3, 1)), y=np.zeros(3, int), ids=np.arange(3), name="one", num_classes=2
    )
    with pytest.raises(ValueError, match=r"'class:0' is all 3 examples of one, so the retain set"):
        data.class_forget(one_class, 0)
    regression = Dataset(x=np.zeros((3, 1)), y=np.zeros(3), ids=np.arange(3), name="reg")
    with pytest.raises(ValueError, match="needs classification data, but reg is regression"):
        data.class_forget(regression, 0)
    with pytest.raises(ValueError, match="cls must be an integer class label"):
        data.class_forget(train, 1.5)
    with pytest.raises(TypeError, match=r"train must be an unlearn_jax\.data\.Dataset"):
        data.class_forget(train.x, 3)


# ---- random ------------------------------------------------------------------------------------
def test_random_forget_size_and_determinism(train):
    split = data.random_forget(train, 0.1, seed=4)
    check_partition(split, train)
    assert len(split.forget) == 144  # round(0.1 * 1437) = round(143.7)
    assert split.spec == "random:0.1@seed4"
    again = data.random_forget(train, 0.1, seed=4)
    np.testing.assert_array_equal(split.forget.ids, again.forget.ids)
    other = data.random_forget(train, 0.1, seed=5)
    assert not np.array_equal(split.forget.ids, other.forget.ids)


def test_random_forget_depends_on_ids_not_row_order(train):
    shuffled = train.take(np.random.default_rng(0).permutation(len(train)))
    a = data.random_forget(train, 0.05, seed=1)
    b = data.random_forget(shuffled, 0.05, seed=1)
    np.testing.assert_array_equal(np.sort(a.forget.ids), np.sort(b.forget.ids))


def test_random_forget_takes_at_least_one_example():
    split = data.random_forget(small(), 0.01)
    assert len(split.forget) == 1 and len(split.retain) == 9


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_random_forget_fraction_outside_unit_interval(train, fraction):
    with pytest.raises(ValueError, match=r"fraction must lie in \(0.0, 1.0\)"):
        data.random_forget(train, fraction)


def test_random_forget_errors():
    with pytest.raises(ValueError, match=r"'random:0.96@seed0' is all 10 examples of small"):
        data.random_forget(small(), 0.96)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got seed=-1"):
        data.random_forget(small(), 0.5, seed=-1)
    with pytest.raises(ValueError, match=r"has 1 examples; a forget/retain split needs >= 2"):
        data.random_forget(small().take([0]), 0.5)


# ---- ids ---------------------------------------------------------------------------------------
def test_ids_forget(train):
    ids = train.ids[[40, 3, 17]]
    split = data.ids_forget(train, ids)
    check_partition(split, train)
    np.testing.assert_array_equal(split.forget.ids, np.sort(ids))  # training order = sorted here
    assert split.spec == f"ids:3@{data.forget_ids_hash(ids)[:12]}"


def test_ids_forget_errors():
    ds = small()
    with pytest.raises(
        ValueError, match=r"ids not in small \(10 examples\): \[5, 7\] \(2 in all\)"
    ):
        data.ids_forget(ds, [10, 5, 7])
    with pytest.raises(ValueError, match=r"is empty: no ids were given"):
        data.ids_forget(ds, [])
    with pytest.raises(ValueError, match=r"forget ids must not repeat, got \[20\]"):
        data.ids_forget(ds, [20, 30, 20])
    with pytest.raises(ValueError, match=r"is all 10 examples of small, so the retain set"):
        data.ids_forget(ds, ds.ids)


# ---- predicate ---------------------------------------------------------------------------------
def test_predicate_forget_selects_a_sub_population(train):
    def bright_sevens(x, y, ids):
        del ids
        return (y == 7) & (x.mean(axis=(1, 2, 3)) > 0.3)

    split = data.predicate_forget(train, bright_sevens, name="bright7")
    check_partition(split, train)
    expected = (train.y == 7) & (train.x.reshape(len(train), -1).mean(axis=1) > 0.3)
    np.testing.assert_array_equal(split.forget.ids, train.ids[expected])
    assert 0 < len(split.forget) < np.sum(train.y == 7)
    assert split.spec == "predicate:bright7"


def test_predicate_forget_errors():
    ds = small()
    with pytest.raises(
        ValueError, match=r"must return a boolean mask of shape \(10,\), got dtype int64"
    ):
        data.predicate_forget(ds, lambda x, y, ids: (y == 1).astype(np.int64))
    with pytest.raises(ValueError, match=r"shape \(10,\), got dtype bool shape \(5,\)"):
        data.predicate_forget(ds, lambda x, y, ids: np.ones(5, bool))
    with pytest.raises(ValueError, match=r"'predicate:nothing' is empty"):
        data.predicate_forget(ds, lambda x, y, ids: ids < 0, name="nothing")
    with pytest.raises(ValueError, match=r"is all 10 examples"):
        data.predicate_forget(ds, lambda x, y, ids: ids >= 0)
    with pytest.raises(TypeError, match="predicate must be callable"):
        data.predicate_forget(ds, "y == 1")


# ---- select_forget -----------------------------------------------------------------------------
def test_select_forget_matches_the_selectors(train):
    a, b = data.select_forget(train, "class:3"), data.class_forget(train, 3)
    np.testing.assert_array_equal(a.forget.ids, b.forget.ids)
    assert a.spec == b.spec
    a, b = data.select_forget(train, "random:0.2", seed=7), data.random_forget(train, 0.2, seed=7)
    np.testing.assert_array_equal(a.forget.ids, b.forget.ids)
    # A canonical random spec reproduces its own split, whatever the seed argument.
    c = data.select_forget(train, b.spec, seed=0)
    np.testing.assert_array_equal(c.forget.ids, b.forget.ids)
    assert c.spec == b.spec == "random:0.2@seed7"
    first, second, third = (int(i) for i in train.ids[[9, 0, 4]])
    d = data.select_forget(train, f" IDS: {first}, {second} ,{third} ")
    np.testing.assert_array_equal(d.forget.ids, sorted([first, second, third]))


def test_select_forget_reads_id_files(tmp_path):
    ds = small()
    text = tmp_path / "forget.txt"
    text.write_text("# the ids to forget\n10, 20\n30  # and one more\n\n")
    np.testing.assert_array_equal(data.select_forget(ds, f"ids:{text}").forget.ids, [10, 20, 30])
    listed = tmp_path / "forget.json"
    listed.write_text(json.dumps([40, 0]))
    np.testing.assert_array_equal(data.select_forget(ds, f"ids:{listed}").forget.ids, [0, 40])
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"ids": [90], "note": "x"}))
    np.testing.assert_array_equal(data.select_forget(ds, f"ids:{keyed}").forget.ids, [90])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1, 2, x3", r"non-integer entries: \['x3'\]"),
        ("[1, 2.5]", r"must hold a JSON list of integers"),
        ('{"forget": [1]}', r"without an 'ids' key \(keys: \['forget'\]\)"),
        ("[1, 2", r"looks like JSON but does not parse"),
    ],
)
def test_bad_id_files(tmp_path, content, message):
    path = tmp_path / "ids.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        data.select_forget(small(), f"ids:{path}")


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", r"bad forget spec ''"),
        ("class", r"bad forget spec 'class'"),
        ("class:three", r"the class must be a non-negative integer"),
        ("random:", r"bad forget spec 'random:'"),
        ("random:ten", r"the fraction must be a number"),
        ("random:0.1@3", r"the fraction must be a number"),
        (
            "ids:/no/such/file",
            r"'/no/such/file' is neither a list of integers nor an existing file",
        ),
        ("predicate:odd", r"a predicate cannot be given as a string"),
        ("first:10", r"unknown mode 'first'"),
        (3, r"not a string"),
    ],
)
def test_select_forget_bad_specs_list_the_forms(spec, reason):
    with pytest.raises(ValueError, match=reason) as info:
        data.select_forget(small(), spec)
    assert "'class:<int>'" in str(info.value) and "'ids:<int>,<int>,...'" in str(info.value)


def test_select_forget_passes_selector_errors_through():
    with pytest.raises(ValueError, match=r"fraction must lie in \(0.0, 1.0\), got fraction=1.5"):
        data.select_forget(small(), "random:1.5")
    with pytest.raises(ValueError, match=r"class 9 has no examples"):
        data.select_forget(small(), "class:9")
    with pytest.raises(ValueError, match=r"ids not in small.*\[3\]"):
        data.select_forget(small(), "ids:3")


# ---- forget_ids_hash ---------------------------------------------------------------------------
def test_forget_ids_hash_is_sha256_of_sorted_int64():
    reference = hashlib.sha256(struct.pack("<3q", 0, 1, 2)).hexdigest()
    assert data.forget_ids_hash([2, 0, 1]) == reference
    # A fixed value guards the format that saved checkpoints depend on.
    assert reference == "ab25350e3e65efebe24584461683ecda68725576e825e550038b90e7b1479946"
    assert data.forget_ids_hash(np.array([1, 2, 0], np.int32)) == reference
    assert data.forget_ids_hash([0, 1, 2, 2]) == reference  # a set: repeats do not count
    assert data.forget_ids_hash([0, 1, 3]) != reference
    ds = Dataset(x=np.zeros((3, 1)), y=np.zeros(3), ids=[2, 1, 0])
    assert data.forget_ids_hash(ds) == reference
    assert len(reference) == 64
