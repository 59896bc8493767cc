"""Rooms in the store: a room record, one row per log event and a cursor row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backchannel.client.errors import ClientError
from backchannel.client.room import Room, Rooms
from backchannel.client.store import Store, StoreCorrupt
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import MemberKeyPair

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
NOW = 1_800_000_000


def make(tmp_path: Path) -> Store:
    return Store.create(tmp_path, "pw", **FAST)


def local_room(name: str, title: str, invites: int = 2) -> Room:
    """A room built and validated locally: a create event and ``invites`` invites."""
    key = MemberKeyPair.generate()
    create = L.make_create(key, L.Rules(mode="attributed"), NOW)
    log = L.validate_log([create])
    for _ in range(invites):
        event, _seed = L.make_invite(key, log.state, "participant", NOW + 3600, 1, NOW)
        log.append(event)
    return Room(
        room_id=L.event_hash(create),
        name=name,
        title=title,
        relay="http://127.0.0.1:1",
        key=key,
        log=log,
    )


def summary(room: Room) -> tuple[Any, ...]:
    return (
        room.room_id,
        room.name,
        room.title,
        room.relay,
        room.status,
        room.problem,
        room.cursor,
        room.log.events,
        room.key.to_bytes(),
        room.state.rules,
    )


def test_a_room_round_trips(tmp_path: Path) -> None:
    store = make(tmp_path)
    room = local_room("peace-talks", "Peace talks")
    room.cursor = 17
    Rooms(store).add(room)
    store.close()
    again = Store.open(tmp_path, "pw")
    (loaded,) = Rooms(again).all()
    assert summary(loaded) == summary(room)
    assert len(loaded.log) == 3
    assert Rooms(again).find("peace-talks").cursor == 17
    # Status changes go through save() and survive too.
    loaded.status, loaded.problem = "compromised", "fork"
    Rooms(again).save(loaded)
    reread = Rooms(again).find("peace-talks")
    assert (reread.status, reread.problem, reread.cursor) == ("compromised", "fork", 17)
    again.close()


def test_save_cursor_writes_only_the_cursor(tmp_path: Path) -> None:
    store = make(tmp_path)
    rooms = Rooms(store)
    room = local_room("r", "R", invites=3)
    rooms.add(room)
    real_put = store.put
    writes: list[str] = []

    def counting_put(ns: str, key: bytes, value: bytes, *, scope: bytes = b"") -> None:
        writes.append(ns)
        real_put(ns, key, value, scope=scope)

    store.put = counting_put  # type: ignore[method-assign]
    room.cursor = 42
    rooms.save_cursor(room)
    assert writes == ["cursor"]
    # Appending one event writes that one event row, not the whole log.
    writes.clear()
    event, _seed = L.make_invite(room.key, room.state, "observer", NOW + 60, 1, NOW)
    room.log.append(event)
    rooms.save_events(room, len(room.log) - 1)
    assert writes == ["event"]
    store.put = real_put  # type: ignore[method-assign]
    loaded = rooms.find("r")
    assert loaded.cursor == 42
    assert loaded.log.events == room.log.events


def test_find_by_name_title_and_id_prefix(tmp_path: Path) -> None:
    store = make(tmp_path)
    rooms = Rooms(store)
    one = local_room("one", "Shared title")
    two = local_room("two", "Shared title")
    three = local_room("three", "Only title")
    for room in (one, two, three):
        rooms.add(room)
    assert [r.name for r in rooms.all()] == ["one", "three", "two"]
    assert rooms.find("two").room_id == two.room_id
    assert rooms.find("Only title").room_id == three.room_id
    assert rooms.find(three.room_id.hex()[:8].upper()).room_id == three.room_id
    with pytest.raises(ClientError, match="several"):
        rooms.find("Shared title")
    with pytest.raises(ClientError, match="no room"):
        rooms.find("four")
    # A prefix shorter than four characters is not an id query.
    with pytest.raises(ClientError, match="no room"):
        rooms.find(three.room_id.hex()[:3])
    assert rooms.local_name("One") == "one-2"


def test_a_room_with_a_gap_in_its_log_is_corrupt(tmp_path: Path) -> None:
    store = make(tmp_path)
    rooms = Rooms(store)
    room = local_room("r", "R", invites=2)
    rooms.add(room)
    store.delete("event", room.room_id + (1).to_bytes(4, "big"))
    with pytest.raises(StoreCorrupt):
        rooms.all()
    with pytest.raises(StoreCorrupt):
        rooms.find("r")


def test_a_room_whose_log_does_not_validate_is_corrupt(tmp_path: Path) -> None:
    store = make(tmp_path)
    rooms = Rooms(store)
    room = local_room("r", "R", invites=1)
    other = local_room("x", "X", invites=1)
    rooms.add(room)
    # Event 1 of another room in this room's row: every position is there, the chain is not.
    swapped = Room(**{**room.__dict__, "log": other.log})
    rooms.save_events(swapped, 1)
    with pytest.raises(StoreCorrupt, match="does not validate"):
        rooms.all()
