"""The deletion ledger: hashes against hand computations, and every kind of tampering named."""

import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest

from unlearn_jax.checkpoint import GENESIS, DeletionRecord, Ledger, LedgerError, ids_hash
from unlearn_jax.data import forget_ids_hash

A, B, C = "a" * 64, "b" * 64, "c" * 64
T0 = "2025-01-01T00:00:00+00:00"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _two(record_ids=True) -> Ledger:
    ledger = Ledger().append(
        [9, 2, 5],
        method="retrain",
        before=A,
        after=B,
        guarantee="exact",
        config={"epochs": 3, "lr": np.float32(0.5)},
        metrics={"UA": 12.5},
        forget_spec="ids:3@x",
        record_ids=record_ids,
        time=T0,
    )
    return ledger.append(
        np.array([7], np.int32),
        method="certified_removal",
        before=B,
        after=C,
        guarantee="certified",
        epsilon=1.0,
        delta=1e-5,
        request_id="ticket-42",
        record_ids=record_ids,
        time=T0,
    )


def test_ids_hash_is_sha256_of_sorted_unique_little_endian_int64():
    ids = [9, 2, 5, 2**40]
    want = _sha(struct.pack("<4q", 2, 5, 9, 2**40))  # written out by hand
    assert ids_hash(ids) == want
    assert ids_hash(np.array([2**40, 5, 9, 2], np.int64)) == want
    assert ids_hash(np.array([5, 9, 2], np.uint16)) == _sha(struct.pack("<3q", 2, 5, 9))
    # The checkpoint layer's definition is the data layer's.
    assert ids_hash(ids) == forget_ids_hash(ids)


def test_append_chains_records_and_hashes_their_canonical_json():
    ledger = _two()
    first, second = ledger
    assert [r.index for r in ledger] == [0, 1]
    assert first.request_id == "request-0" and second.request_id == "ticket-42"
    assert first.ids == (2, 5, 9) and first.count == 3 and second.count == 1
    assert first.forget_ids_hash == ids_hash([2, 5, 9])
    assert first.config == {"epochs": 3, "lr": 0.5}  # numpy values converted
    assert (first.guarantee, first.epsilon, first.delta) == ("exact", None, None)
    assert (second.guarantee, second.epsilon, second.delta) == ("certified", 1.0, 1e-5)
    # The chain: the first record points at 64 zeros, the second at the first's hash.
    assert first.previous == GENESIS == "0" * 64 and second.previous == first.hash
    assert ledger.head is second and ledger.head_hash == second.hash
    # Each hash is SHA-256 of the record's JSON without "hash", keys sorted, no whitespace.
    for record in ledger:
        body = {k: v for k, v in record.to_json().items() if k != "hash"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        assert record.hash == _sha(text.encode())
    ledger.verify()
    assert Ledger().head is None and Ledger().head_hash == GENESIS


def test_ids_are_stored_only_when_asked_for():
    ledger = _two(record_ids=False)
    assert [r.ids for r in ledger] == [None, None]
    assert ledger[0].forget_ids_hash == ids_hash([2, 5, 9]) and ledger[0].count == 3
    assert "9" not in json.dumps(ledger[0].to_json()["ids"])
    ledger.verify()


def test_json_round_trip_keeps_every_hash():
    ledger = _two()
    back = Ledger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert back == ledger
    back.verify()
    with pytest.raises(LedgerError, match="not a deletion ledger"):
        Ledger.from_json({"records": []})
    broken = ledger.to_json()
    del broken["records"][1]["metrics"]
    broken["records"][1]["extra"] = 1
    with pytest.raises(LedgerError, match=r"record 1 has missing fields \['metrics'\] and unknown"):
        Ledger.from_json(broken)


def _edit(ledger: Ledger, k: int, **changes) -> Ledger:
    records = list(ledger)
    records[k] = dataclasses.replace(records[k], **changes)
    return Ledger(records)


def _rehash(records) -> Ledger:
    """What a forger who recomputes every hash after an edit writes."""
    out, previous = [], GENESIS
    for k, r in enumerate(records):
        r = dataclasses.replace(r, index=k, previous=previous)
        r = dataclasses.replace(r, hash=r.compute_hash())
        out.append(r)
        previous = r.hash
    return Ledger(out)


@pytest.mark.parametrize(
    "tamper, index, message",
    [
        # One bit of a recorded id flipped (5 -> 4).
        (lambda g: _edit(g, 0, ids=(2, 4, 9)), 0, "recorded ids hash to"),
        # A forged ids hash that is not even a SHA-256.
        (lambda g: _edit(g, 1, forget_ids_hash="deadbeef"), 1, "'deadbeef' is not a SHA-256"),
        # A well-formed but wrong ids hash, with the ids recorded: the ids disagree.
        (lambda g: _edit(g, 0, forget_ids_hash=ids_hash([1])), 0, "recorded ids hash to"),
        # A changed metric: the record's own hash no longer matches.
        (lambda g: _edit(g, 0, metrics={"UA": 99.0}), 0, "altered after it was appended"),
        (lambda g: _edit(g, 1, method="retrain"), 1, "altered after it was appended"),
        (lambda g: _edit(g, 0, count=4), 0, "count is 4 but 3 ids"),
        (lambda g: _edit(g, 1, guarantee="proven"), 1, "must be one of"),
        (lambda g: _edit(g, 1, delta=1.5), 1, r"delta in \[0, 1\)"),
        # Removing, reordering or duplicating records breaks the chain (or the index).
        (lambda g: Ledger([g[1]]), 0, "index is 1, expected 0"),
        (lambda g: Ledger([dataclasses.replace(g[1], index=0)]), 0, "previous is"),
        (lambda g: Ledger([g[0], dataclasses.replace(g[0], index=1)]), 1, "request_id repeats"),
    ],
)
def test_tampering_is_named_at_the_first_bad_record(tamper, index, message):
    with pytest.raises(LedgerError, match=message) as info:
        tamper(_two()).verify()
    assert info.value.index == index
    assert f"ledger record {index}" in str(info.value)


def test_without_recorded_ids_a_changed_ids_hash_breaks_the_record_hash():
    ledger = _edit(_two(record_ids=False), 0, forget_ids_hash=ids_hash([1, 2, 3]))
    with pytest.raises(LedgerError, match=r"record 0 .* altered after it was appended"):
        ledger.verify()


def test_an_anchor_catches_a_rewritten_chain():
    ledger = _two()
    anchor = ledger[0].hash
    ledger.verify(anchor=anchor)
    longer = ledger.append([11], method="finetune", before=C, after=A, time=T0)
    longer.verify(anchor=anchor)  # appending keeps the anchor
    # A forger rewrites record 0 and recomputes every hash: the chain checks out, the anchor does not.
    forged = _rehash([dataclasses.replace(ledger[0], metrics={"UA": 100.0}), ledger[1]])
    forged.verify()
    with pytest.raises(LedgerError, match=f"does not contain the anchor {anchor}"):
        forged.verify(anchor=anchor)
    with pytest.raises(ValueError, match="anchor must be a record hash"):
        ledger.verify(anchor="deadbeef")


def test_gaps_are_requests_that_start_from_another_model():
    ledger = _two()
    assert ledger.gaps() == ()
    assert ledger.append([1], method="ssd", before=A, after=B, time=T0).gaps() == (2,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forget_ids": []}, "forget_ids is empty"),
        ({"forget_ids": [3, 1, 3]}, r"must not repeat, got \[3\]"),
        ({"forget_ids": [-1]}, "integers >= 0"),
        ({"forget_ids": [2**64]}, r"in \[0, 2\*\*63 - 1\], got 18446744073709551616"),
        ({"forget_ids": np.array([2**63], np.uint64)}, r"in \[0, 2\*\*63 - 1\]"),
        ({"forget_ids": [0.5]}, "must be integers, got dtype float64"),
        ({"guarantee": "certified"}, "finite epsilon > 0, got epsilon=None"),
        ({"guarantee": "certified", "epsilon": 1.0}, r"delta in \[0, 1\), got delta=None"),
        ({"guarantee": "exact", "epsilon": 1.0}, "belong to a certified guarantee only"),
        ({"guarantee": "perfect"}, "must be one of"),
        ({"before": "deadbeef"}, "before must be a checkpoint digest"),
        ({"request_id": "request-0"}, "already used by ledger record 0"),
        ({"method": ""}, "method must be a non-empty string"),
        ({"metrics": {"fn": len}}, "metrics/fn is a builtin_function_or_method"),
    ],
)
def test_bad_appends_name_the_value(kwargs, message):
    ledger = Ledger().append([1], method="ssd", before=A, after=B, time=T0)
    args = {"forget_ids": [4], "method": "ssd", "before": B, "after": C, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        ledger.append(args.pop("forget_ids"), **args)
    assert len(ledger) == 1  # unchanged: append returns a new ledger


def test_records_are_immutable_and_the_ledger_holds_only_records():
    ledger = _two()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ledger[0].method = "x"
    with pytest.raises(TypeError, match="record 0 is a dict"):
        Ledger([ledger[0].to_json()])
    assert isinstance(ledger[0], DeletionRecord)


def test_docstring_examples():
    import doctest

    from unlearn_jax.checkpoint import ledger

    result = doctest.testmod(ledger, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
