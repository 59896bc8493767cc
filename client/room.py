"""A room as this client knows it, and where rooms are kept.

A room is a member key, the validated log and a cursor into the relay's
message sequence. On disk it is three kinds of rows (:mod:`.records`): the
small room record (names, status), one row per log event, and the cursor, so
that reading a message rewrites eight bytes of cursor, not the whole log.
The log is re-validated whenever a room is loaded: the store is ours, but a log
is believed only after validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

from backchannel.protocol import roomlog as L
from backchannel.protocol.errors import ProtocolError
from backchannel.protocol.keys import MemberKeyPair

from .errors import ClientError, unique_match
from .records import CursorRecord, EventRecord, RoomRecord, Table
from .store import Store, StoreCorrupt

Status = Literal["active", "removed", "left", "compromised"]
STATUSES: tuple[Status, ...] = ("active", "removed", "left", "compromised")


@dataclass
class Room:
    room_id: bytes
    name: str
    title: str
    relay: str
    key: MemberKeyPair
    log: L.RoomLog = field(repr=False)
    cursor: int = 0
    #: Messages up to here may have been handled beyond a gap (client/repair.py).
    high: int = 0
    status: Status = "active"
    problem: str | None = None

    @property
    def state(self) -> L.RoomState:
        return self.log.state

    @property
    def me(self) -> bytes:
        return self.key.public.sign


def require_usable(room: Room) -> None:
    if room.status == "compromised":
        raise ClientError(
            f"this room failed validation and is locked: {room.problem}",
            hint="compare safety numbers with the facilitator out of band",
        )
    if room.status in ("removed", "left"):
        raise ClientError("you are no longer a member of this room")


class Rooms:
    """The rooms in one profile."""

    def __init__(self, store: Store) -> None:
        self._records: Table[RoomRecord] = Table(store, "room", RoomRecord)
        self._events: Table[EventRecord] = Table(store, "event", EventRecord)
        self._cursors: Table[CursorRecord] = Table(store, "cursor", CursorRecord)

    def all(self) -> list[Room]:
        return sorted((self._load(r) for r in self._records.all()), key=lambda r: r.name)

    def find(self, query: str) -> Room:
        """A room by local name, title or unique id prefix."""
        return unique_match(
            self.all(),
            [
                lambda r: r.name == query,
                lambda r: r.title == query,
                lambda r: len(query) >= 4 and r.room_id.hex().startswith(query.lower()),
            ],
            several=ClientError(f"{query!r} matches several rooms", hint="use the local name"),
            missing=ClientError(f"no room {query!r}", hint="`backchannel rooms` lists yours"),
        )

    def local_name(self, title: str) -> str:
        base = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")[:24] or "room"
        taken = {r.name for r in self._records.all()}
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    def add(self, room: Room) -> None:
        self.save(room)
        self.save_events(room, 0)
        self.save_cursor(room)

    def save(self, room: Room) -> None:
        """The room record alone (names, status); not its log or cursor."""
        record = RoomRecord(
            id=room.room_id,
            key=room.key.to_bytes(),
            name=room.name,
            title=room.title,
            relay=room.relay,
            status=room.status,
            problem=room.problem,
        )
        self._records.put(room.room_id, record)

    def save_events(self, room: Room, first: int) -> None:
        """Log events from position ``first`` on (those newly validated)."""
        events = room.log.events
        for pos in range(first, len(events)):
            row = EventRecord(pos=pos, data=events[pos])
            self._events.put(room.room_id + pos.to_bytes(4, "big"), row, scope=room.room_id)

    def save_cursor(self, room: Room) -> None:
        high = room.high if room.high > room.cursor else None
        self._cursors.put(room.room_id, CursorRecord(seq=room.cursor, high=high))

    def _load(self, record: RoomRecord) -> Room:
        events = sorted(self._events.scan(record.id), key=lambda e: e.pos)
        if [e.pos for e in events] != list(range(len(events))) or record.status not in STATUSES:
            raise StoreCorrupt("a stored room is incomplete")
        try:
            log = L.validate_log([e.data for e in events])
            key = MemberKeyPair.from_bytes(record.key)
        except ProtocolError as exc:
            raise StoreCorrupt(f"a stored room does not validate ({exc.code})") from None
        cursor = self._cursors.get(record.id)
        return Room(
            room_id=record.id,
            name=record.name,
            title=record.title,
            relay=record.relay,
            key=key,
            log=log,
            cursor=0 if cursor is None else cursor.seq,
            high=0 if cursor is None or cursor.high is None else cursor.high,
            status=cast(Status, record.status),
            problem=record.problem,
        )
