"""Tests of unlearn_jax.data.stream and unlearn_jax.data.multihost: streamed datasets give the batches
of the in-memory ones, keep their storage dtype until the device, read only what a batch needs, and
split global batches between processes."""

import doctest
import threading
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from unlearn_jax import data, sharding
from unlearn_jax.data import Dataset, StreamedDataset, multihost, stream

N, SIDE, CLASSES = 23, 4, 5


class Records:
    """Random-access records {"pixels": uint8 [4, 4, 1], "label": int64} counting every read."""

    def __init__(self, pixels, labels, weights=None):
        self.pixels, self.labels, self.weights = pixels, labels, weights
        self.reads = 0

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        self.reads += 1
        record = {"pixels": self.pixels[i], "label": self.labels[i]}
        if self.weights is not None:
            record["weights"] = self.weights[i]
        return record


def images(n=N, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, SIDE, SIDE, 1), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n).astype(np.int64)
    return pixels, labels


def pair(n=N, prefetch=2):
    """The same examples streamed (uint8 records, / 255 on the device) and in memory (as loaders do:
    float32 pixel / 255 on the host); ids 1000 + 3 i."""
    pixels, labels = images(n)
    ids = 1000 + 3 * np.arange(n)
    source = Records(pixels, labels)
    streamed = StreamedDataset(
        source,
        ids=ids,
        name="toy",
        num_classes=CLASSES,
        x_key="pixels",
        y_key="label",
        x_divisor=255.0,
        prefetch=prefetch,
    )
    memory = Dataset(pixels.astype(np.float32) / 255.0, labels, ids, "toy", CLASSES)
    return streamed, memory


def host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def assert_same_batches(got, expected):
    got, expected = list(got), list(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        if isinstance(a, tuple):  # (batch, mask)
            np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
            a, b = a[0], b[0]
        a, b = host(a), host(b)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit


# ---- the same batches as in memory -----------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 2])
def test_padded_batches_equal_the_in_memory_ones(prefetch):
    streamed, memory = pair(prefetch=prefetch)
    key = jax.random.key(4)
    assert_same_batches(
        data.padded_batches(streamed, 8, key=key), data.padded_batches(memory, 8, key=key)
    )


def test_batches_and_batch_stream_equal_the_in_memory_ones():
    streamed, memory = pair()
    key = jax.random.key(1)
    assert_same_batches(data.batches(streamed, 5), data.batches(memory, 5))
    assert_same_batches(
        data.batches(streamed, 5, key=key, drop_remainder=True),
        data.batches(memory, 5, key=key, drop_remainder=True),
    )
    s, m = data.batch_stream(streamed, 10, key=key), data.batch_stream(memory, 10, key=key)
    assert_same_batches([next(s) for _ in range(5)], [next(m) for _ in range(5)])  # 2+ epochs
    s.close()


def test_driver_orders_are_views_with_the_in_memory_batches():
    streamed, memory = pair()
    reads = streamed.source.reads
    s_split, m_split = data.class_forget(streamed, 2), data.class_forget(memory, 2)
    s_train = data.concat(data.by_class(s_split.retain), data.by_class(s_split.forget), "train")
    m_train = data.concat(data.by_class(m_split.retain), data.by_class(m_split.forget), "train")
    assert isinstance(s_train, StreamedDataset) and s_train.source is streamed.source
    # Labels are read once for every view; selecting, ordering and concatenating read no record.
    assert streamed.source.reads == reads + N
    np.testing.assert_array_equal(s_train.ids, m_train.ids)
    np.testing.assert_array_equal(s_train.y, m_train.y)
    assert s_split.spec == m_split.spec
    assert data.forget_ids_hash(s_split.forget) == data.forget_ids_hash(m_split.forget)
    assert_same_batches(data.batches(s_train, 6), data.batches(m_train, 6))
    picked = [m_train.ids[5], m_train.ids[0]]
    assert_same_batches(
        data.batches(s_train.by_ids(picked), 2), data.batches(m_train.by_ids(picked), 2)
    )
    assert_same_batches(
        data.batches(s_train.without_ids(picked), 7), data.batches(m_train.without_ids(picked), 7)
    )
    mask = np.arange(N) % 3 == 0
    np.testing.assert_array_equal(s_train.subset(mask).ids, m_train.subset(mask).ids)
    np.testing.assert_array_equal(s_train.class_counts(), m_train.class_counts())


def test_concat_with_another_source_or_an_in_memory_dataset():
    streamed, memory = pair()
    pixels, labels = images(4, seed=9)
    other = StreamedDataset(
        Records(pixels, labels),
        ids=[1, 2, 4, 5],
        num_classes=CLASSES,
        x_key="pixels",
        y_key="label",
        x_divisor=255.0,
    )
    joined = data.concat(streamed, other)
    expected = data.concat(memory, Dataset(pixels / 255.0, labels, [1, 2, 4, 5], "", CLASSES))
    np.testing.assert_array_equal(joined.y, expected.y)
    assert_same_batches(data.batches(joined, 9), data.batches(expected, 9))
    # In-memory float inputs and uint8 records are stored differently: no silent conversion.
    with pytest.raises(ValueError, match=r"differ in stored input dtype: uint8 vs float32"):
        data.concat(streamed, Dataset(pixels / 255.0, labels, [1, 2, 4, 5], "", CLASSES))
    with pytest.raises(ValueError, match=r"ids must be unique, but these repeat: \[1000"):
        data.concat(streamed, streamed.take([0]))


def test_sequence_and_regression_datasets():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 50, (9, 6)).astype(np.int64)
    targets = rng.integers(0, 50, (9, 6)).astype(np.int64)
    weights = (rng.random((9, 6)) > 0.5).astype(np.float64)
    seq = StreamedDataset(
        Records(tokens, targets, weights),
        num_classes=50,
        x_key="pixels",
        y_key="label",
        weights_key="weights",
    )
    memory = Dataset(tokens, targets, np.arange(9), "", 50, weights)
    assert seq.kind == "sequence" and seq.x.dtype == np.int32 and seq.y.shape == (9, 6)
    key = jax.random.key(0)
    assert_same_batches(
        data.padded_batches(seq, 4, key=key), data.padded_batches(memory, 4, key=key)
    )

    values = rng.standard_normal((7, 3))
    y = rng.standard_normal((7, 2))
    reg = StreamedDataset(Records(values, y), x_key="pixels", y_key="label")
    assert reg.kind == "regression" and reg.x.dtype == np.float32
    assert_same_batches(data.batches(reg, 3), data.batches(Dataset(values, y, np.arange(7)), 3))


def test_to_dataset_and_lazy_columns():
    streamed, memory = pair()
    copy = streamed.to_dataset()
    np.testing.assert_array_equal(copy.x, memory.x)
    np.testing.assert_array_equal(copy.ids, memory.ids)
    assert streamed.x.shape == memory.x.shape and streamed.x.dtype == memory.x.dtype
    np.testing.assert_array_equal(streamed.x[:1], memory.x[:1])
    np.testing.assert_array_equal(streamed.x[[4, -1]], memory.x[[4, -1]])
    np.testing.assert_array_equal(streamed.x[7], memory.x[7])
    assert np.shape(streamed.x)[1:] == (SIDE, SIDE, 1)
    with pytest.raises(TypeError, match=r"x of toy is streamed .* \.to_dataset\(\)"):
        np.asarray(streamed.x)
    with pytest.raises(IndexError, match=r"indexed by rows only"):
        streamed.x[:, 0]


# ---- storage dtype until the device ----------------------------------------------------------------
def test_uint8_reaches_the_device_as_uint8_and_converts_exactly():
    streamed, _ = pair()
    batch = streamed.read_batch([0, 1])
    assert batch["x"].dtype == np.uint8 and streamed.storage_dtype == np.uint8
    jaxpr = jax.make_jaxpr(lambda x: stream.inputs_as_float(x, 255.0))(batch["x"])
    assert jaxpr.in_avals[0].dtype == jnp.uint8  # the transfer is uint8
    values = np.arange(256, dtype=np.uint8)
    expected = values.astype(np.float32) / 255.0  # today's loaders
    got = np.asarray(stream.inputs_as_float(jnp.asarray(values), 255.0))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)  # bit for bit, all 256 pixel values


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.bool_])
def test_narrow_integers_convert_through_the_exact_table(dtype):
    info = (0, 1) if dtype == np.bool_ else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    values = np.linspace(*info, 300).astype(dtype)
    got = np.asarray(stream.inputs_as_float(jnp.asarray(values), 7.0))
    np.testing.assert_array_equal(got, values.astype(np.float32) / np.float32(7.0))


def test_wide_integers_convert_within_one_ulp():
    values = np.arange(-(2**20), 2**20, 997, dtype=np.int32)
    got = np.asarray(stream.inputs_as_float(jnp.asarray(values), 255.0))
    expected = values.astype(np.float32) / np.float32(255.0)
    assert np.max(np.abs(got - expected) / np.spacing(np.abs(expected) + 1e-30)) <= 1.0


# ---- memory and reads ------------------------------------------------------------------------------
class Generated:
    """1e6 records of 28 x 28 uint8 (784 MB in all), each made when it is read."""

    def __init__(self, n=1_000_000):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return {"x": np.full((28, 28, 1), i % 251, np.uint8), "y": i % 10}


def test_a_large_source_is_never_held_in_memory():
    source = Generated()
    whole = source.n * 28 * 28
    tracemalloc.start()
    try:
        ds = StreamedDataset(source, num_classes=10, x_divisor=255.0, prefetch=2)
        # Dataset order: jax.random.permutation of 1e6 takes seconds on a CPU; keyed orders are
        # checked on small sets above.
        batches = data.padded_batches(ds, 256)
        seen = [np.asarray(next(batches)[0]["id"]) for _ in range(8)]
        batches.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ids and record indices ([N] int64 each) and the epoch's permutation are held, never the
    # records: 8 batches of 200 kB, the permutation and the index arrays stay far below 784 MB.
    assert peak < 64e6, f"peak {peak / 1e6:.0f} MB for a {whole / 1e6:.0f} MB data set"
    # One read for the record spec, then the rows of the batches used and at most `prefetch` +
    # one more batches read ahead.
    assert source.reads <= 1 + (8 + 3) * 256
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(8 * 256))


def test_reads_happen_in_a_background_thread_and_errors_surface():
    reader_threads = set()

    class Spy(Records):
        def __getitem__(self, i):
            reader_threads.add(threading.current_thread().name)
            if i == 20:
                raise OSError("disk gone")
            return super().__getitem__(i)

    pixels, labels = images()
    ds = StreamedDataset(Spy(pixels, labels), num_classes=CLASSES, x_key="pixels", y_key="label")
    reader_threads.clear()
    it = data.batches(ds, 8)
    next(it)
    assert reader_threads and all(name.startswith("unlearn_jax-read") for name in reader_threads)
    with pytest.raises(OSError, match="disk gone"):
        list(it)
    # An endless stream dropped after one batch leaves no reader thread behind.
    endless = data.batch_stream(ds.take(np.arange(16)), 4)
    next(endless)
    endless.close()
    for thread in threading.enumerate():
        if thread.name.startswith("unlearn_jax-read"):
            thread.join(timeout=10)
    assert not any(t.name.startswith("unlearn_jax-read") for t in threading.enumerate())


# ---- TFDS data_source ------------------------------------------------------------------------------
def test_tfds_streamed_through_mock_data():
    with tfds.testing.mock_data(num_examples=9):
        streamed = data.load("tfds:mnist", streamed=True)
        memory = data.load("tfds:mnist")
        assert isinstance(streamed.train, StreamedDataset)
        assert streamed.train.storage_dtype == np.uint8 and streamed.train.x.shape == (9, 28, 28, 1)
        np.testing.assert_array_equal(streamed.test.ids, memory.test.ids)
        np.testing.assert_array_equal(streamed.train.y, memory.train.y)
        key = jax.random.key(2)
        assert_same_batches(
            data.padded_batches(streamed.train, 4, key=key),
            data.padded_batches(memory.train, 4, key=key),
        )
        small = data.load("tfds:mnist", streamed=True, max_examples=4)
        np.testing.assert_array_equal(small.test.ids, [9, 10, 11, 12])
        np.testing.assert_array_equal(small.train.to_dataset().x, memory.train.x[:4])
    assert (
        streamed.info["streamed"] and streamed.info["scaling"] == "uint8 inputs / 255 on the device"
    )
    assert streamed.info["input_shape"] == [28, 28, 1] and streamed.info["num_train"] == 9
    with pytest.raises(ValueError, match=r"streamed must be True or False"):
        data.load("tfds:mnist", streamed="yes")


# ---- multi-host ------------------------------------------------------------------------------------
# n = N: one compiled permutation for the whole file; key None for an exact multiple of the batch.
@pytest.mark.parametrize(
    ("n", "global_batch", "keyed"), [(N, 8, True), (N, 2, True), (N, 64, True), (24, 6, False)]
)
def test_process_rows_are_disjoint_and_cover_each_global_batch(n, global_batch, keyed):
    key = jax.random.key(5) if keyed else None
    parts = [
        multihost.process_rows(n, global_batch, key=key, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert parts[0].shape == parts[1].shape == (-(-n // global_batch), global_batch // 2)
    real = [part[part >= 0] for part in parts]
    assert not set(real[0]) & set(real[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(real)), np.arange(n))
    # Side by side, the parts are the global batches of padded_batches' order.
    order = np.asarray(jax.random.permutation(key, n)) if keyed else np.arange(n)
    glued = np.concatenate(parts, axis=1).reshape(-1)
    np.testing.assert_array_equal(glued[:n], order)
    assert np.all(glued[n:] == -1)


def test_fake_two_process_split_reads_disjoint_rows_that_make_the_global_batch():
    streamed, memory = pair()
    key = jax.random.key(6)
    before = streamed.source.reads
    parts = [
        list(data.process_batches(streamed, 8, key=key, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert streamed.source.reads - before == N  # every example read once, by one process
    expected = list(data.padded_batches(memory, 8, key=key))
    for (b0, m0), (b1, m1), (batch, mask) in zip(*parts, expected, strict=True):
        assert b0["x"].dtype == np.uint8 and b0["x"].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([m0, m1]), np.asarray(mask))
        np.testing.assert_array_equal(np.concatenate([b0["id"], b1["id"]]), np.asarray(batch["id"]))
        x = stream.host_inputs(np.concatenate([b0["x"], b1["x"]]), 255.0)
        np.testing.assert_array_equal(x, np.asarray(batch["x"]))


def test_global_batches_in_one_process_equal_padded_batches():
    streamed, memory = pair()
    mesh = sharding.data_mesh()
    key = jax.random.key(7)
    got = list(data.global_batches(streamed, 8, mesh=mesh, key=key))
    for batch, mask in got:
        for leaf in (*batch.values(), mask):
            assert leaf.sharding.is_equivalent_to(sharding.batch_sharding(mesh), leaf.ndim)
    assert_same_batches(got, data.padded_batches(memory, 8, key=key))
    local = {"x": np.zeros((4, 2)), "id": np.arange(4)}
    placed = data.make_global(local, mesh)
    np.testing.assert_array_equal(np.asarray(placed["id"]), np.arange(4))


def test_multihost_errors():
    streamed, _ = pair()
    with pytest.raises(
        ValueError, match=r"global_batch_size=7 must be divisible by process_count=2"
    ):
        multihost.process_rows(10, 7, process_index=0, process_count=2)
    with pytest.raises(
        ValueError, match=r"0 <= process_index < process_count, got process_index=2"
    ):
        multihost.process_rows(10, 8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"global_batch_size must be an integer >= 1"):
        multihost.process_rows(10, 0)
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key"):
        data.process_batches(streamed, 8, key=3)
    with pytest.raises(ValueError, match=r"local_batch leaves disagree on the batch size"):
        data.make_global({"x": np.zeros((4, 2)), "id": np.arange(3)}, sharding.data_mesh())


# ---- errors ----------------------------------------------------------------------------------------
def test_construction_errors_name_the_problem():
    pixels, labels = images(4)
    source = Records(pixels, labels)
    with pytest.raises(TypeError, match=r"source must support len\(source\) and source\[i\]"):
        StreamedDataset(object())
    with pytest.raises(ValueError, match=r"the source has no records"):
        StreamedDataset([])
    with pytest.raises(ValueError, match=r"record 0 has no field 'x' for x; its fields are"):
        StreamedDataset(source, num_classes=CLASSES)
    with pytest.raises(ValueError, match=r"ids must be unique, but these repeat: \[7\]"):
        StreamedDataset(source, ids=[7, 7, 1, 2], x_key="pixels", y_key="label", num_classes=5)
    with pytest.raises(ValueError, match=r"rows must be record indices in \[0, 4\), got \[9\]"):
        StreamedDataset(source, rows=[9], ids=[0], x_key="pixels", y_key="label", num_classes=5)
    with pytest.raises(ValueError, match=r"ids \(3\) and rows \(4\) must have one entry"):
        StreamedDataset(source, ids=[1, 2, 3], x_key="pixels", y_key="label", num_classes=5)
    floats = Records(pixels / 255.0, labels)
    with pytest.raises(ValueError, match=r"x_divisor scales integer inputs .* stored as float64"):
        StreamedDataset(floats, x_key="pixels", y_key="label", num_classes=5, x_divisor=255.0)
    with pytest.raises(ValueError, match=r"needs num_classes = the vocabulary size"):
        StreamedDataset(source, x_key="pixels", y_key="label", weights_key="w")
    with pytest.raises(ValueError, match=r"prefetch must be an integer >= 0, got prefetch=-1"):
        StreamedDataset(source, x_key="pixels", y_key="label", num_classes=5, prefetch=-1)
    with pytest.raises(ValueError, match=r"labels must hold the target of every record"):
        StreamedDataset(source, x_key="pixels", y_key="label", num_classes=5, labels=[1, 2])


def test_bad_records_are_named_when_read():
    pixels, labels = images(6)
    labels[4] = 9  # outside [0, 5)
    ds = StreamedDataset(
        Records(pixels, labels),
        ids=100 + np.arange(6),
        x_key="pixels",
        y_key="label",
        num_classes=5,
    )
    with pytest.raises(
        ValueError, match=r"targets y must lie in \[0, 5\); examples with ids \[104\]"
    ):
        list(data.batches(ds, 3))
    with pytest.raises(ValueError, match=r"targets y must lie in \[0, 5\); examples at record"):
        _ = ds.y

    class Ragged(Records):
        def __getitem__(self, i):
            record = super().__getitem__(i)
            return {**record, "pixels": record["pixels"][:2]} if i == 3 else record

    ragged = StreamedDataset(
        Ragged(*images(6)), ids=100 + np.arange(6), x_key="pixels", y_key="label", num_classes=5
    )
    with pytest.raises(ValueError, match=r"record 3 \(id 103\) has x of shape \(2, 4, 1\)"):
        ragged.read_batch([2, 3])
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 6\)"):
        ragged.read_batch([6])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        ragged.take([6])


@pytest.mark.parametrize("module", [stream, multihost])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
