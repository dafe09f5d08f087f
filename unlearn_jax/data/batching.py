"""Batches of a :class:`Dataset` as JAX arrays: ``{"x": [B, ...], "y": [B, ...], "id": [B] int32}``,
plus ``"weights": [B, T]`` token weights for a sequence dataset.

Three ways to go through a dataset:

* :func:`batches`: one epoch, in dataset order or a keyed permutation; the last batch may be smaller.
* :func:`padded_batches`: one epoch of fixed-shape batches plus a ``[B]`` mask, so a jitted step
  compiles once even for the last, partial batch (padding rows are zeros with ``id == -1``).
* :func:`batch_stream`: an endless stream of full batches, reshuffled every epoch, for step-based
  loops.

Each accepts an in-memory :class:`Dataset` or a :class:`~unlearn_jax.data.stream.StreamedDataset`
and gives the same batches for the same examples and key. Rows are gathered on the host (numpy) and
each batch is copied to the device as it is yielded; a streamed dataset reads only the records of
each batch, a background thread reading ``dataset.prefetch`` batches ahead, and its inputs travel in
their storage dtype (uint8 images), becoming float32 on the device. For global batches over several
processes see :mod:`unlearn_jax.data.multihost`. The functions validate their arguments when called,
not at the first ``next``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.core.batch import MASK, pad_batch
from unlearn_jax.data.dataset import Dataset
from unlearn_jax.data.stream import StreamedDataset, prefetched, to_device

Batch = dict[str, jax.Array]
PADDING_ID = -1


def _check_batch_size(batch_size: Any) -> None:
    # Not _validate.positive_int: that one accepts None, which means nothing here.
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}.")


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = False) -> int:
    """The number of batches in one epoch of ``n`` examples.

    ``ceil(n / batch_size)``, or ``floor(n / batch_size)`` with ``drop_remainder``.

    Raises:
      ValueError: if ``n`` is not an integer >= 0 or ``batch_size`` is not an integer >= 1.

    Examples:
      >>> num_batches(10, 4), num_batches(10, 4, drop_remainder=True)
      (3, 2)
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got n={n!r}.")
    _check_batch_size(batch_size)
    return int(n // batch_size if drop_remainder else math.ceil(n / batch_size))


def _check(dataset: Any, batch_size: Any, key: Any) -> None:
    if not isinstance(dataset, Dataset | StreamedDataset):
        raise TypeError(
            "dataset must be an unlearn_jax.data.Dataset or StreamedDataset, got "
            f"{type(dataset).__name__}."
        )
    _check_batch_size(batch_size)
    if len(dataset) == 0:
        raise ValueError(f"{dataset.name or 'dataset'} is empty; there is nothing to batch.")
    if key is not None and isinstance(key, int | np.integer):
        raise TypeError(
            f"key must be a JAX PRNG key such as jax.random.key({key}), or None for dataset order; "
            f"got the integer {key}."
        )


def _epoch_order(n: int, key: Any) -> np.ndarray:
    """Positions of one epoch: ``arange(n)`` for ``key=None``, else ``jax.random.permutation``."""
    if key is None:
        return np.arange(n)
    return np.asarray(jax.random.permutation(key, n))


def read_rows(dataset: Dataset | StreamedDataset, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at positions ``idx [B]`` as a host batch ``{"x", "y", "id" int32[, "weights"]}``.

    An in-memory dataset is indexed; a streamed one reads those ``B`` records only, inputs in their
    storage dtype (:meth:`StreamedDataset.read_batch`).
    """
    if isinstance(dataset, StreamedDataset):
        return dataset.read_batch(idx)
    batch = {"x": dataset.x[idx], "y": dataset.y[idx], "id": dataset.ids[idx].astype(np.int32)}
    if dataset.weights is not None:
        batch["weights"] = dataset.weights[idx]
    return batch


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Completes a host batch of ``R <= rows`` examples with ``rows - R`` padding rows.

    Padding rows are zeros in each array's own dtype (int32 tokens stay int32, uint8 pixels uint8)
    with ``id == -1``.

    Returns:
      ``(batch, mask)``: every leaf with leading size ``rows``; ``mask [rows]`` float32, 1 for the
      ``R`` real rows (first), 0 for padding.
    """
    padded = pad_batch(batch, rows)  # the library's one padding helper (core.batch)
    mask = padded.pop(MASK)
    return padded, mask


def _read_ahead(dataset: Dataset | StreamedDataset) -> int:
    # An in-memory gather is a numpy index: reading ahead would only add a thread.
    return dataset.prefetch if isinstance(dataset, StreamedDataset) else 0


def _upload(dataset: Dataset | StreamedDataset, batch: dict[str, np.ndarray]) -> Batch:
    if isinstance(dataset, StreamedDataset):
        return to_device(batch, x_divisor=dataset.x_divisor)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def batches(
    dataset: Dataset, batch_size: int, *, key: Any = None, drop_remainder: bool = False
) -> Iterator[Batch]:
    """One epoch of batches ``{"x": [B, ...], "y": [B, ...], "id": [B] int32}``.

    Args:
      dataset: the examples.
      batch_size: examples per batch, >= 1.
      key: ``None`` for dataset order, or a PRNG key: the order is then
        ``jax.random.permutation(key, N)``, the same for the same key.
      drop_remainder: drop the final batch when it has fewer than ``batch_size`` examples.

    Returns:
      An iterator over ``num_batches(N, batch_size, drop_remainder=...)`` batches; the last has
      ``N % batch_size`` examples when that is non-zero and ``drop_remainder`` is False. Every example
      appears exactly once per epoch (at most once with ``drop_remainder``). It is a single pass:
      call again for another epoch (with a new key to reshuffle).

    Raises:
      ValueError: if ``batch_size`` is not an integer >= 1, the dataset is empty, or
        ``drop_remainder`` would leave no batch at all (``batch_size > N``).
      TypeError: if ``key`` is an int rather than a PRNG key.
    """
    _check(dataset, batch_size, key)
    n = len(dataset)
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {n} examples of {dataset.name or 'the dataset'}, "
            "so drop_remainder=True would yield no batch; lower batch_size or keep the remainder."
        )
    order = _epoch_order(n, key)
    stop = num_batches(n, batch_size, drop_remainder=drop_remainder) * batch_size

    def generate() -> Iterator[Batch]:
        chunks = (order[start : start + batch_size] for start in range(0, stop, batch_size))
        read = functools.partial(read_rows, dataset)
        for batch in prefetched(read, chunks, _read_ahead(dataset)):
            yield _upload(dataset, batch)

    return generate()


def padded_batches(
    dataset: Dataset, batch_size: int, *, key: Any = None
) -> Iterator[tuple[Batch, jax.Array]]:
    """One epoch of fixed-shape batches and masks, so one compiled step serves every batch.

    Every batch has exactly ``batch_size`` rows. The last batch of an epoch whose size ``N`` is not a
    multiple of ``batch_size`` is completed with padding rows: zeros in ``x`` and ``y`` and
    ``id == -1``. A step should weight its per-example losses by the mask, e.g.
    ``sum(mask * losses) / max(sum(mask), 1)``.

    Args:
      dataset: the examples.
      batch_size: rows per batch, >= 1.
      key: ``None`` for dataset order, or a PRNG key (order ``jax.random.permutation(key, N)``).

    Returns:
      An iterator over ``ceil(N / batch_size)`` pairs ``(batch, mask)``: ``batch`` as in
      :func:`batches` with leading size ``batch_size``, ``mask [batch_size]`` float32, 1 for real
      examples and 0 for padding. Real examples come first within a batch.

    Raises:
      ValueError: if ``batch_size`` is not an integer >= 1 or the dataset is empty.
      TypeError: if ``key`` is an int rather than a PRNG key.
    """
    _check(dataset, batch_size, key)
    n = len(dataset)
    order = _epoch_order(n, key)

    def read(idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return pad_rows(read_rows(dataset, idx), batch_size)

    def generate() -> Iterator[tuple[Batch, jax.Array]]:
        chunks = (order[start : start + batch_size] for start in range(0, n, batch_size))
        for batch, mask in prefetched(read, chunks, _read_ahead(dataset)):
            yield _upload(dataset, batch), jnp.asarray(mask)

    return generate()


def batch_stream(dataset: Dataset, batch_size: int, *, key: Any = None) -> Iterator[Batch]:
    """An endless stream of full batches, for loops that count steps rather than epochs.

    Epoch ``e`` visits the examples in the order ``jax.random.permutation(jax.random.fold_in(key,
    e), N)`` (dataset order for ``key=None``); the epochs are concatenated and cut into batches of
    exactly ``batch_size``, so a batch may straddle two epochs, and when ``batch_size > N`` a batch
    holds some examples twice. Every run of ``N`` consecutive examples that starts at an epoch
    boundary is a permutation of the dataset.

    Args:
      dataset: the examples.
      batch_size: examples per batch, >= 1.
      key: ``None`` or a PRNG key.

    Returns:
      An infinite iterator of batches ``{"x": [B, ...], "y": [B, ...], "id": [B] int32}``.

    Raises:
      ValueError: if ``batch_size`` is not an integer >= 1 or the dataset is empty.
      TypeError: if ``key`` is an int rather than a PRNG key.
    """
    _check(dataset, batch_size, key)
    n = len(dataset)

    def chunks() -> Iterator[np.ndarray]:
        epoch = 0
        pending = np.zeros((0,), np.int64)
        while True:
            while pending.shape[0] < batch_size:
                epoch_key = None if key is None else jax.random.fold_in(key, epoch)
                pending = np.concatenate([pending, _epoch_order(n, epoch_key)])
                epoch += 1
            yield pending[:batch_size]
            pending = pending[batch_size:]

    def generate() -> Iterator[Batch]:
        read = functools.partial(read_rows, dataset)
        for batch in prefetched(read, chunks(), _read_ahead(dataset)):
            yield _upload(dataset, batch)

    return generate()


def map_batches(fn, data: Any, batch_size: int) -> Any:
    """``fn`` applied to a whole data set in fixed-size padded batches: the one forward evaluator.

    ``fn(batch) -> pytree`` (leaves with a leading batch axis ``[B, ...]``) runs on batches of exactly
    ``batch_size`` rows (the last padded, so a jitted ``fn`` compiles once for any data set size), in
    order; the padding rows' results are dropped and the rest concatenated on the host.

    Args:
      fn: maps a batch dict (with ``"mask"``) to a pytree of per-example arrays.
      data: a :class:`Dataset` or :class:`StreamedDataset` (read one batch at a time), or a dict of
        host arrays with a common leading axis (cut into slices).
      batch_size: rows per batch, >= 1.

    Returns:
      ``fn``'s output pytree with leaves ``[N, ...]`` (numpy).

    Raises:
      ValueError: an empty data set or an invalid batch size.
    """
    _check_batch_size(batch_size)
    if isinstance(data, dict):
        n = next(iter(data.values())).shape[0]
        if n == 0:
            raise ValueError("map_batches: the batch is empty.")
        chunks = (pad_batch({k: v[s : s + batch_size] for k, v in data.items()}, batch_size)
                  for s in range(0, n, batch_size))  # fmt: skip
        pairs = ((c, c["mask"]) for c in chunks)
    else:
        pairs = ({**b, MASK: m} for b, m in padded_batches(data, batch_size))
        pairs = ((b, b[MASK]) for b in pairs)
    parts = []
    for batch, mask in pairs:
        real = int(np.sum(np.asarray(mask)))
        parts.append(jax.tree_util.tree_map(lambda a, r=real: np.asarray(a)[:r], fn(batch)))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)
