"""The deletion ledger: an append-only, hash-chained record of the deletion requests applied to a model.

One :class:`DeletionRecord` per request holds

* ``index`` (0, 1, ...) and ``request_id`` (the caller's reference for the request, unique);
* ``forget_ids_hash``: SHA-256 of the request's ids, sorted, de-duplicated and written as
  little-endian int64 (:func:`ids_hash`; equal to :func:`unlearn_jax.data.forget_ids_hash`), and
  ``count``, their number; ``ids`` themselves only when the caller asks for them (``record_ids``);
  ``forget_spec``, how the set was chosen (``"class:3"``, ``"random:0.1@seed0"``, ...), if known;
* ``method`` and ``config`` (its hyper-parameters and run settings);
* ``guarantee``: ``"exact"`` (equals retraining without the forget set), ``"certified"`` (an
  ``(epsilon, delta)`` certified removal; both are recorded) or ``"approximate"``;
* ``checkpoint_before`` / ``checkpoint_after``: the digests (:func:`checkpoint_digest
  <unlearn_jax.checkpoint.store.checkpoint_digest>`: arrays and metadata) of the model the request
  was applied to and of the model it produced;
* ``metrics`` and ``time`` (UTC, ISO 8601);
* ``previous``: the ``hash`` of the record before it (:data:`GENESIS`, 64 zeros, for the first), and
  ``hash``: SHA-256 of the record's canonical JSON without the ``hash`` field.

Canonical JSON: keys sorted, no whitespace, ASCII only (``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=True)``; Python writes floats by their shortest round-trip
``repr``, so a record read back from disk hashes to the same value).

Guarantees:
  :meth:`Ledger.verify` recomputes every hash. Changing any field of a record (an id, a hash, the
  method, a metric), or removing, inserting or reordering records, makes it fail and name the first
  record that does not check out. The chain protects *integrity*, not *authenticity*: whoever can
  write the ledger can also recompute every hash after an edit. To detect that, publish a record's
  ``hash`` somewhere the writer cannot change (a ticket, a log) and pass it later as
  ``verify(anchor=...)``: appending keeps an anchor in the chain, rewriting any record up to it
  removes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

LEDGER_FORMAT = "unlearn_jax.ledger/1"
GENESIS = "0" * 64
GUARANTEES = ("exact", "certified", "approximate")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INT64_MAX = int(np.iinfo(np.int64).max)


class LedgerError(ValueError):
    """A ledger whose records do not check out (a hash, the chain, an id set, a field).

    Attributes:
      index: the first record that failed, or ``None`` for a problem with the ledger as a whole.
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


# ---- canonical JSON and hashes ----------------------------------------------------------------------
def json_safe(value: Any, where: str = "") -> Any:
    """A JSON-safe copy of ``value``: numpy/JAX scalars and arrays become Python numbers and lists.

    Raises:
      TypeError: for a non-string dict key or a value JSON cannot hold (the message gives its path).
    """
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"keys must be strings, got {k!r} at {where or '<root>'}.")
            out[k] = json_safe(v, f"{where}/{k}" if where else k)
        return out
    if isinstance(value, list | tuple):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"the value at {where or '<root>'} is a {type(value).__name__}, which JSON cannot hold; "
        "use numbers, strings, booleans, None, lists and dicts (numpy scalars/arrays are converted)."
    )


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of a JSON-safe value (sorted keys, no whitespace, ASCII)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def ids_hash(ids: Any) -> str:
    """SHA-256 of a set of example ids: sorted, de-duplicated, written as little-endian int64.

    The same definition as :func:`unlearn_jax.data.forget_ids_hash` (repeated here because the
    checkpoint layer sits below the data layer).

    Args:
      ids: ``[M]`` integer ids.

    Returns:
      64 lowercase hex digits.
    """
    return sha256_hex(np.unique(_id_array(ids)).astype("<i8").tobytes())


def _id_array(ids: Any) -> np.ndarray:
    """``ids`` as a 1-D int64 array of values in ``[0, 2**63 - 1]``; a clear error otherwise."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of integers, got shape {arr.shape}.")
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.dtype == object:  # Python ints beyond 64 bits, or mixed values
        if all(isinstance(v, int) and not isinstance(v, bool) for v in arr.tolist()):
            bad = next(v for v in arr.tolist() if not 0 <= v <= _INT64_MAX)
            raise ValueError(f"ids must be integers in [0, 2**63 - 1], got {bad}.")
        raise ValueError(f"ids must be integers, got values such as {arr[:3].tolist()}.")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}.")
    if np.issubdtype(arr.dtype, np.unsignedinteger) and int(arr.max()) > _INT64_MAX:
        raise ValueError(f"ids must be integers in [0, 2**63 - 1], got {int(arr.max())}.")
    arr = arr.astype(np.int64)
    if int(arr.min()) < 0:
        raise ValueError(f"ids must be integers >= 0, got {int(arr.min())}.")
    return arr


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- records ------------------------------------------------------------------------------------
_FIELDS = (
    "index",
    "request_id",
    "forget_ids_hash",
    "count",
    "ids",
    "forget_spec",
    "method",
    "config",
    "guarantee",
    "epsilon",
    "delta",
    "checkpoint_before",
    "checkpoint_after",
    "metrics",
    "time",
    "previous",
    "hash",
)


@dataclasses.dataclass(frozen=True)
class DeletionRecord:
    """One deletion request applied to a model (see the module docstring for each field).

    Build records with :meth:`Ledger.append`, which fills ``index``, ``previous`` and ``hash``.
    """

    index: int
    request_id: str
    forget_ids_hash: str
    count: int
    ids: tuple[int, ...] | None
    forget_spec: str | None
    method: str
    config: dict[str, Any]
    guarantee: str
    epsilon: float | None
    delta: float | None
    checkpoint_before: str
    checkpoint_after: str
    metrics: dict[str, Any]
    time: str
    previous: str
    hash: str

    def body(self) -> dict[str, Any]:
        """The record as JSON-safe dict without ``hash``: what the hash is computed over."""
        out = {f: getattr(self, f) for f in _FIELDS if f != "hash"}
        out["ids"] = None if self.ids is None else list(self.ids)
        return out

    def compute_hash(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`body`."""
        return sha256_hex(canonical_json(self.body()))

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-safe dict, ``hash`` included."""
        return {**self.body(), "hash": self.hash}

    @classmethod
    def from_json(cls, value: Any, index: int) -> DeletionRecord:
        """The record a :meth:`to_json` dict describes.

        Raises:
          LedgerError: for a value that is not a dict, or one with missing or unknown fields.
        """
        if not isinstance(value, dict):
            raise LedgerError(
                f"ledger record {index} is a {type(value).__name__}, expected a JSON object.", index
            )
        missing = [f for f in _FIELDS if f not in value]
        unknown = sorted(set(value) - set(_FIELDS))
        if missing or unknown:
            raise LedgerError(
                f"ledger record {index} has missing fields {missing} and unknown fields {unknown}; "
                f"expected exactly {list(_FIELDS)}.",
                index,
            )
        ids = value["ids"]
        if isinstance(ids, list):
            ids = tuple(ids)
        return cls(**{**value, "ids": ids})


def _check_fields(record: DeletionRecord, k: int) -> None:
    """Raises ``LedgerError`` for a field of the wrong type or form (record ``k``)."""

    def fail(what: str) -> LedgerError:
        return LedgerError(
            f"ledger record {k} (request {record.request_id!r}): {what}.",
            k,
        )

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(record.index):
        raise fail(f"index={record.index!r} is not an integer")
    if not isinstance(record.request_id, str) or not record.request_id:
        raise fail(f"request_id={record.request_id!r} is not a non-empty string")
    for name in ("forget_ids_hash", "checkpoint_before", "checkpoint_after", "previous", "hash"):
        value = getattr(record, name)
        if not isinstance(value, str) or not _HEX64.match(value):
            raise fail(f"{name}={value!r} is not a SHA-256 (64 lowercase hex digits)")
    if not is_int(record.count) or record.count < 1:
        raise fail(f"count={record.count!r} is not an integer >= 1")
    if record.ids is not None and (
        not isinstance(record.ids, tuple)
        or not all(is_int(i) and 0 <= i <= _INT64_MAX for i in record.ids)
    ):
        raise fail("ids must be null or a list of integers in [0, 2**63 - 1]")
    if record.forget_spec is not None and not isinstance(record.forget_spec, str):
        raise fail(f"forget_spec={record.forget_spec!r} is not a string or null")
    if not isinstance(record.method, str) or not record.method:
        raise fail(f"method={record.method!r} is not a non-empty string")
    for name in ("config", "metrics"):
        if not isinstance(getattr(record, name), dict):
            raise fail(f"{name} is a {type(getattr(record, name)).__name__}, expected a dict")
    if not isinstance(record.time, str):
        raise fail(f"time={record.time!r} is not a string")
    try:
        _check_guarantee(record.guarantee, record.epsilon, record.delta)
    except ValueError as err:
        raise fail(str(err).rstrip(".")) from None


def _check_guarantee(guarantee: Any, epsilon: Any, delta: Any) -> None:
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee={guarantee!r} must be one of {list(GUARANTEES)}.")
    if guarantee == "certified":
        ok_eps = isinstance(epsilon, int | float) and not isinstance(epsilon, bool)
        ok_delta = isinstance(delta, int | float) and not isinstance(delta, bool)
        if not (ok_eps and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(
                f"a certified guarantee needs a finite epsilon > 0, got epsilon={epsilon!r}."
            )
        if not (ok_delta and math.isfinite(delta) and 0 <= delta < 1):
            raise ValueError(f"a certified guarantee needs delta in [0, 1), got delta={delta!r}.")
    elif epsilon is not None or delta is not None:
        raise ValueError(
            f"epsilon and delta belong to a certified guarantee only; got guarantee={guarantee!r} "
            f"with epsilon={epsilon!r}, delta={delta!r}."
        )


def _check_digest(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(
            f"{name} must be a checkpoint digest (64 lowercase hex digits, from "
            f"unlearn_jax.checkpoint.checkpoint_digest), got {name}={value!r}."
        )
    return value


# ---- the ledger ----------------------------------------------------------------------------------
class Ledger:
    """An immutable sequence of :class:`DeletionRecord`; :meth:`append` returns a longer ledger.

    Examples:
      >>> before, after = "a" * 64, "b" * 64
      >>> ledger = Ledger().append([7, 3], method="retrain", guarantee="exact", before=before,
      ...                          after=after, time="2025-01-01T00:00:00+00:00")
      >>> len(ledger), ledger[0].count, ledger[0].ids, ledger[0].previous == GENESIS
      (1, 2, None, True)
      >>> ledger.verify()
    """

    __slots__ = ("_records",)

    def __init__(self, records: Any = ()):
        records = tuple(records)
        for i, r in enumerate(records):
            if not isinstance(r, DeletionRecord):
                raise TypeError(f"ledger record {i} is a {type(r).__name__}, not a DeletionRecord.")
        self._records = records

    @property
    def records(self) -> tuple[DeletionRecord, ...]:
        return self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[DeletionRecord]:
        return iter(self._records)

    def __getitem__(self, index: int) -> DeletionRecord:
        return self._records[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ledger) and [r.to_json() for r in self] == [
            r.to_json() for r in other
        ]

    def __hash__(self) -> int:
        return hash(self.head_hash)

    def __repr__(self) -> str:
        return f"Ledger({len(self)} record(s), head={self.head_hash[:12]})"

    @property
    def head(self) -> DeletionRecord | None:
        """The last record, or ``None`` for an empty ledger."""
        return self._records[-1] if self._records else None

    @property
    def head_hash(self) -> str:
        """The last record's hash (:data:`GENESIS` for an empty ledger)."""
        return self._records[-1].hash if self._records else GENESIS

    def append(
        self,
        forget_ids: Any,
        *,
        method: str,
        before: str,
        after: str,
        guarantee: str = "approximate",
        epsilon: float | None = None,
        delta: float | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        forget_spec: str | None = None,
        record_ids: bool = False,
        time: str | datetime.datetime | None = None,
    ) -> Ledger:
        """A new ledger with one more record: the request that removed ``forget_ids``.

        Args:
          forget_ids: ``[M]`` integer ids (>= 0, no repeats) of the examples removed.
          method: the unlearning method's name.
          before, after: :func:`~unlearn_jax.checkpoint.checkpoint_digest` of the model the request
            was applied to and of the model it produced.
          guarantee: ``"exact"``, ``"certified"`` or ``"approximate"``; a method states its own as
            ``method.guarantee`` (read it with ``getattr(method, "guarantee", "approximate")``).
          epsilon, delta: the certified removal's parameters (``epsilon > 0``, ``0 <= delta < 1``);
            only with ``guarantee="certified"``, and then required.
          config: the method's hyper-parameters and run settings (JSON-safe; numpy values are
            converted).
          metrics: measurements of the result (UA, RA, ...), JSON-safe.
          request_id: the caller's reference for the request; unique in the ledger. Default
            ``"request-<index>"``.
          forget_spec: how the forget set was chosen (e.g. ``"class:3"``), if it can be said.
          record_ids: store the ids themselves (sorted). By default only their hash and count are
            stored, so the ledger does not list the deleted examples.
          time: when the request was applied; default now (UTC), ISO 8601.

        Returns:
          A new :class:`Ledger`; this one is unchanged.

        Raises:
          ValueError: empty or repeated ids, an unknown guarantee, epsilon/delta missing for (or
            given without) a certified guarantee, a malformed digest, or a repeated request id.
          TypeError: a config or metrics value JSON cannot hold.
        """
        ids = _id_array(forget_ids)
        if ids.size == 0:
            raise ValueError("forget_ids is empty: a deletion request removes at least one id.")
        unique = np.unique(ids)
        if unique.size != ids.size:
            ordered = np.sort(ids)
            repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
            raise ValueError(f"forget_ids must not repeat, got {repeated[:5].tolist()} repeated.")
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string, got method={method!r}.")
        _check_guarantee(guarantee, epsilon, delta)
        index = len(self)
        if request_id is None:
            request_id = f"request-{index}"
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}.")
        taken = [r.index for r in self if r.request_id == request_id]
        if taken:
            raise ValueError(
                f"request_id={request_id!r} is already used by ledger record {taken[0]}; request "
                "ids must be unique."
            )
        if forget_spec is not None and not isinstance(forget_spec, str):
            raise ValueError(f"forget_spec must be a string or None, got {forget_spec!r}.")
        if isinstance(time, datetime.datetime):
            time = time.isoformat()
        elif time is None:
            time = _utc_now()
        elif not isinstance(time, str):
            raise ValueError(f"time must be an ISO 8601 string or a datetime, got {time!r}.")
        fields = {
            "index": index,
            "request_id": request_id,
            "forget_ids_hash": ids_hash(unique),
            "count": int(unique.size),
            "ids": tuple(int(i) for i in unique) if record_ids else None,
            "forget_spec": forget_spec,
            "method": method,
            "config": json_safe(dict(config or {}), "config"),
            "guarantee": guarantee,
            "epsilon": None if epsilon is None else float(epsilon),
            "delta": None if delta is None else float(delta),
            "checkpoint_before": _check_digest("before", before),
            "checkpoint_after": _check_digest("after", after),
            "metrics": json_safe(dict(metrics or {}), "metrics"),
            "time": time,
            "previous": self.head_hash,
            "hash": GENESIS,  # replaced below: the hash is over every other field
        }
        record = DeletionRecord(**fields)
        record = dataclasses.replace(record, hash=record.compute_hash())
        return Ledger((*self._records, record))

    def verify(self, *, anchor: str | None = None) -> None:
        """Recomputes every record's hash and the chain; raises at the first that does not check out.

        Checks, for record ``k`` in order: its fields' types and forms (SHA-256s are 64 hex digits,
        a certified guarantee carries ``epsilon > 0`` and ``0 <= delta < 1``, ...); ``index == k``;
        unique ``request_id``; recorded ids sorted without repeats, ``count`` of them, hashing to
        ``forget_ids_hash``; ``previous`` equal to record ``k - 1``'s hash (:data:`GENESIS` for
        ``k = 0``); ``hash`` equal to the SHA-256 of its canonical JSON.

        Args:
          anchor: a record hash published earlier; the ledger must still contain it.

        Raises:
          LedgerError: naming the first record (and field) that does not check out, or the anchor
            that is missing.
        """
        previous = GENESIS
        seen: dict[str, int] = {}
        for k, record in enumerate(self._records):
            _check_fields(record, k)
            where = f"ledger record {k} (request {record.request_id!r})"
            if record.index != k:
                raise LedgerError(f"{where}: index is {record.index}, expected {k}.", k)
            if record.request_id in seen:
                raise LedgerError(
                    f"{where}: request_id repeats record {seen[record.request_id]}'s.", k
                )
            seen[record.request_id] = k
            if record.ids is not None:
                if list(record.ids) != sorted(set(record.ids)):
                    raise LedgerError(f"{where}: its ids are not sorted and distinct.", k)
                if len(record.ids) != record.count:
                    raise LedgerError(
                        f"{where}: count is {record.count} but {len(record.ids)} ids are recorded.",
                        k,
                    )
                actual = ids_hash(list(record.ids))
                if actual != record.forget_ids_hash:
                    raise LedgerError(
                        f"{where}: forget_ids_hash is {record.forget_ids_hash} but its "
                        f"{len(record.ids)} recorded ids hash to {actual}: the ids or their hash "
                        "were altered.",
                        k,
                    )
            if record.previous != previous:
                raise LedgerError(
                    f"{where}: previous is {record.previous} but the record before it hashes to "
                    f"{previous}: a record was altered, removed, inserted or reordered.",
                    k,
                )
            actual = record.compute_hash()
            if actual != record.hash:
                raise LedgerError(
                    f"{where}: its contents hash to {actual}, but its recorded hash is "
                    f"{record.hash}: the record was altered after it was appended.",
                    k,
                )
            previous = record.hash
        if anchor is not None:
            if not isinstance(anchor, str) or not _HEX64.match(anchor):
                raise ValueError(f"anchor must be a record hash (64 hex digits), got {anchor!r}.")
            if all(r.hash != anchor for r in self._records):
                raise LedgerError(
                    f"the ledger ({len(self)} record(s), head {self.head_hash}) does not contain "
                    f"the anchor {anchor}: records up to the anchored one were rewritten or removed."
                )

    def gaps(self) -> tuple[int, ...]:
        """The records ``k >= 1`` whose ``checkpoint_before`` is not record ``k - 1``'s
        ``checkpoint_after``: the model was changed (e.g. trained further) between the two requests.
        """
        return tuple(
            k
            for k in range(1, len(self))
            if self[k].checkpoint_before != self[k - 1].checkpoint_after
        )

    def to_json(self) -> dict[str, Any]:
        """``{"format": LEDGER_FORMAT, "records": [record dicts]}``."""
        return {"format": LEDGER_FORMAT, "records": [r.to_json() for r in self]}

    @classmethod
    def from_json(cls, value: Any) -> Ledger:
        """The ledger a :meth:`to_json` value describes (not verified: call :meth:`verify`).

        Raises:
          LedgerError: for a value of the wrong format or a record with missing/unknown fields.
        """
        if (
            not isinstance(value, dict)
            or value.get("format") != LEDGER_FORMAT
            or not isinstance(value.get("records"), list)
        ):
            found = value.get("format") if isinstance(value, dict) else type(value).__name__
            raise LedgerError(
                f"not a deletion ledger: expected {{'format': {LEDGER_FORMAT!r}, 'records': [...]}},"
                f" found format {found!r}."
            )
        return cls(DeletionRecord.from_json(r, i) for i, r in enumerate(value["records"]))


__all__ = [
    "GENESIS",
    "GUARANTEES",
    "LEDGER_FORMAT",
    "DeletionRecord",
    "Ledger",
    "LedgerError",
    "canonical_json",
    "ids_hash",
    "json_safe",
]
