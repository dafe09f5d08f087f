"""Streamed datasets: examples read on demand from a random-access source, never held whole on the host.

A :class:`StreamedDataset` is a *view* over a source: any object with ``len(source)`` and
``source[i] -> record`` (a TFDS ``tfds.data_source(...)``, a grain ``RandomAccessDataSource`` or
``MapDataset``, or a plain Python class). It keeps only the ids of its examples and their record
indices (``[N]`` int64 each); inputs, targets and token weights are read from the records of each
batch when :mod:`unlearn_jax.data.batching` asks for them, a background thread reading ahead.

Storage dtypes travel as they are: uint8 images reach the device as uint8 and become float32 there
(``x / x_divisor``, through a 2**8-entry table so the values equal numpy's host computation bit for
bit), int32 tokens stay int32. Selections (``take``, ``subset``, ``by_ids``, ``without_ids``) and the
driver's orders (:func:`unlearn_jax.data.concat`, :func:`unlearn_jax.data.by_class`) are views: they
copy index arrays, never data. Class labels, which class orders and label checks need, are read in
one pass over the records the first time ``y`` is asked for (or given up front as ``labels``) and
shared by every view of the source.

Examples:
  >>> class Squares:  # 5 records generated on demand
  ...     def __len__(self):
  ...         return 5
  ...     def __getitem__(self, i):
  ...         return {"x": np.full((2,), i * i, np.uint8), "y": i % 2}
  >>> ds = StreamedDataset(Squares(), name="squares", num_classes=2, x_divisor=255.0)
  >>> len(ds), ds.kind, ds.x.shape, ds.x.dtype, ds.storage_dtype
  (5, 'classification', (5, 2), dtype('float32'), dtype('uint8'))
  >>> ds.by_ids([4, 2]).read_batch([0, 1])["x"].tolist()
  [[16, 16], [4, 4]]
  >>> from unlearn_jax.data import by_class
  >>> ds.y.tolist(), by_class(ds).ids.tolist()
  ([0, 1, 0, 1, 0], [0, 2, 4, 1, 3])
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate
from unlearn_jax.core.task import CLASSIFICATION, REGRESSION, SEQUENCE
from unlearn_jax.data.dataset import (
    Dataset,
    as_id_array,
    check_example_ids,
    check_take_indices,
    describe_values,
)

# Integer inputs of at most this many bytes become float32 through a lookup table of all their
# values (exactly numpy's float32 division); wider ones through a division on the device, which XLA
# may turn into a multiplication by the reciprocal (within 1 ulp of numpy's value).
_TABLE_MAX_BYTES = 2


def _record_field(record: Any, key: Any, what: str, index: int, label: str) -> np.ndarray:
    try:
        value = record[key]
    except (KeyError, IndexError, TypeError):
        fields = sorted(map(str, record)) if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(
            f"{label}: record {index} has no field {key!r} for {what}; its fields are {fields}. "
            f"Pass {what}_key=... naming the field."
        ) from None
    return np.asarray(value)


def host_inputs(x: np.ndarray, x_divisor: float | None) -> np.ndarray:
    """Stored inputs as the model reads them, on the host: ``x.astype(float32) / float32(x_divisor)``
    (numpy's float32 division) when ``x_divisor`` is set, else ``x`` unchanged.

    Args:
      x: ``[B, ...]`` stored inputs (uint8 pixels, say).
      x_divisor: the divisor, or ``None``.

    Returns:
      ``[B, ...]`` float32 (or ``x`` itself for ``x_divisor=None``).
    """
    if x_divisor is None:
        return x
    return x.astype(np.float32) / np.float32(x_divisor)


@functools.partial(jax.jit, static_argnames=("x_divisor",))
def inputs_as_float(x: jax.Array, x_divisor: float) -> jax.Array:
    """Stored integer inputs as float32 on the device: ``x / x_divisor``, equal to :func:`host_inputs`.

    For 8- and 16-bit integers (and booleans) the result is a gather from the table
    ``float32(v) / float32(x_divisor)`` of every value ``v`` of the dtype, computed by numpy when the
    function is traced, so it is bit-identical to the host computation; XLA would otherwise rewrite the
    division into a multiplication by the rounded reciprocal, 1 ulp off for about half of the 256
    pixel values. Wider integers are divided on the device (within 1 ulp of numpy).

    Args:
      x: ``[B, ...]`` integer or boolean inputs on the device (their storage dtype).
      x_divisor: the divisor (static: one compilation per divisor, dtype and shape).

    Returns:
      ``[B, ...]`` float32, sharded as ``x``.
    """
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_ or dtype.itemsize <= _TABLE_MAX_BYTES:
        low, high = (0, 1) if dtype == np.bool_ else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        values = np.arange(low, high + 1).astype(dtype)
        table = host_inputs(values, x_divisor)
        return jnp.asarray(table)[x.astype(jnp.int32) - low]
    return x.astype(jnp.float32) / jnp.float32(x_divisor)


def to_device(
    host_batch: Mapping[str, np.ndarray],
    *,
    x_divisor: float | None = None,
    put: Callable[[Any], Any] = jax.device_put,
) -> dict[str, jax.Array]:
    """Moves a host batch to the device in its stored dtypes, then makes the inputs float32 there.

    Args:
      host_batch: ``{"x": [B, ...], "y", "id", ...}`` numpy arrays as :meth:`StreamedDataset.read_batch`
        returns them (x uint8 for images).
      x_divisor: when set, ``x`` becomes ``x / x_divisor`` float32 *after* the transfer
        (:func:`inputs_as_float`).
      put: how the arrays reach the device: ``jax.device_put`` (default) or, for a global batch,
        ``lambda b: make_global(b, mesh)``.

    Returns:
      The batch as JAX arrays.
    """
    batch = dict(put(dict(host_batch)))
    if x_divisor is not None:
        batch["x"] = inputs_as_float(batch["x"], x_divisor)
    return batch


def prefetched(read: Callable[[Any], Any], items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``read(item)`` for each item in order, up to ``depth`` of them read ahead by one background thread.

    ``depth=0`` reads in the caller's thread. An exception raised by ``read`` surfaces at the
    ``next`` that would have returned its result. Closing the iterator (or dropping it) cancels
    the reads not yet started; at most one read in progress finishes in the background.
    """
    if depth == 0:
        for item in items:
            yield read(item)
        return
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unlearn_jax-read")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(executor.submit(read, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Shapes and dtypes of one record's fields (from the source's first record)."""

    x_shape: tuple[int, ...]
    x_dtype: np.dtype
    y_shape: tuple[int, ...]
    y_dtype: np.dtype
    weights_shape: tuple[int, ...] | None


class _Shared:
    """What all views of one source know about it: the record spec, and the labels once read."""

    def __init__(self, source: Any, keys: tuple, labels: np.ndarray | None):
        self.source = source
        self.keys = keys
        self.spec: _Spec | None = None
        self.labels = labels
        # A concatenation computes its labels from its parts' rather than by reading records.
        self.label_fn: Callable[[], np.ndarray] | None = None
        self.lock = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedDataset:
    """Examples read on demand from a random-access source, each with a stable integer id.

    Holds ``ids`` and record indices ``rows`` (``[N]`` int64 each) and nothing else per example. A
    record is whatever ``source[i]`` returns (a dict for TFDS and grain sources); ``x_key``, ``y_key``
    and ``weights_key`` name its fields. It is accepted wherever a :class:`Dataset` is by
    :mod:`unlearn_jax.data.batching` (``batches``, ``padded_batches``, ``batch_stream``,
    ``global_batches``), :func:`unlearn_jax.data.concat`, :func:`unlearn_jax.data.by_class` and the
    forget-set selectors; :meth:`to_dataset` makes an in-memory copy for code that needs one.

    What a batch carries, per field (``B`` rows):

    * ``x``: stored integer inputs of at most 32 bits (uint8 images, int32 tokens) in their stored
      dtype, converted to float32 ``x / x_divisor`` on the device when ``x_divisor`` is set; 64-bit
      integers narrowed on the host (int32 tokens for sequence data, else float32 as
      :class:`Dataset` does); floating inputs as float32.
    * ``y``: int32 labels in ``[0, num_classes)``, float32 regression targets, or int32 next tokens.
    * ``id``: int32; ``weights`` (sequence data): float32 ``[B, T]``.

    Attributes:
      source: the records: ``len(source)`` and ``source[i]`` for ``0 <= i < len(source)``.
      ids: ``[N]`` unique ids in ``[0, 2**31 - 1]``; default ``arange(len(source))`` (the record index).
      rows: ``[N]`` record indices of the examples, in dataset order; default every record in order.
      name: a label for messages, e.g. ``"tfds:mnist/train"``.
      num_classes: the number of classes (vocabulary size for sequence data); ``None`` = regression.
      x_key, y_key: the record fields of the input and the target.
      weights_key: the field of ``[T]`` token weights, which makes a sequence dataset; or ``None``.
      x_divisor: if set, the model reads ``x / x_divisor`` as float32 (``255.0`` for uint8 pixels in
        ``[0, 1]``); needs integer inputs.
      labels: optional labels (targets) of *every record of the source*, in record order, when known
        up front; otherwise ``y`` reads them in one pass over the records the first time it is asked.
      prefetch: batches read ahead by a background thread while the current one is used (0: none).

    Raises:
      ValueError: if ``source`` is empty or its first record lacks a field or has the wrong shapes or
        dtypes for the kind; if ``ids`` and ``rows`` disagree in length, ids repeat or leave
        ``[0, 2**31 - 1]``, rows leave ``[0, len(source))``; for bad ``num_classes``, ``x_divisor``,
        ``labels`` or ``prefetch``. Records are checked as they are read: a batch whose records
        differ in shape from the first, hold NaN or infinity, or labels or tokens outside
        ``[0, num_classes)`` raises naming the ids.
      TypeError: if ``source`` lacks ``__len__`` or ``__getitem__``.
    """

    source: Any
    ids: Any = None
    rows: Any = None
    name: str = ""
    num_classes: int | None = None
    x_key: Any = "x"
    y_key: Any = "y"
    weights_key: Any = None
    x_divisor: float | None = None
    labels: Any = None
    prefetch: int = 2
    shared: _Shared | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        label = self.name or "streamed dataset"
        source = self.source
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(
                f"{label}: source must support len(source) and source[i] (a tfds.data_source, a "
                f"grain data source, or any sequence of records), got {type(source).__name__}."
            )
        size = len(source)
        if size == 0:
            raise ValueError(f"{label}: the source has no records.")
        rows = np.arange(size, dtype=np.int64) if self.rows is None else self.rows
        rows = as_id_array(rows, name=f"{label}: rows")
        bad = rows[(rows < 0) | (rows >= size)]
        if bad.size:
            raise ValueError(
                f"{label}: rows must be record indices in [0, {size}), got {describe_values(bad)}."
            )
        ids = rows.copy() if self.ids is None else as_id_array(self.ids, name=f"{label}: ids")
        if ids.shape != rows.shape:
            raise ValueError(
                f"{label}: ids ({ids.shape[0]}) and rows ({rows.shape[0]}) must have one entry per "
                "example; without rows, ids needs one entry per record of the source."
            )
        check_example_ids(ids, label)
        if self.num_classes is not None:
            _validate.positive_int(num_classes=self.num_classes)
        if self.x_divisor is not None:
            _validate.positive(x_divisor=self.x_divisor)
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int | np.integer):
            raise ValueError(f"prefetch must be an integer >= 0, got prefetch={self.prefetch!r}.")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0, got prefetch={self.prefetch!r}.")
        if self.weights_key is not None and self.num_classes is None:
            raise ValueError(
                f"{label}: a sequence dataset (weights_key given) needs num_classes = the "
                "vocabulary size."
            )
        keys = (self.x_key, self.y_key, self.weights_key)
        shared = self.shared
        if shared is None or shared.source is not source or shared.keys != keys:
            shared = _Shared(source, keys, None)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "shared", shared)
        if self.x_divisor is not None:
            object.__setattr__(self, "x_divisor", float(self.x_divisor))
        if shared.spec is None:
            shared.spec = self._read_spec(int(rows[0]) if rows.size else 0)
        self._check_spec(shared.spec, label)
        if self.labels is not None and shared.labels is None:
            shared.labels = self._check_labels(np.asarray(self.labels), size, label)

    def _read_spec(self, index: int) -> _Spec:
        label = self.name or "streamed dataset"
        record = self.source[index]
        x = _record_field(record, self.x_key, "x", index, label)
        y = _record_field(record, self.y_key, "y", index, label)
        weights = None
        if self.weights_key is not None:
            weights = _record_field(record, self.weights_key, "weights", index, label)
        return _Spec(x.shape, x.dtype, y.shape, y.dtype, None if weights is None else weights.shape)

    def _check_spec(self, spec: _Spec, label: str) -> None:
        if not (np.issubdtype(spec.x_dtype, np.number) or spec.x_dtype == np.bool_):
            raise ValueError(f"{label}: x must be numeric, got dtype {spec.x_dtype}.")
        integer_x = np.issubdtype(spec.x_dtype, np.integer) or spec.x_dtype == np.bool_
        if self.x_divisor is not None and not integer_x:
            raise ValueError(
                f"{label}: x_divisor scales integer inputs (uint8 pixels, say), but x is stored "
                f"as {spec.x_dtype}; store the values the model reads and pass x_divisor=None."
            )
        y_integer = np.issubdtype(spec.y_dtype, np.integer)
        if self.weights_key is not None:
            ok = (
                len(spec.x_shape) == 1
                and np.issubdtype(spec.x_dtype, np.integer)
                and y_integer
                and spec.y_shape == spec.x_shape
                and spec.weights_shape == spec.x_shape
                and self.x_divisor is None
            )
            if not ok:
                raise ValueError(
                    f"{label}: a sequence record needs integer tokens x [T], integer next tokens y "
                    f"[T] and weights [T] (and no x_divisor), got x {spec.x_dtype}{list(spec.x_shape)}"
                    f", y {spec.y_dtype}{list(spec.y_shape)}, weights {spec.weights_shape}."
                )
        elif self.num_classes is not None:
            if spec.y_shape != () or not (y_integer or np.issubdtype(spec.y_dtype, np.floating)):
                raise ValueError(
                    f"{label}: a class label must be one integer per record, got dtype "
                    f"{spec.y_dtype} shape {spec.y_shape}; for real-valued targets pass "
                    "num_classes=None."
                )
        elif len(spec.y_shape) > 1 or not np.issubdtype(spec.y_dtype, np.number):
            raise ValueError(
                f"{label}: a regression target must be a number or a vector [K] per record, got "
                f"dtype {spec.y_dtype} shape {spec.y_shape}."
            )

    def _check_labels(self, labels: np.ndarray, size: int, label: str) -> np.ndarray:
        spec = self.shared.spec
        if self.weights_key is not None:
            raise ValueError(f"{label}: labels= is for class labels or regression targets only.")
        if labels.shape != (size, *spec.y_shape):
            raise ValueError(
                f"{label}: labels must hold the target of every record of the source, shape "
                f"{(size, *spec.y_shape)}, got {labels.shape}."
            )
        return self._targets(labels, None, label)

    def _targets(self, y: np.ndarray, positions: np.ndarray | None, label: str) -> np.ndarray:
        """Validated targets: int32 labels / tokens or float32 values.

        ``positions`` are the view positions of the rows of ``y`` (errors name their ids), or
        ``None`` when ``y`` holds every record of the source in record order.
        """
        if self.num_classes is None:
            y = y.astype(np.float32)
            bad = ~np.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)
            what = "regression targets y contain NaN or infinite values"
        else:
            if not np.issubdtype(y.dtype, np.integer) and not (
                np.all(np.isfinite(y)) and np.all(y == np.round(y))
            ):
                raise ValueError(f"{label}: class labels y must be integers, got {y.dtype} values.")
            y = y.astype(np.int64)
            bad = ((y < 0) | (y >= self.num_classes)).reshape(y.shape[0], -1).any(axis=1)
            what = f"targets y must lie in [0, {self.num_classes})"
            y = y.astype(np.int32)
        if bad.any():
            where = (
                f"at record indices {describe_values(np.flatnonzero(bad))}"
                if positions is None
                else self._name_rows(positions[bad])
            )
            raise ValueError(f"{label}: {what}; examples {where}.")
        return y

    def _name_rows(self, positions: np.ndarray) -> str:
        return f"with ids {describe_values(self.ids[positions])}"

    # ---- description ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __repr__(self) -> str:
        spec = self.shared.spec
        divisor = "" if self.x_divisor is None else f" / {self.x_divisor:g}"
        return (
            f"StreamedDataset(name={self.name!r}, n={len(self)}, x={spec.x_dtype}"
            f"{list(spec.x_shape)}{divisor}, y={spec.y_dtype}{list(spec.y_shape)}, "
            f"num_classes={self.num_classes}, source={type(self.source).__name__})"
        )

    @property
    def kind(self) -> str:
        """``"sequence"`` (``weights_key`` set), ``"classification"`` or ``"regression"``."""
        if self.weights_key is not None:
            return SEQUENCE
        return REGRESSION if self.num_classes is None else CLASSIFICATION

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input."""
        return tuple(self.shared.spec.x_shape)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """The shape of one target: ``()`` for a label, ``(K,)`` or ``(T,)``."""
        return tuple(self.shared.spec.y_shape)

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype inputs are stored in and travel to the device in (uint8 for images)."""
        return self._batch_x_dtype()

    def _batch_x_dtype(self) -> np.dtype:
        dtype = np.dtype(self.shared.spec.x_dtype)
        if np.issubdtype(dtype, np.floating):
            return np.dtype(np.float32)
        if dtype.itemsize > 4 and dtype != np.bool_:
            return np.dtype(np.int32 if self.kind == SEQUENCE else np.float32)
        return dtype

    @property
    def x(self) -> StreamedColumn:
        """The inputs as the model reads them (float32 ``x / x_divisor`` if set), read on demand:
        ``x.shape``, ``x.dtype`` without reading; ``x[rows]`` reads those rows only."""
        return StreamedColumn(self, "x")

    @functools.cached_property
    def y(self) -> np.ndarray | StreamedColumn:
        """The targets ``[N, ...]`` (int32 labels, float32 values), read once over the records and
        shared by all views of the source; for a sequence dataset the next tokens, read on demand."""
        if self.kind == SEQUENCE:
            return StreamedColumn(self, "y")
        return self._source_labels()[self.rows]

    @property
    def weights(self) -> StreamedColumn | None:
        """``None``, or the token weights ``[N, T]`` of a sequence dataset, read on demand."""
        return None if self.weights_key is None else StreamedColumn(self, "weights")

    def _source_labels(self) -> np.ndarray:
        shared = self.shared
        with shared.lock:
            if shared.labels is None:
                if shared.label_fn is not None:
                    shared.labels = shared.label_fn()
                else:
                    shared.labels = self._read_all_labels()
            return shared.labels

    def _read_all_labels(self) -> np.ndarray:
        label = self.name or "streamed dataset"
        size = len(self.source)
        values = [_record_field(self.source[i], self.y_key, "y", i, label) for i in range(size)]
        return self._targets(np.stack(values), None, label)

    def class_counts(self) -> np.ndarray:
        """The number of examples of each class, ``[num_classes]`` int64 (classification only)."""
        self._require_classification("class_counts")
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)

    # Id lookups and selections follow Dataset's rules exactly (same code): they only need `ids`,
    # `take` and the sorted-id tables below.
    _require_classification = Dataset._require_classification
    positions = Dataset.positions
    contains = Dataset.contains
    subset = Dataset.subset
    by_ids = Dataset.by_ids
    without_ids = Dataset.without_ids

    @functools.cached_property
    def _order(self) -> np.ndarray:
        return np.argsort(self.ids, kind="stable")

    @functools.cached_property
    def _sorted_ids(self) -> np.ndarray:
        return self.ids[self._order]

    def take(self, indices: Any) -> StreamedDataset:
        """The examples at these positions, in that order: a view (index arrays only, no records read).

        Raises:
          ValueError: if a position is out of range or repeats.
        """
        idx = check_take_indices(indices, len(self), self.name)
        return dataclasses.replace(self, ids=self.ids[idx], rows=self.rows[idx])

    # ---- reading -------------------------------------------------------------------------------
    def read_batch(self, positions: Any) -> dict[str, np.ndarray]:
        """The examples at these positions as a host batch in the dtypes that travel to the device.

        Reads ``len(positions)`` records, one ``source[i]`` each, nothing else.

        Args:
          positions: ``[B]`` integer positions in ``[0, N)`` (repeats allowed).

        Returns:
          ``{"x": [B, ...], "y": [B, ...], "id": [B] int32}`` plus ``"weights": [B, T]`` float32
          for a sequence dataset; ``x`` in its storage dtype (see the class docstring).

        Raises:
          ValueError: for positions out of range, records whose shapes differ from the first
            record's, non-finite values, labels or tokens out of range (naming the ids).
        """
        label = self.name or "streamed dataset"
        positions = as_id_array(positions, name="positions")
        bad = positions[(positions < 0) | (positions >= len(self))]
        if bad.size:
            raise ValueError(
                f"positions must lie in [0, {len(self)}) for {label}, got {describe_values(bad)}."
            )
        spec = self.shared.spec
        indices = self.rows[positions]
        records = [self.source[i] for i in indices.tolist()]
        fields = {}
        for field, key, shape in (
            ("x", self.x_key, spec.x_shape),
            ("y", self.y_key, spec.y_shape),
            ("weights", self.weights_key, spec.weights_shape),
        ):
            if key is not None:
                fields[field] = self._stack_field(records, field, key, shape, positions, label)
        count = positions.shape[0]
        x = fields["x"].astype(self._batch_x_dtype(), copy=False)
        if self.kind == SEQUENCE:
            bad_rows = ((x < 0) | (x >= self.num_classes)).any(axis=1)
            if bad_rows.any():
                raise ValueError(
                    f"{label}: tokens x must lie in [0, {self.num_classes}); examples "
                    f"{self._name_rows(positions[bad_rows])}."
                )
        elif np.issubdtype(x.dtype, np.floating) and count:
            bad_rows = ~np.isfinite(x.reshape(count, -1)).all(axis=1)
            if bad_rows.any():
                raise ValueError(
                    f"{label}: x contains NaN or infinite values; examples "
                    f"{self._name_rows(positions[bad_rows])}."
                )
        batch = {
            "x": x,
            "y": self._targets(fields["y"], positions, label),
            "id": self.ids[positions].astype(np.int32),
        }
        if self.weights_key is not None:
            weights = fields["weights"].astype(np.float32)
            bad_rows = ~(np.isfinite(weights) & (weights >= 0)).all(axis=1) if count else []
            if np.any(bad_rows):
                raise ValueError(
                    f"{label}: token weights must be finite and >= 0; examples "
                    f"{self._name_rows(positions[bad_rows])}."
                )
            batch["weights"] = weights
        return batch

    def _stack_field(
        self,
        records: list,
        field: str,
        key: Any,
        shape: tuple[int, ...],
        positions: np.ndarray,
        label: str,
    ) -> np.ndarray:
        """``[B, *shape]``: one field of every record, stacked (errors name the record and id)."""
        spec = self.shared.spec
        if not records:
            dtype = {"x": spec.x_dtype, "y": spec.y_dtype}.get(field, np.float32)
            return np.zeros((0, *shape), dtype)
        try:
            values = [record[key] for record in records]
            stacked = np.stack(values)
        except (KeyError, IndexError, TypeError, ValueError):
            stacked = None
        if stacked is not None and stacked.shape[1:] == shape:
            return stacked
        # The slow path only runs to find the record to name.
        for position, record in zip(positions.tolist(), records, strict=True):
            index = int(self.rows[position])
            value = _record_field(record, key, field, index, label)
            if value.shape != shape:
                raise ValueError(
                    f"{label}: record {index} (id {int(self.ids[position])}) has {field} of shape "
                    f"{value.shape}, but the first record's is {shape}; every record must have "
                    "the same shapes."
                )
        raise AssertionError("unreachable: a field that stacks badly has a record to name")

    def to_dataset(self, name: str = "") -> Dataset:
        """An in-memory :class:`Dataset` of the same examples (reads every record once).

        For data that fits on the host: inputs are stored as the model reads them (float32
        ``x / x_divisor``), so batches of the copy equal the batches of the stream.
        """
        if len(self) == 0:
            raise ValueError(f"{self.name or 'streamed dataset'} is empty; nothing to copy.")
        batch = self.read_batch(np.arange(len(self)))
        return Dataset(
            x=host_inputs(batch["x"], self.x_divisor),
            y=batch["y"],
            ids=self.ids,
            name=name or self.name,
            num_classes=self.num_classes,
            weights=batch.get("weights"),
        )


class StreamedColumn:
    """One field of a :class:`StreamedDataset` (``x``, ``y`` or ``weights``), read on demand.

    ``shape`` and ``dtype`` (what a batch carries to the model; inputs after ``x / x_divisor``) are
    known without reading. Indexing reads only the rows asked for: ``col[i]`` one example,
    ``col[a:b]``, ``col[[i, j]]`` or ``col[mask]`` a stacked ``[M, ...]`` array; iteration reads one
    row at a time. Converting the whole column to an array (``np.asarray(col)``) raises, since that
    would load the data set: stream it with :mod:`unlearn_jax.data.batching` or copy it explicitly
    with :meth:`StreamedDataset.to_dataset`.
    """

    def __init__(self, dataset: StreamedDataset, field: str):
        self._dataset = dataset
        self._field = field

    @property
    def shape(self) -> tuple[int, ...]:
        spec = self._dataset.shared.spec
        one = {"x": spec.x_shape, "y": spec.y_shape, "weights": spec.weights_shape}[self._field]
        return (len(self._dataset), *one)

    @property
    def dtype(self) -> np.dtype:
        ds = self._dataset
        if self._field == "x":
            return np.dtype(np.float32) if ds.x_divisor is not None else ds.storage_dtype
        if self._field == "weights":
            return np.dtype(np.float32)
        return np.dtype(np.float32 if ds.num_classes is None else np.int32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: Any) -> np.ndarray:
        n = len(self._dataset)
        if isinstance(index, int | np.integer) and not isinstance(index, bool):
            if not -n <= index < n:
                raise IndexError(f"index {index} is out of range for {n} examples.")
            return self._read(np.array([index % n]))[0]
        if isinstance(index, slice):
            return self._read(np.arange(n)[index])
        if isinstance(index, tuple) or index is Ellipsis or index is None:
            raise IndexError(
                "a streamed column is indexed by rows only (an int, a slice, integer positions or "
                f"a boolean mask), got {index!r}; select rows first, e.g. x[rows][..., j]."
            )
        selector = np.asarray(index)
        if selector.dtype == np.bool_:
            if selector.shape != (n,):
                raise IndexError(f"a boolean mask must have shape ({n},), got {selector.shape}.")
            selector = np.flatnonzero(selector)
        selector = as_id_array(selector, name="rows")
        return self._read(np.where(selector < 0, selector + n, selector))

    def _read(self, positions: np.ndarray) -> np.ndarray:
        values = self._dataset.read_batch(positions)[self._field]
        if self._field == "x":
            values = host_inputs(values, self._dataset.x_divisor)
        return values

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        del dtype, copy
        name = self._dataset.name or "the dataset"
        raise TypeError(
            f"{self._field} of {name} is streamed ({len(self)} examples read on demand), not held "
            f"in memory: read rows with {self._field}[rows], stream batches with "
            "unlearn_jax.data.batches / padded_batches, or make an in-memory copy with "
            ".to_dataset()."
        )

    def __repr__(self) -> str:
        return f"StreamedColumn({self._field}, shape={self.shape}, dtype={self.dtype})"


# ---- orders and unions (views) ---------------------------------------------------------------------
class _ConcatSource:
    """The records of two streamed datasets, one after the other, as ``{"x", "y"[, "weights"]}``."""

    def __init__(self, first: StreamedDataset, second: StreamedDataset):
        self.parts = (first, second)

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        first, second = self.parts
        part, position = (first, index) if index < len(first) else (second, index - len(first))
        record = part.source[int(part.rows[position])]
        out = {"x": record[part.x_key], "y": record[part.y_key]}
        if part.weights_key is not None:
            out["weights"] = record[part.weights_key]
        return out


def concat_streamed(first: Any, second: Any, name: str = "") -> StreamedDataset:
    """``first`` then ``second`` as one :class:`StreamedDataset` view (see :func:`dataset.concat`).

    Views of one source concatenate their record indices; other pairs (an in-memory
    :class:`Dataset` among them) read through a combined source. Both must store inputs alike.

    Raises:
      ValueError: datasets of different kinds, classes, shapes, stored input dtypes or divisors,
        or ids present in both.
    """
    first, second = as_streamed(first), as_streamed(second)
    for what, a, b in (
        ("kind", first.kind, second.kind),
        ("num_classes", first.num_classes, second.num_classes),
        ("input shape", first.input_shape, second.input_shape),
        ("target shape", first.target_shape, second.target_shape),
        ("stored input dtype", first.storage_dtype, second.storage_dtype),
        ("x_divisor", first.x_divisor, second.x_divisor),
    ):
        if a != b:
            raise ValueError(f"cannot concatenate datasets that differ in {what}: {a} vs {b}.")
    name = name or f"{first.name}+{second.name}"
    ids = np.concatenate([first.ids, second.ids])
    if first.shared is second.shared:
        return dataclasses.replace(
            first, ids=ids, rows=np.concatenate([first.rows, second.rows]), name=name, labels=None
        )
    combined = StreamedDataset(
        _ConcatSource(first, second),
        ids=ids,
        name=name,
        num_classes=first.num_classes,
        weights_key=None if first.weights_key is None else "weights",
        x_divisor=first.x_divisor,
        prefetch=max(first.prefetch, second.prefetch),
    )
    if combined.kind != SEQUENCE:
        combined.shared.label_fn = lambda: np.concatenate([first.y, second.y])
    return combined


def by_class_streamed(dataset: StreamedDataset) -> StreamedDataset:
    """The view stably sorted by label (reads the labels once if not known yet)."""
    dataset._require_classification("by_class")
    return dataset.take(np.argsort(dataset.y, kind="stable"))


class _ArraySource:
    """Records ``{"x": x[i], "y": y[i][, "weights": weights[i]]}`` of in-memory arrays."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ds = self.dataset
        out = {"x": ds.x[index], "y": ds.y[index]}
        if ds.weights is not None:
            out["weights"] = ds.weights[index]
        return out


def as_streamed(dataset: Dataset | StreamedDataset) -> StreamedDataset:
    """``dataset`` itself if streamed, else a streamed view of an in-memory :class:`Dataset`."""
    if isinstance(dataset, StreamedDataset):
        return dataset
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"expected an unlearn_jax.data.Dataset or StreamedDataset, got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{dataset.name or 'dataset'} is empty; there is nothing to stream.")
    return StreamedDataset(
        _ArraySource(dataset),
        ids=dataset.ids,
        name=dataset.name,
        num_classes=dataset.num_classes,
        weights_key=None if dataset.weights is None else "weights",
        labels=None if dataset.weights is not None else dataset.y,
        prefetch=0,
    )


__all__ = [
    "StreamedColumn",
    "StreamedDataset",
    "as_streamed",
    "by_class_streamed",
    "concat_streamed",
    "host_inputs",
    "inputs_as_float",
    "prefetched",
    "to_device",
]
