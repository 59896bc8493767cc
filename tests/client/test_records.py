"""Typed local records: strict decoding, optional fields, scoped tables and bounded rings."""

from __future__ import annotations

from pathlib import Path

import pytest

from backchannel.client.records import (
    CounterRecord,
    DistributionRecord,
    LineRecord,
    PeerRecord,
    Ring,
    Table,
)
from backchannel.client.store import Store, StoreCorrupt
from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import decode, encode

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
LINE = LineRecord(kind="message", text="a phased withdrawal", ts=1_800_000_000, sender=b"\x01" * 32)


def make(tmp_path: Path) -> Store:
    return Store.create(tmp_path, "pw", **FAST)


def fields_of(record: LineRecord) -> dict[str, object]:
    value = decode(record.to_bytes())
    assert isinstance(value, dict)
    return dict(value)


def test_a_record_round_trips_through_the_store(tmp_path: Path) -> None:
    store = make(tmp_path)
    lines: Table[LineRecord] = Table(store, "line", LineRecord)
    lines.put(b"k", LINE)
    assert fields_of(LINE) == {
        "v": 1,
        "kind": "message",
        "text": "a phased withdrawal",
        "ts": 1_800_000_000,
        "sender": b"\x01" * 32,
    }
    store.close()
    again = Store.open(tmp_path, "pw")
    assert Table(again, "line", LineRecord).get(b"k") == LINE
    dist = DistributionRecord(generation=3, to=[b"a" * 32, b"b" * 32])
    assert DistributionRecord.from_bytes(dist.to_bytes()) == dist
    again.close()


def test_optional_fields_absent_stay_none() -> None:
    bare = LineRecord(kind="notice", text="ann joined", ts=5)
    assert "sender" not in fields_of(bare)
    assert "to" not in fields_of(bare)
    back = LineRecord.from_bytes(bare.to_bytes())
    assert back.sender is None
    assert back.to is None
    assert PeerRecord.from_bytes(encode({"v": 1})) == PeerRecord()


def _variants() -> list[tuple[str, dict[str, object]]]:
    good = fields_of(LINE)
    no_text = {k: v for k, v in good.items() if k != "text"}
    return [
        ("unknown version", {**good, "v": 2}),
        ("no version", {k: v for k, v in good.items() if k != "v"}),
        ("unknown field", {**good, "extra": 1}),
        ("missing field", no_text),
        ("text as int", {**good, "text": 7}),
        ("int as text", {**good, "ts": "7"}),
        ("int as bool", {**good, "ts": True}),
        ("bytes as text", {**good, "sender": "x"}),
        ("optional as null", {**good, "to": None}),
    ]


@pytest.mark.parametrize(("what", "value"), _variants(), ids=[w for w, _ in _variants()])
def test_a_malformed_record_is_corrupt_never_half_read(what: str, value: dict[str, object]) -> None:
    with pytest.raises(StoreCorrupt):
        LineRecord.from_bytes(encode(value))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe not cbor",
        encode([1, 2]),
        encode({"v": 1, "generation": 1, "to": [b"ok", 3]}),
        encode({"v": 1, "generation": 1, "to": b"not a list"}),
    ],
    ids=["empty", "garbage", "not a map", "list item not bytes", "list not a list"],
)
def test_undecodable_bytes_are_corrupt(data: bytes) -> None:
    with pytest.raises(StoreCorrupt):
        DistributionRecord.from_bytes(data)


def test_a_corrupt_row_read_through_a_table_is_corrupt(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.put("line", b"k", encode({**fields_of(LINE), "v": 9}), scope=b"room")  # type: ignore[dict-item]
    lines: Table[LineRecord] = Table(store, "line", LineRecord)
    with pytest.raises(StoreCorrupt):
        lines.get(b"k")
    with pytest.raises(StoreCorrupt):
        list(lines.scan(b"room"))


def test_table_scan_returns_only_its_scope(tmp_path: Path) -> None:
    store = make(tmp_path)
    counters: Table[CounterRecord] = Table(store, "c", CounterRecord)
    other_ns: Table[CounterRecord] = Table(store, "d", CounterRecord)
    for n in range(3):
        counters.put(b"a" + bytes([n]), CounterRecord(n=n), scope=b"room-a")
    counters.put(b"b", CounterRecord(n=10), scope=b"room-b")
    counters.put(b"none", CounterRecord(n=20))
    other_ns.put(b"x", CounterRecord(n=30), scope=b"room-a")
    assert sorted(c.n for c in counters.scan(b"room-a")) == [0, 1, 2]
    assert [c.n for c in counters.scan(b"room-b")] == [10]
    assert sorted(c.n for c in counters.all()) == [0, 1, 2, 10, 20]
    counters.drop(b"room-a")
    assert list(counters.scan(b"room-a")) == []
    assert [c.n for c in counters.scan(b"room-b")] == [10]
    assert [c.n for c in other_ns.scan(b"room-a")] == [30]


def test_ring_keeps_the_newest_size_rows_per_scope(tmp_path: Path) -> None:
    store = make(tmp_path)
    ring: Ring[CounterRecord] = Ring(store, "r", CounterRecord, 3)
    for n in range(7):
        ring.add(b"A", b"A" + bytes([n]), CounterRecord(n=n))
    ring.add(b"B", b"B0", CounterRecord(n=100))
    assert sorted(c.n for c in ring.items.scan(b"A")) == [4, 5, 6]
    # The evicted rows are gone from the store, not only from the scan.
    for n in range(4):
        assert ring.items.get(b"A" + bytes([n])) is None
    assert ring.items.get(b"A" + bytes([6])) == CounterRecord(n=6)
    assert [c.n for c in ring.items.scan(b"B")] == [100]
    # The ring survives reopening: the counter and slots are stored, not in memory.
    store.close()
    again = Store.open(tmp_path, "pw")
    ring = Ring(again, "r", CounterRecord, 3)
    ring.add(b"A", b"A" + bytes([7]), CounterRecord(n=7))
    assert sorted(c.n for c in ring.items.scan(b"A")) == [5, 6, 7]
    again.close()


def test_ring_keeps_within_its_byte_budget(tmp_path: Path) -> None:
    store = make(tmp_path)
    ring: Ring[CounterRecord] = Ring(store, "r", CounterRecord, 10, max_bytes=100)
    assert ring.add(b"A", b"a", CounterRecord(n=1), size=40)
    assert ring.add(b"A", b"b", CounterRecord(n=2), size=40)
    assert ring.add(b"A", b"c", CounterRecord(n=3), size=40)  # 120 > 100: the oldest goes
    assert sorted(c.n for c in ring.items.scan(b"A")) == [2, 3]
    assert ring.add(b"A", b"d", CounterRecord(n=4), size=20)  # exactly 100: nothing goes
    assert sorted(c.n for c in ring.items.scan(b"A")) == [2, 3, 4]
    # One row over the whole budget is refused, and evicts nothing.
    assert not ring.add(b"A", b"e", CounterRecord(n=5), size=101)
    assert ring.items.get(b"e") is None
    assert sorted(c.n for c in ring.items.scan(b"A")) == [2, 3, 4]


def test_ring_drop_clears_one_scope_only(tmp_path: Path) -> None:
    store = make(tmp_path)
    ring: Ring[CounterRecord] = Ring(store, "r", CounterRecord, 2)
    for scope in (b"A", b"B"):
        for n in range(2):
            ring.add(scope, scope + bytes([n]), CounterRecord(n=n))
    ring.drop(b"A")
    assert list(ring.items.scan(b"A")) == []
    assert sorted(c.n for c in ring.items.scan(b"B")) == [0, 1]
    # A dropped scope starts afresh: two new rows fit and nothing of B is evicted.
    ring.add(b"A", b"A9", CounterRecord(n=9))
    ring.add(b"A", b"A8", CounterRecord(n=8))
    assert sorted(c.n for c in ring.items.scan(b"A")) == [8, 9]
    assert sorted(c.n for c in ring.items.scan(b"B")) == [0, 1]


def test_ring_re_adding_a_key_does_not_lose_it_early(tmp_path: Path) -> None:
    store = make(tmp_path)
    ring: Ring[CounterRecord] = Ring(store, "r", CounterRecord, 2)
    ring.add(b"A", b"a", CounterRecord(n=1))
    ring.add(b"A", b"a", CounterRecord(n=1))  # e.g. the same message stashed twice
    ring.add(b"A", b"b", CounterRecord(n=2))
    # Two distinct rows were added and the ring holds two: both should still be there.
    assert sorted(c.n for c in ring.items.scan(b"A")) == [1, 2]
