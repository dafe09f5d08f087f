"""In-memory datasets whose examples carry stable ids, and a train/test pair of them.

Unlearning is about *which* examples a model has seen, so every example here has an integer id that
survives shuffling, subsetting and saving: a forget set is a set of ids, a checkpoint records a hash
of those ids, and evaluation looks examples up by id. Everything lives on the host as numpy arrays;
only :meth:`Dataset.as_batch` and :mod:`unlearn_jax.data.batching` move data to the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.core.task import CLASSIFICATION, REGRESSION, SEQUENCE

# Batches carry ids as int32 (JAX's default integer); ids must fit, and -1 is left free to mark the
# padding rows of `padded_batches`.
MAX_ID = np.iinfo(np.int32).max


def describe_values(values: np.ndarray, limit: int = 5) -> str:
    """A short description of some values for an error message: ``[3, 17, 99, ...] (12 in all)``."""
    values = np.asarray(values).reshape(-1)
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    more = ", ..." if values.size > limit else ""
    return f"[{shown}{more}] ({values.size} in all)"


def check_example_ids(ids: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Checks a data set's example ids ``[N]``: unique and in ``[0, MAX_ID]`` (they travel as
    int32 in batches). Returns the stable sort order ``[N]`` and the sorted ids ``[N]``.

    Raises:
      ValueError: repeated ids or ids outside ``[0, MAX_ID]``, naming them.
    """
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])
    if repeated.size:
        raise ValueError(
            f"{label}: ids must be unique, but these repeat: {describe_values(repeated)}."
        )
    if ids.size and (sorted_ids[0] < 0 or sorted_ids[-1] > MAX_ID):
        bad = ids[(ids < 0) | (ids > MAX_ID)]
        raise ValueError(
            f"{label}: ids must lie in [0, {MAX_ID}] (they travel as int32 in batches), got "
            f"{describe_values(bad)}."
        )
    return order, sorted_ids


def as_id_array(ids: Any, name: str = "ids") -> np.ndarray:
    """Converts ``ids`` (a list, numpy/jax array or a single int) into a 1-D int64 numpy array.

    Raises:
      ValueError: if ``ids`` is not 0-D or 1-D, or holds something other than integers.
    """
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer ids, got shape {arr.shape}.")
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer ids, got dtype {arr.dtype} (first values "
            f"{describe_values(arr)}). For a boolean mask use Dataset.subset."
        )
    return arr.astype(np.int64)


def repeated_values(values: np.ndarray) -> np.ndarray:
    """The values that occur more than once in a 1-D array, sorted, each listed once."""
    sorted_values = np.sort(values)
    repeated = sorted_values[1:][sorted_values[1:] == sorted_values[:-1]]
    return np.unique(repeated)


def check_take_indices(indices: Any, n: int, name: str = "") -> np.ndarray:
    """Validates row positions for ``take`` on ``n`` examples; returns them as int64 ``[M]``.

    Raises:
      ValueError: if a position is outside ``[0, n)`` or repeats (ids are unique).
    """
    idx = as_id_array(indices, name="indices")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise ValueError(
            f"indices must lie in [0, {n}) for {name or 'the dataset'}, got {describe_values(bad)}."
        )
    repeated = repeated_values(idx)
    if repeated.size:
        raise ValueError(
            f"indices must not repeat (ids are unique), got {describe_values(repeated)}."
        )
    return idx


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A set of examples held as host numpy arrays, each example with a stable integer id.

    The arrays are converted on construction: ``x`` to float32, ``y`` to int32 (classification) or
    float32 (regression), ``ids`` to int64. A dataset with token ``weights`` is a *sequence* dataset
    (next-token prediction): ``x`` and ``y`` are then int32 token ids (never cast to float) and
    ``num_classes`` is the vocabulary size. Datasets are immutable values: every selection method
    returns a new ``Dataset``. Equality is identity (comparing arrays elementwise is never meant).

    Attributes:
      x: inputs ``[N, ...]`` float32 (the digits images are ``[N, 8, 8, 1]`` in ``[0, 1]``); for a
        sequence dataset the input tokens ``[N, T]`` int32 in ``[0, num_classes)``.
      y: targets: ``[N]`` int32 labels in ``[0, num_classes)`` for classification, ``[N]`` or
        ``[N, K]`` float32 for regression, the next tokens ``[N, T]`` int32 for a sequence dataset.
      ids: ``[N]`` int64, unique, in ``[0, 2**31 - 1]`` (so they fit the int32 ``"id"`` of a batch).
      name: a label used in messages and reports, e.g. ``"digits/train"``.
      num_classes: the number of classes (the vocabulary size of a sequence dataset); ``None``
        means a regression dataset.
      weights: ``None``, or ``[N, T]`` float32 token weights ``>= 0`` (1 on the target tokens whose
        likelihood counts, e.g. the answer of a question-answer pair; 0 on prompt and padding),
        which makes this a sequence dataset. Batches carry them as ``"weights"``.

    Raises:
      ValueError: if the lengths disagree, ids repeat or are out of range, ``x`` or ``y`` hold NaN or
        infinity, labels are not integers in ``[0, num_classes)``, or shapes are wrong; for a
        sequence dataset, if ``num_classes`` is missing, ``x``/``y`` are not integer tokens in
        ``[0, num_classes)`` or ``weights`` is not finite, ``>= 0`` and of ``y``'s shape.

    Examples:
      >>> ds = Dataset(x=np.zeros((3, 2)), y=np.array([0, 1, 1]), ids=np.array([10, 11, 12]),
      ...              name="toy", num_classes=2)
      >>> len(ds), ds.kind, ds.x.dtype, ds.y.dtype
      (3, 'classification', dtype('float32'), dtype('int32'))
      >>> ds.by_ids([12, 10]).ids.tolist()
      [12, 10]
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    name: str = ""
    num_classes: int | None = None
    weights: np.ndarray | None = None

    def __post_init__(self):
        label = self.name or "dataset"
        x = np.asarray(self.x)
        if x.ndim < 1 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ValueError(
                f"{label}: x must be a numeric array [N, ...], got dtype {x.dtype} shape {x.shape}."
            )
        if self.weights is None:
            x = x.astype(np.float32, copy=False)
        else:
            x, weights = self._convert_sequence(x, label)
        if np.ndim(self.ids) != 1:
            raise ValueError(
                f"{label}: ids must be a 1-D array [N], got shape {np.shape(self.ids)}."
            )
        ids = as_id_array(self.ids, name=f"{label}: ids")
        y = self._convert_targets(np.asarray(self.y), label)

        sizes = {"x": x.shape[0], "y": y.shape[0], "ids": ids.shape[0]}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{label}: x, y and ids disagree on the number of examples: {sizes}.")

        order, sorted_ids = check_example_ids(ids, label)
        for field, values in (("x", x), ("y", y)):
            if values.size == 0:
                continue
            bad_rows = ~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
            if bad_rows.any():
                raise ValueError(
                    f"{label}: {field} contains NaN or infinite values in {int(bad_rows.sum())} "
                    f"examples, ids {describe_values(ids[bad_rows])}."
                )

        if self.weights is not None and weights.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{label}: weights has {weights.shape[0]} rows but there are {ids.shape[0]} examples."
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "ids", ids)
        if self.weights is not None:
            object.__setattr__(self, "weights", weights)
        # Lookup tables for by_ids/without_ids; not dataclass fields.
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_sorted_ids", sorted_ids)

    def _convert_sequence(self, x: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:
        """Validates the tokens ``x [N, T]`` and the token weights; returns them as int32, float32."""
        if self.num_classes is None:
            raise ValueError(
                f"{label}: a sequence dataset (weights given) needs num_classes = the vocabulary size."
            )
        _validate.positive_int(num_classes=self.num_classes)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(
                f"{label}: a sequence dataset needs integer tokens x [N, T], got dtype {x.dtype} "
                f"shape {x.shape}."
            )
        bad = (x < 0) | (x >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"{label}: tokens x must lie in [0, {self.num_classes}) for the vocabulary size "
                f"num_classes={self.num_classes}, got {describe_values(np.unique(x[bad]))}."
            )
        weights = np.asarray(self.weights)
        if weights.shape != x.shape or not np.issubdtype(weights.dtype, np.number):
            raise ValueError(
                f"{label}: token weights must be numeric with the shape of x {x.shape}, got dtype "
                f"{weights.dtype} shape {weights.shape}."
            )
        weights = weights.astype(np.float32)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError(f"{label}: token weights must be finite and >= 0.")
        return x.astype(np.int32), weights

    def _convert_targets(self, y: np.ndarray, label: str) -> np.ndarray:
        if self.weights is not None:
            if y.shape != np.shape(self.x) or (y.size and not np.issubdtype(y.dtype, np.integer)):
                raise ValueError(
                    f"{label}: next-token targets y must be integers with the shape of x "
                    f"{np.shape(self.x)}, got dtype {y.dtype} shape {y.shape}."
                )
            y = y.astype(np.int32)
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                raise ValueError(
                    f"{label}: target tokens y must lie in [0, {self.num_classes}), got "
                    f"{describe_values(np.unique(y[bad]))}."
                )
            return y
        if self.num_classes is None:
            if y.ndim not in (1, 2) or not np.issubdtype(y.dtype, np.number):
                raise ValueError(
                    f"{label}: regression targets y must be numeric [N] or [N, K], got dtype "
                    f"{y.dtype} shape {y.shape}."
                )
            return y.astype(np.float32, copy=False)
        _validate.positive_int(num_classes=self.num_classes)
        if y.ndim != 1:
            raise ValueError(f"{label}: class labels y must have shape [N], got {y.shape}.")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            integral = np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y))
            integral = integral and bool(np.all(y == np.round(y)))
            if not integral:
                raise ValueError(
                    f"{label}: class labels y must be integers, got dtype {y.dtype} with values "
                    f"{describe_values(y)}; for real-valued targets pass num_classes=None."
                )
        y = y.astype(np.int32)
        out_of_range = (y < 0) | (y >= self.num_classes)
        if out_of_range.any():
            raise ValueError(
                f"{label}: labels must lie in [0, {self.num_classes}) for num_classes="
                f"{self.num_classes}, got {describe_values(np.unique(y[out_of_range]))}."
            )
        return y

    # ---- description ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __repr__(self) -> str:
        x, y = self.x, self.y
        weights = "" if self.weights is None else ", weights"
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, x={x.dtype}{list(x.shape)}, "
            f"y={y.dtype}{list(y.shape)}, num_classes={self.num_classes}{weights})"
        )

    @property
    def kind(self) -> str:
        """``"sequence"`` (token ``weights`` set), ``"classification"`` (``num_classes`` set) or
        ``"regression"``, as in :class:`Task`."""
        if self.weights is not None:
            return SEQUENCE
        return REGRESSION if self.num_classes is None else CLASSIFICATION

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, ``x.shape[1:]``."""
        return tuple(self.x.shape[1:])

    @property
    def target_shape(self) -> tuple[int, ...]:
        """The shape of one target, ``y.shape[1:]``."""
        return tuple(self.y.shape[1:])

    def class_counts(self) -> np.ndarray:
        """The number of examples of each class, ``[num_classes]`` int64 (classification only)."""
        self._require_classification("class_counts")
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)

    def _require_classification(self, what: str) -> None:
        if self.kind != CLASSIFICATION:
            raise ValueError(
                f"{what} needs a classification dataset, but {self.name!r} is {self.kind}."
            )

    # ---- selection -----------------------------------------------------------------------------
    def positions(self, ids: Any) -> np.ndarray:
        """The row positions ``[M]`` of the examples with these ids, in the order of ``ids``.

        Raises:
          ValueError: if some ids are not in the dataset (the message names a few and the count).
        """
        ids = as_id_array(ids)
        if ids.size == 0:
            return np.zeros((0,), np.int64)
        where = np.searchsorted(self._sorted_ids, ids)
        where = np.minimum(where, max(len(self) - 1, 0))
        known = (self._sorted_ids[where] == ids) if len(self) else np.zeros(ids.shape, bool)
        if not known.all():
            raise ValueError(
                f"ids not in {self.name or 'the dataset'} ({len(self)} examples): "
                f"{describe_values(ids[~known])}."
            )
        return self._order[where]

    def contains(self, ids: Any) -> np.ndarray:
        """A boolean array ``[M]``: whether each of ``ids`` is in the dataset (never raises)."""
        ids = as_id_array(ids)
        if ids.size == 0 or len(self) == 0:
            return np.zeros(ids.shape, bool)
        where = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self) - 1)
        return self._sorted_ids[where] == ids

    def take(self, indices: Any) -> Dataset:
        """The examples at these row positions, in that order.

        Args:
          indices: ``[M]`` integer positions in ``[0, N)``, without repeats.

        Raises:
          ValueError: if a position is out of range or repeats.
        """
        idx = check_take_indices(indices, len(self), self.name)
        weights = None if self.weights is None else self.weights[idx]
        return dataclasses.replace(
            self, x=self.x[idx], y=self.y[idx], ids=self.ids[idx], weights=weights
        )

    def subset(self, mask_or_indices: Any) -> Dataset:
        """The examples selected by a boolean mask ``[N]`` (kept in order) or by row positions."""
        selector = np.asarray(mask_or_indices)
        if selector.dtype == np.bool_:
            if selector.shape != (len(self),):
                raise ValueError(
                    f"a boolean mask must have shape ({len(self)},) to select from "
                    f"{self.name or 'the dataset'}, got {selector.shape}."
                )
            return self.take(np.flatnonzero(selector))
        return self.take(selector)

    def by_ids(self, ids: Any) -> Dataset:
        """The examples with these ids, in the order of ``ids``.

        Raises:
          ValueError: if some ids are unknown (the message names a few of them and how many) or
            ``ids`` repeats an id.
        """
        ids = as_id_array(ids)
        repeated = repeated_values(ids)
        if repeated.size:
            raise ValueError(f"ids must not repeat, got {describe_values(repeated)}.")
        return self.take(self.positions(ids))

    def without_ids(self, ids: Any) -> Dataset:
        """All examples except those with these ids, in dataset order.

        Raises:
          ValueError: if some ids are not in the dataset.
        """
        keep = np.ones(len(self), bool)
        keep[self.positions(ids)] = False
        return self.take(np.flatnonzero(keep))

    # ---- device --------------------------------------------------------------------------------
    def as_batch(self) -> dict[str, Any]:
        """The whole dataset as one batch ``{"x": [N, ...], "y": [N, ...], "id": [N] int32}`` (jnp),
        plus ``"weights": [N, T]`` for a sequence dataset.

        Raises:
          ValueError: if the dataset is empty.
        """
        if len(self) == 0:
            raise ValueError(
                f"{self.name or 'dataset'} is empty; a batch needs at least one example."
            )
        batch = {
            "x": jnp.asarray(self.x),
            "y": jnp.asarray(self.y),
            "id": jnp.asarray(self.ids.astype(np.int32)),
        }
        if self.weights is not None:
            batch["weights"] = jnp.asarray(self.weights)
        return batch


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A training set and a test set of the same task, as returned by :func:`unlearn_jax.data.load`.

    Attributes:
      train: the training examples (forget sets are chosen from these).
      test: held-out examples of the same kind, classes and input shape.
      name: the data set's name as given to ``load``, e.g. ``"digits"`` or ``"tfds:mnist"``.
      info: JSON-serialisable facts about the data (source, sizes, input shape, number of classes,
        split rule, scaling applied), ready for checkpoint metadata and reports.

    Raises:
      ValueError: if train and test disagree on kind, number of classes, input or target shape.
    """

    train: Dataset
    test: Dataset
    name: str
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        from unlearn_jax.data.stream import StreamedDataset  # stream builds on this module

        for part in ("train", "test"):
            if not isinstance(getattr(self, part), Dataset | StreamedDataset):
                raise TypeError(
                    f"Splits.{part} must be a Dataset or StreamedDataset, got "
                    f"{type(getattr(self, part))}."
                )
        tr, te = self.train, self.test
        facts = {
            "kind": (tr.kind, te.kind),
            "num_classes": (tr.num_classes, te.num_classes),
            "input shape": (tr.input_shape, te.input_shape),
            "target shape": (tr.target_shape, te.target_shape),
        }
        for what, (a, b) in facts.items():
            if a != b:
                raise ValueError(f"{self.name}: train and test disagree on {what}: {a} vs {b}.")

    @property
    def num_classes(self) -> int | None:
        """The number of classes (``None`` for regression)."""
        return self.train.num_classes

    @property
    def kind(self) -> str:
        """``"classification"``, ``"regression"`` or ``"sequence"``."""
        return self.train.kind


def concat(first: Dataset, second: Dataset, name: str = "") -> Dataset:
    """The examples of ``first`` then those of ``second`` as one dataset (same kind and shapes).

    If either is a :class:`~unlearn_jax.data.stream.StreamedDataset`, the result is a streamed view
    (:func:`~unlearn_jax.data.stream.concat_streamed`): no records are read or copied.

    Raises:
      ValueError: datasets of different kinds, classes or shapes, or ids present in both.
    """
    from unlearn_jax.data.stream import StreamedDataset, concat_streamed

    if isinstance(first, StreamedDataset) or isinstance(second, StreamedDataset):
        return concat_streamed(first, second, name)
    for what, a, b in (
        ("kind", first.kind, second.kind),
        ("num_classes", first.num_classes, second.num_classes),
        ("input shape", first.x.shape[1:], second.x.shape[1:]),
        ("target shape", first.y.shape[1:], second.y.shape[1:]),
    ):
        if a != b:
            raise ValueError(f"cannot concatenate datasets that differ in {what}: {a} vs {b}.")
    fields = {
        "x": np.concatenate([first.x, second.x]),
        "y": np.concatenate([first.y, second.y]),
        "ids": np.concatenate([first.ids, second.ids]),
    }
    if first.weights is not None:
        fields["weights"] = np.concatenate([first.weights, second.weights])
    return dataclasses.replace(first, name=name or f"{first.name}+{second.name}", **fields)


def by_class(dataset: Dataset) -> Dataset:
    """The examples stably sorted by label: grouped class by class, each class in data order.

    A :class:`~unlearn_jax.data.stream.StreamedDataset` gives a view (its labels read once).
    """
    dataset._require_classification("by_class")
    return dataset.take(np.argsort(np.asarray(dataset.y), kind="stable"))
