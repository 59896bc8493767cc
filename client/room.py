"""A room as this client knows it, and where rooms are kept.

A room is a member key, the validated log and a cursor into the relay's
message sequence. On disk it is three kinds of rows (:mod:`.records`): the
small room record (names, status), one row per log event, and the cursor, so
that reading a message rewrites eight bytes of cursor, not the whole log.
The log is re-validated whenever a room is loaded: the store is ours, but a log
is believed only after validation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, cast

from backchannel.protocol import roomlog as L
from backchannel.protocol.errors import ProtocolError
from backchannel.protocol.keys import MemberKeyPair

from .errors import ClientError, unique_match
from .records import CounterRecord, CursorRecord, EventRecord, RoomRecord, Table
from .store import Store, StoreCorrupt

Status = Literal["active", "removed", "left", "compromised"]
STATUSES: tuple[Status, ...] = ("active", "removed", "left", "compromised")
#: Per room, :attr:`Room.floor` as last stored (ms); rooms of earlier releases have none.
FLOOR_NS = "floor"


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
    #: No line received from now on is shown as sent before this (ms): the last
    #: moment we were online and caught up here (client/transcript.py, send times).
    floor: int = 0
    #: Caught up on the current connection: what arrives now was sent just now.
    live: bool = False
    #: The local name it had until its title arrived (:meth:`Rooms.retitle`).
    alias: str | None = None

    @property
    def state(self) -> L.RoomState:
        return self.log.state

    @property
    def me(self) -> bytes:
        return self.key.public.sign


#: How much a mode protects speakers. A line is shown and exported under the stricter
#: of the mode it was sent under and the room's current one (client/rulechanges.py).
STRICTNESS = {"attributed": 0, "chatham": 1, "anonymous": 2}


def stricter(a: str, b: str) -> str:
    """The more protective of two modes (an unknown one counts as the most)."""
    return a if STRICTNESS.get(a, 2) >= STRICTNESS.get(b, 2) else b


def names_shared(room: Room) -> bool:
    """Whether our name and affiliation may go to this room's members: not while it
    is anonymous, and never again once it was anonymous while we were in it (we
    joined, or stayed, on that promise; a facilitator's rule change cannot lift it)."""
    if room.state.rules.mode == "anonymous":
        return False
    since = _our_since(room)
    if since is None or room.log.state_at(since).rules.mode == "anonymous":
        return False
    return not any(
        isinstance(event, L.SetRulesEvent) and event.rules.mode == "anonymous"
        for event in (room.log.decoded(pos) for pos in range(since + 1, len(room.log)))
    )


def _our_since(room: Room) -> int | None:
    member = room.state.members.get(room.me)
    if member is not None:
        return member.since
    for pos in range(len(room.log)):  # we left or were removed: find where we came in
        event = room.log.decoded(pos)
        if isinstance(event, L.CreateEvent | L.JoinEvent) and event.member.sign == room.me:
            return pos
    return None


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
        self._floors: Table[CounterRecord] = Table(store, FLOOR_NS, CounterRecord)
        self._store = store
        #: Rooms whose cursor moved in the current transaction, written at its commit.
        self._moved: dict[bytes, Room] = {}

    def all(self) -> list[Room]:
        return sorted((self._load(r) for r in self._records.all()), key=lambda r: r.name)

    def find(self, query: str) -> Room:
        """A room by local name, title or unique id prefix."""
        folded = " ".join(query.split()).casefold()
        return unique_match(
            self.all(),
            [
                lambda r: r.name == query,
                lambda r: r.title == query,
                # A name printed by `join` before the title came, in a script or a note.
                lambda r: r.alias == query,
                # As one types it: `read "water talks"` for "Water  Talks".
                lambda r: r.name.casefold() == folded,
                lambda r: bool(folded) and " ".join(r.title.split()).casefold() == folded,
                lambda r: len(query) >= 4 and r.room_id.hex().startswith(query.lower()),
            ],
            several=ClientError(f"{query!r} matches several rooms", hint="use the local name"),
            missing=ClientError(f"no room {query!r}", hint="`backchannel rooms` lists yours"),
        )

    def local_name(self, title: str) -> str:
        base = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")[:24] or "room"
        taken = {n for r in self._records.all() for n in (r.name, r.alias) if n}
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    @staticmethod
    def placeholder(room_id: bytes) -> str:
        """What a room is called until its title is known (the title travels pairwise)."""
        return f"room-{room_id.hex()[:6]}"

    def retitle(self, room: Room, title: str) -> str | None:
        """The room's title is known at last: if its local name is still the placeholder
        (nobody chose another), it is named after the title, once; the old name stays
        an alias. Returns the old name if it changed (inside the caller's transaction)."""
        room.title = title
        old = room.name
        untouched = re.fullmatch(re.escape(self.placeholder(room.room_id)) + r"(-[0-9]+)?", old)
        # A title with no letters or digits would make it "room" again.
        if room.alias is None and untouched and any(c.isalnum() for c in title):
            room.name, room.alias = self.local_name(title), old
        self.save(room)
        return old if room.name != old else None

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
            alias=room.alias,
        )
        self._records.put(room.room_id, record)

    def save_events(self, room: Room, first: int) -> None:
        """Log events from position ``first`` on (those newly validated)."""
        events = room.log.events
        for pos in range(first, len(events)):
            row = EventRecord(pos=pos, data=events[pos])
            self._events.put(room.room_id + pos.to_bytes(4, "big"), row, scope=room.room_id)

    def load_floor(self, room: Room) -> None:
        """Back to the stored floor: what a new connection's catch-up may not precede."""
        found = self._floors.get(room.room_id)
        room.floor, room.live = (0 if found is None else found.n), False

    def save_cursor(self, room: Room) -> None:
        """Store the room's cursor. Within a transaction once, as it stands at the
        commit: a batch of messages moves it once per message, and each write was
        a sealed row."""
        if self._store.in_transaction:
            self._moved[room.room_id] = room
            self._store.at_end(self._end)
            return
        self._write_cursor(room)

    def _write_cursor(self, room: Room) -> None:
        high = room.high if room.high > room.cursor else None
        self._cursors.put(room.room_id, CursorRecord(seq=room.cursor, high=high))

    def _settle(self) -> None:
        for room in self._moved.values():
            self._write_cursor(room)
        self._moved.clear()

    def _end(self, committing: bool) -> None:
        if committing:
            self._settle()
        self._moved.clear()

    def _load(self, record: RoomRecord) -> Room:
        events = sorted(self._events.scan(record.id), key=lambda e: e.pos)
        if [e.pos for e in events] != list(range(len(events))) or record.status not in STATUSES:
            raise StoreCorrupt("a stored room is incomplete")
        try:
            log = L.validate_log([e.data for e in events])
            key = MemberKeyPair.from_bytes(record.key)
        except ProtocolError as exc:
            raise StoreCorrupt(f"a stored room does not validate ({exc.code})") from None
        self._settle()  # a cursor moved in this transaction is read as it now is
        cursor = self._cursors.get(record.id)
        floor = self._floors.get(record.id)
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
            floor=0 if floor is None else floor.n,
            alias=record.alias,
        )
