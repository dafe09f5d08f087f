"""Named data sets as train/test :class:`Splits` with stable example ids.

``load(name, **kwargs)`` knows:

* ``"digits"``: scikit-learn's 8x8 handwritten digits (embedded in scikit-learn, no download).
* ``"diabetes"``: scikit-learn's diabetes regression data (embedded).
* ``"synthetic"``: a Gaussian mixture classification problem of any size.
* ``"facts"``: fictitious authors and world facts as question-answer token sequences
  (:mod:`unlearn_jax.data.facts`; generated, no download). ``train`` is what a model learns, ``test``
  the holdout authors; the variants and forget requests are on
  :func:`unlearn_jax.data.facts.generate_facts`'s result.
* ``"tfds:NAME"``: any TensorFlow Datasets set with an image (or feature) key and a label key, read
  through ``tfds.data_source`` (random access over ``array_record`` files; TensorFlow not needed),
  into memory or, with ``streamed=True``, batch by batch (:mod:`unlearn_jax.data.stream`).

The sklearn-backed and synthetic sets are split by one rule (:func:`split_indices`): a
deterministic, seeded split whose test part has ``ceil(test_fraction * N)`` examples, stratified by
class for classification. Their ids are row indices into the full (unsplit) array, so train and test
ids are disjoint and the same example has the same id in every call.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from unlearn_jax import _validate
from unlearn_jax.data.dataset import Dataset, Splits
from unlearn_jax.data.facts import generate_facts
from unlearn_jax.data.stream import StreamedDataset

TFDS_PREFIX = "tfds:"


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got seed={seed!r}.")


def split_indices(
    n: int, test_fraction: float, rng: np.random.Generator, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions ``0..n-1`` into sorted train and test positions.

    The test part has ``n_test = ceil(test_fraction * n)`` positions (clipped to ``[1, n - 1]``). With
    ``labels`` the split is stratified: class ``c`` with ``n_c`` examples gets ``floor(n_c * n_test /
    n)`` test examples, and the remaining test slots go to the classes with the largest fractional
    parts (ties to the smaller class). Within each class the test examples are a uniformly random
    subset drawn from ``rng``.

    Args:
      n: number of examples, >= 2.
      test_fraction: the fraction of examples in the test part, in ``(0, 1)``.
      rng: the numpy generator that draws the split.
      labels: optional ``[n]`` integer class labels to stratify by.

    Returns:
      ``(train_positions, test_positions)``, each sorted ascending, disjoint, covering ``0..n-1``.
    """
    _validate.in_interval("test_fraction", test_fraction, 0.0, 1.0)
    if n < 2:
        raise ValueError(f"need at least 2 examples to split into train and test, got n={n}.")
    # Rounding to 9 digits first keeps e.g. ceil(0.2 * 1000) at 200 despite float error.
    n_test = min(max(math.ceil(round(test_fraction * n, 9)), 1), n - 1)
    if labels is None:
        test = rng.permutation(n)[:n_test]
    else:
        classes, counts = np.unique(labels, return_counts=True)
        exact = counts * n_test / n
        quota = np.floor(exact).astype(np.int64)
        extra = n_test - int(quota.sum())
        quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
        test = np.concatenate(
            [
                rng.permutation(np.flatnonzero(labels == c))[:q]
                for c, q in zip(classes, quota, strict=True)
            ]
        )
    is_test = np.zeros(n, bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _make_splits(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int | None,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    info: dict,
) -> Splits:
    ids = np.arange(x.shape[0], dtype=np.int64)
    train = Dataset(x[train_idx], y[train_idx], ids[train_idx], f"{name}/train", num_classes)
    test = Dataset(x[test_idx], y[test_idx], ids[test_idx], f"{name}/test", num_classes)
    info = {
        **info,
        "kind": train.kind,
        "num_classes": num_classes,
        "input_shape": list(train.input_shape),
        "num_train": len(train),
        "num_test": len(test),
    }
    return Splits(train=train, test=test, name=name, info=info)


# ---- scikit-learn ------------------------------------------------------------------------------
@functools.cache
def _sklearn_arrays(which: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    import sklearn.datasets

    if which == "digits":
        bunch = sklearn.datasets.load_digits()
    else:
        bunch = sklearn.datasets.load_diabetes(scaled=False)
    data, target = bunch.data.copy(), bunch.target.copy()
    data.setflags(write=False)
    target.setflags(write=False)
    return data, target, tuple(bunch.feature_names)


def _load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Handwritten digits, ``x [N, 8, 8, 1]`` float32 in ``[0, 1]`` (pixel / 16), 10 classes."""
    _check_seed(seed)
    data, target, _ = _sklearn_arrays("digits")
    x = (data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = target.astype(np.int32)
    train_idx, test_idx = split_indices(len(y), test_fraction, np.random.default_rng(seed), y)
    info = {
        "source": "sklearn.datasets.load_digits",
        "ids": "row index in sklearn's array",
        "split": "stratified by class",
        "test_fraction": test_fraction,
        "seed": int(seed),
        "scaling": "x = pixel / 16",
    }
    return _make_splits("digits", x, y, 10, train_idx, test_idx, info)


def _load_diabetes(*, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Diabetes progression regression: ``x [N, 10]``, ``y [N]``, both standardised.

    Features and target are standardised with the mean and (population) standard deviation of the
    *training* part, so no test statistics leak into training; ``info`` records them
    (``x_mean``, ``x_std``, ``y_mean``, ``y_std``): ``y_original = y * y_std + y_mean``.
    """
    _check_seed(seed)
    data, target, feature_names = _sklearn_arrays("diabetes")
    train_idx, test_idx = split_indices(len(target), test_fraction, np.random.default_rng(seed))
    x_mean, x_std = data[train_idx].mean(axis=0), data[train_idx].std(axis=0)
    y_mean, y_std = float(target[train_idx].mean()), float(target[train_idx].std())
    x = ((data - x_mean) / x_std).astype(np.float32)
    y = ((target - y_mean) / y_std).astype(np.float32)
    info = {
        "source": "sklearn.datasets.load_diabetes(scaled=False)",
        "ids": "row index in sklearn's array",
        "split": "uniformly random",
        "test_fraction": test_fraction,
        "seed": int(seed),
        "scaling": "standardised with training-set mean and std: x = (raw - x_mean) / x_std, "
        "y = (raw - y_mean) / y_std",
        "feature_names": list(feature_names),
        "x_mean": x_mean.tolist(),
        "x_std": x_std.tolist(),
        "y_mean": y_mean,
        "y_std": y_std,
    }
    return _make_splits("diabetes", x, y, None, train_idx, test_idx, info)


# ---- synthetic ---------------------------------------------------------------------------------
def _load_synthetic(
    *,
    n: int = 1000,
    dim: int = 16,
    classes: int = 4,
    seed: int = 0,
    test_fraction: float = 0.2,
    separation: float = 3.0,
) -> Splits:
    """A Gaussian mixture: ``x = mu[y] + noise``, ``noise ~ N(0, I_dim)``, ``x [n, dim]`` float32.

    The class means ``mu[c]`` are independent uniformly random directions scaled to norm
    ``separation`` (points on the sphere of that radius); labels are balanced (class sizes differ by at
    most one) and in random order. Everything, including the stratified split, is a function of
    ``seed``; ids are ``0..n-1`` in generation order.
    """
    _validate.positive_int(n=n, dim=dim, classes=classes)
    _validate.positive(separation=separation)
    _check_seed(seed)
    if classes < 2 or n < 2 * classes:
        raise ValueError(
            f"synthetic data needs classes >= 2 and n >= 2 * classes (two examples per class), "
            f"got n={n}, classes={classes}."
        )
    data_seq, split_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(data_seq)
    directions = rng.standard_normal((classes, dim))
    means = separation * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    y = rng.permutation(np.arange(n) % classes).astype(np.int32)
    x = (means[y] + rng.standard_normal((n, dim))).astype(np.float32)
    train_idx, test_idx = split_indices(n, test_fraction, np.random.default_rng(split_seq), y)
    info = {
        "source": "Gaussian mixture: x = mu[y] + N(0, I), |mu[c]| = separation",
        "ids": "generation index",
        "split": "stratified by class",
        "n": n,
        "dim": dim,
        "separation": float(separation),
        "test_fraction": test_fraction,
        "seed": int(seed),
    }
    return _make_splits("synthetic", x, y, classes, train_idx, test_idx, info)


# ---- TensorFlow Datasets -----------------------------------------------------------------------
def _prepare_hint(tfds_name: str) -> str:
    return (
        f"The data set must be prepared first, in the array_record format: on a machine with "
        f"internet run `tfds build {tfds_name} --file_format=array_record --data_dir=DIR` (or call "
        f"load('tfds:{tfds_name}', download=True) there), copy DIR to this machine if needed and "
        f"pass data_dir=DIR (or set TFDS_DATA_DIR)."
    )


def _load_tfds(
    tfds_name: str,
    *,
    split: Sequence[str] = ("train", "test"),
    data_dir: str | None = None,
    download: bool = False,
    max_examples: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    streamed: bool = False,
) -> Splits:
    """A TFDS data set read through ``tfds.data_source`` (no TensorFlow needed).

    Inputs: ``example[image_key]`` stacked into ``x``; uint8 inputs (images, ``[N, H, W, C]`` NHWC)
    are scaled to float32 in ``[0, 1]`` by ``/ 255``, other numeric inputs are cast to float32.
    Labels: ``example[label_key]``; a ``ClassLabel`` feature gives int32 labels and ``num_classes``
    from the builder info, any other feature float32 regression targets.

    ``streamed=True`` reads nothing up front (the first record of each split aside): train and test
    are :class:`~unlearn_jax.data.stream.StreamedDataset` views of the data sources, whose batches
    read their records only, carry uint8 images to the device and divide them by 255 there (the
    same float32 values as the in-memory path).

    Ids: the record index within the requested split, plus the full length of the splits listed
    before it. So ids of ``split=("train", "test")`` on MNIST are 0..59999 (train record index) and
    60000..69999 (60000 + test record index): disjoint, and stable as long as the same ``split``
    strings are used. ``max_examples`` keeps the first records of each split and does not change ids.
    """
    if not isinstance(streamed, bool):
        raise ValueError(f"streamed must be True or False, got streamed={streamed!r}.")
    if isinstance(split, str) or len(split) != 2 or not all(isinstance(s, str) for s in split):
        raise ValueError(
            f"split must be a pair of TFDS split names (train, test), e.g. ('train', 'test') or "
            f"('train[:90%]', 'train[90%:]'), got split={split!r}."
        )
    _validate.positive_int(max_examples=max_examples)
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("load('tfds:...') needs `pip install tensorflow-datasets`.") from err

    try:
        sources = tfds.data_source(
            tfds_name, split=list(split), data_dir=data_dir, download=download
        )
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"TensorFlow Datasets has no data set named {tfds_name!r}; see "
            "https://www.tensorflow.org/datasets/catalog for the names (e.g. 'tfds:mnist')."
        ) from None
    except Exception as err:
        detail = str(err).strip()
        detail = detail if len(detail) <= 600 else detail[:600] + " ..."
        raise RuntimeError(
            f"could not open TFDS data set {tfds_name!r} with split={tuple(split)!r}, "
            f"data_dir={data_dir!r}, download={download}.\n{_prepare_hint(tfds_name)}\n"
            f"TFDS said: {type(err).__name__}: {detail}"
        ) from err

    features = sources[0].dataset_info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(
                f"TFDS data set {tfds_name!r} has no feature {key!r}; its features are "
                f"{sorted(features.keys())}. Pass image_key=... and label_key=...."
            )
    num_classes = getattr(features[label_key], "num_classes", None)
    if num_classes is not None:
        num_classes = int(num_classes)

    datasets, offset = [], 0
    for part, source in zip(("train", "test"), sources, strict=True):
        total = len(source)
        count = total if max_examples is None else min(total, max_examples)
        if count == 0:
            raise ValueError(f"TFDS split {split[len(datasets)]!r} of {tfds_name!r} is empty.")
        ids = offset + np.arange(count, dtype=np.int64)
        name = f"tfds:{tfds_name}/{part}"
        if streamed:
            first = np.asarray(source[0][image_key])
            datasets.append(
                StreamedDataset(
                    source,
                    ids=ids,
                    rows=np.arange(count, dtype=np.int64),
                    name=name,
                    num_classes=num_classes,
                    x_key=image_key,
                    y_key=label_key,
                    x_divisor=255.0 if first.dtype == np.uint8 else None,
                )
            )
            offset += total
            continue
        # Item by item: tfds' batched __getitems__ is not supported by tfds.testing.mock_data.
        examples = [source[i] for i in range(count)]
        x = np.stack([np.asarray(ex[image_key]) for ex in examples])
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        y = np.stack([np.asarray(ex[label_key]) for ex in examples])
        datasets.append(Dataset(x, y, ids, name, num_classes))
        offset += total

    train, test = datasets
    info = {
        "source": f"tensorflow_datasets.data_source({tfds_name!r})",
        "ids": "record index within the split + full length of the earlier splits",
        "splits": list(split),
        "id_offsets": [0, len(sources[0])],
        "max_examples": max_examples,
        "scaling": "uint8 inputs / 255" + (" on the device" if streamed else ""),
        "streamed": streamed,
        "kind": train.kind,
        "num_classes": num_classes,
        "input_shape": list(train.input_shape),
        "num_train": len(train),
        "num_test": len(test),
    }
    return Splits(train=train, test=test, name=f"{TFDS_PREFIX}{tfds_name}", info=info)


# ---- fictitious facts ---------------------------------------------------------------------------
def _load_facts(
    *,
    seed: int = 0,
    num_authors: int = 200,
    num_holdout_authors: int = 20,
    num_perturbed: int = 3,
    tokenizer: str = "words",
    seq_len: int | None = None,
) -> Splits:
    """Fictitious facts: ``train`` = training authors' pairs + world facts, ``test`` = holdout authors.

    ``info`` is the generator's (seed, sizes, ``seq_len``, the tokenizer as
    ``Tokenizer.from_info``-readable words, ``forget_order``), plus the sizes and kind.
    """
    data = generate_facts(
        seed=seed,
        num_authors=num_authors,
        num_holdout_authors=num_holdout_authors,
        num_perturbed=num_perturbed,
        tokenizer=tokenizer,
        seq_len=seq_len,
    )
    train, test = data.train, data.holdout
    info = {
        **data.info,
        "kind": train.kind,
        "num_classes": train.num_classes,
        "input_shape": list(train.input_shape),
        "num_train": len(train),
        "num_test": len(test),
    }
    return Splits(train=train, test=test, name="facts", info=info)


_LOADERS: dict[str, Callable[..., Splits]] = {
    "digits": _load_digits,
    "diabetes": _load_diabetes,
    "synthetic": _load_synthetic,
    "facts": _load_facts,
}


def _check_kwargs(name: str, loader: Callable[..., Splits], kwargs: dict) -> None:
    params = inspect.signature(loader).parameters
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise TypeError(
            f"load({name!r}) got unexpected keyword arguments {unexpected}; it accepts {accepted}."
        )


def load(name: str, **kwargs: Any) -> Splits:
    """Loads a named data set as train/test :class:`Splits` whose examples carry stable ids.

    Args:
      name: ``"digits"``, ``"diabetes"``, ``"synthetic"``, ``"facts"`` or ``"tfds:NAME"`` (e.g.
        ``"tfds:mnist"``).
      **kwargs: options of that data set:

        * digits, diabetes: ``test_fraction=0.2``, ``seed=0``.
        * synthetic: ``n=1000``, ``dim=16``, ``classes=4``, ``seed=0``, ``test_fraction=0.2``,
          ``separation=3.0`` (the norm of each class mean; the noise is unit Gaussian).
        * facts: ``seed=0``, ``num_authors=200``, ``num_holdout_authors=20``, ``num_perturbed=3``,
          ``tokenizer="words"`` (or ``"bytes"``), ``seq_len=None`` (see ``generate_facts``).
        * tfds: ``split=("train", "test")``, ``data_dir=None``, ``download=False`` (True lets TFDS
          download and prepare the data, which needs internet), ``max_examples=None`` (keep the first
          records of each split), ``image_key="image"``, ``label_key="label"``, ``streamed=False``
          (True: :class:`~unlearn_jax.data.stream.StreamedDataset` splits read batch by batch).

    Returns:
      ``Splits(train, test, name, info)``. Sizes with the defaults: digits 1437 train / 360 test
      (10 classes, ``x [N, 8, 8, 1]``); diabetes 353 / 89 (``x [N, 10]``, ``y [N]``); synthetic
      800 / 200 (``x [N, 16]``, 4 classes); facts 1256 / 120 (``x [N, 40]`` int32 tokens,
      vocabulary 664, kind ``"sequence"``).

    Raises:
      ValueError: for an unknown name (listing the valid ones) or bad option values.
      TypeError: for an option the data set does not take.
      RuntimeError: when a TFDS data set is not prepared or cannot be downloaded; the message says
        how to prepare it.

    Examples:
      >>> splits = load("digits")
      >>> len(splits.train), len(splits.test), splits.train.x.shape[1:], splits.num_classes
      (1437, 360, (8, 8, 1), 10)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string such as 'digits', got {name!r}.")
    if name.startswith(TFDS_PREFIX):
        tfds_name = name[len(TFDS_PREFIX) :].strip()
        if not tfds_name:
            raise ValueError("'tfds:' needs a data set name after the colon, e.g. 'tfds:mnist'.")
        _check_kwargs(name, _load_tfds, kwargs)
        return _load_tfds(tfds_name, **kwargs)
    _validate.one_of("data set name", name, [*_LOADERS, f"{TFDS_PREFIX}<NAME>"])
    loader = _LOADERS[name]
    _check_kwargs(name, loader, kwargs)
    return loader(**kwargs)
