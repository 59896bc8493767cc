"""Typed local records: what the client keeps in its store, one dataclass per kind.

Each kind of state is declared once here, with its namespace and its encoding
version. A record encodes as a canonical CBOR map of its fields plus ``v``;
decoding is strict (:class:`~backchannel.protocol.encoding.Reader`): an
unknown version, a missing or unknown field, or a value of the wrong type is a
:class:`~.store.StoreCorrupt`, never a half-read record.

Where items are independent (one peer, one inbound sender key, one stashed
message, one prekey) each is its own row, so that a message touches only the
rows it concerns; :class:`Table` gives typed access to one namespace. The
protocol's own snapshots (sender keys, pairwise sessions) are stored as they
serialise themselves, through the same :class:`Table`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from backchannel.protocol.encoding import Reader, Value, decode, encode
from backchannel.protocol.errors import ProtocolError

from .store import Store, StoreCorrupt

#: Largest single record we read back (a room record is small; stashed envelopes
#: and session snapshots are the largest rows).
MAX_RECORD = 1 << 20


class Record:
    """A versioned dataclass record. Fields are bytes, str, int, bool, list[bytes] or
    one of those or None (an absent key)."""

    KIND: ClassVar[str] = "record"
    VERSION: ClassVar[int] = 1

    def to_bytes(self) -> bytes:
        out: dict[str, Value] = {"v": self.VERSION}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return encode(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        try:
            r = Reader.of(decode(data, max_size=MAX_RECORD), cls.KIND)
            r.version(cls.VERSION)
            values = {name: _read(r, name, kind) for name, kind in _schema(cls)}
            r.done()
        except ProtocolError as exc:
            raise StoreCorrupt(f"a stored {cls.KIND} does not read back ({exc.code})") from None
        return cls(**values)


@cache
def _schema(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _read(r: Reader, name: str, kind: Any) -> Any:
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) and type(None) in args:
        if not r.has(name):
            return None
        (kind,) = (a for a in args if a is not type(None))
    if kind is bytes:
        return r.blob(name, max_size=MAX_RECORD)
    if kind is str:
        return r.text(name, MAX_RECORD)
    if kind is bool:
        return r.boolean(name)
    if kind is int:
        return r.integer(name, -(1 << 63))
    if typing.get_origin(kind) is list:
        items = r.array(name, MAX_RECORD)
        if not all(isinstance(item, bytes) for item in items):
            raise StoreCorrupt(f"a stored record's {name!r} is not a list of byte strings")
        return list(items)
    raise TypeError(f"no record encoding for {kind!r}")


class Codec(Protocol):
    def to_bytes(self) -> bytes: ...


C = TypeVar("C", bound=Codec)


class Table(Generic[C]):
    """Typed rows of one namespace: ``key -> record``, grouped by an optional scope."""

    def __init__(self, store: Store, ns: str, kind: Any) -> None:
        self.store, self.ns, self._kind = store, ns, kind

    def _decode(self, data: bytes) -> C:
        try:
            return typing.cast(C, self._kind.from_bytes(data))
        except ProtocolError as exc:
            raise StoreCorrupt(f"a stored {self.ns} row does not read back ({exc.code})") from None

    def get(self, key: bytes) -> C | None:
        data = self.store.get(self.ns, key)
        return None if data is None else self._decode(data)

    def put(self, key: bytes, record: C, *, scope: bytes = b"") -> None:
        self.store.put(self.ns, key, record.to_bytes(), scope=scope)

    def version(self) -> tuple[int, int]:
        return self.store.version(self.ns)

    def delete(self, key: bytes) -> None:
        self.store.delete(self.ns, key)

    def scan(self, scope: bytes) -> Iterator[C]:
        return (self._decode(data) for data in self.store.scan(self.ns, scope))

    def all(self) -> Iterator[C]:
        return (self._decode(data) for data in self.store.values(self.ns))

    def drop(self, scope: bytes) -> None:
        self.store.delete_scope(self.ns, scope)


class Ring(Generic[C]):
    """A bounded first-in, first-out set of rows per scope: at most ``size`` rows and
    ``max_bytes`` bytes; adding past either evicts the oldest. Each operation reads
    and writes O(1) rows whatever the size (a slot table and a state row, not a
    list to rewrite)."""

    def __init__(
        self, store: Store, ns: str, kind: Any, size: int, max_bytes: int = 1 << 62
    ) -> None:
        self.items: Table[C] = Table(store, ns, kind)
        self._slots: Table[SlotRecord] = Table(store, ns + "-slot", SlotRecord)
        self._state: Table[RingState] = Table(store, ns + "-state", RingState)
        self.size, self.max_bytes = size, max_bytes

    def add(self, scope: bytes, key: bytes, record: C, size: int = 0) -> bool:
        """Add ``record``; False (and nothing stored) if it alone exceeds the byte budget."""
        if size > self.max_bytes:
            return False
        if self.items.get(key) is not None:
            return True  # already held: one slot per row, or evicting one would drop both
        state = self._state.get(scope) or RingState(head=0, tail=0, total=0)
        head, total = state.head, state.total
        while head < state.tail and (
            state.tail - head >= self.size or total + size > self.max_bytes
        ):
            slot_key = scope + head.to_bytes(8, "big")
            slot = self._slots.get(slot_key)
            if slot is not None:
                self.items.delete(slot.key)
                self._slots.delete(slot_key)
                total -= slot.size
            head += 1
        self.items.put(key, record, scope=scope)
        slot = SlotRecord(key=key, size=size)
        self._slots.put(scope + state.tail.to_bytes(8, "big"), slot, scope=scope)
        self._state.put(scope, RingState(head=head, tail=state.tail + 1, total=total + size))
        return True

    def drop(self, scope: bytes) -> None:
        self.items.drop(scope)
        self._slots.drop(scope)
        self._state.delete(scope)


# --- declarations: one per kind of stored state ---------------------------------------------


@dataclass(frozen=True)
class ProfileRecord(Record):
    """Who I am to others (ns ``profile``, key ``me``)."""

    KIND = "profile"
    name: str
    relay: str
    affiliation: str | None = None


@dataclass(frozen=True)
class RoomRecord(Record):
    """A room I am in (ns ``room``, key room id). Its log and cursor are rows of their own."""

    KIND = "room record"
    id: bytes
    key: bytes
    name: str
    title: str
    relay: str
    status: str
    problem: str | None = None
    #: The name it had before its title arrived (rooms joined before it was known),
    #: still accepted wherever a room is named; absent in rows of earlier releases.
    alias: str | None = None


@dataclass(frozen=True)
class EventRecord(Record):
    """One validated log event (ns ``event``, key room id + position, scope room id)."""

    KIND = "log event"
    pos: int
    data: bytes


@dataclass(frozen=True)
class CursorRecord(Record):
    """The relay sequence number read up to (ns ``cursor``, key room id)."""

    KIND = "cursor"
    seq: int
    #: The highest handled beyond a gap still open (rows in ns ``handled``).
    high: int | None = None


@dataclass(frozen=True)
class PeerRecord(Record):
    """What a member told us about itself, and whether we verified it
    (ns ``peer``, key room id + member key, scope room id)."""

    KIND = "peer record"
    name: str | None = None
    affiliation: str | None = None
    verified: bytes | None = None
    #: Names it had before (UTF-8, oldest first, a few): one a command printed a
    #: moment ago still names the member after its profile changed.
    earlier: list[bytes] | None = None


@dataclass(frozen=True)
class DistributionRecord(Record):
    """Who already holds our current sender key (ns ``dist``, key room id)."""

    KIND = "distribution record"
    generation: int
    to: list[bytes]


@dataclass(frozen=True)
class OutboxItem(Record):
    """A sealed room message not yet acknowledged (ns ``outbox``, key room id + cid,
    scope room id)."""

    KIND = "outbox item"
    room: bytes
    cid: bytes
    data: bytes
    #: When it was sent, to name it in a warning without its text; absent in rows
    #: queued by releases before it was recorded.
    ts: int | None = None


@dataclass(frozen=True)
class StashItem(Record):
    """A room message that waits for its sender key (ns ``stash``, key room id +
    digest, scope room id + sender)."""

    KIND = "stash item"
    data: bytes


@dataclass(frozen=True)
class PrekeyRecord(Record):
    """One of our prekeys with its private half (ns ``prekey``, key room id + kind +
    id, scope room id)."""

    KIND = "prekey record"
    kind: str
    id: int
    public: bytes
    private: bytes


@dataclass(frozen=True)
class CounterRecord(Record):
    """A per-room counter (next prekey id; next slot of the processed ring)."""

    KIND = "counter"
    n: int


@dataclass(frozen=True)
class SeenRecord(Record):
    """A processed pairwise mailbox item (ns ``seen``, key room id + mark, in a :class:`Ring`)."""

    KIND = "processed mark"


@dataclass(frozen=True)
class SlotRecord(Record):
    """Which row holds a :class:`Ring`'s slot, and its size."""

    KIND = "ring slot"
    key: bytes
    size: int


@dataclass(frozen=True)
class RingState(Record):
    """A :class:`Ring`'s oldest and next slot, and the bytes it holds."""

    KIND = "ring state"
    head: int
    tail: int
    total: int


@dataclass(frozen=True)
class SessionsRecord(Record):
    """Pairwise session snapshots with one peer, oldest first (ns ``sessions``,
    key room id + peer)."""

    KIND = "sessions record"
    sessions: list[bytes]


@dataclass(frozen=True)
class LineRecord(Record):
    """One transcript entry (the store's ``messages`` table, one sealed row each).

    ``about`` is the member a notice or warning concerns; its ``text`` then holds
    ``{who}`` where that member's name goes, filled in when the line is shown, so a
    name that arrives later is shown in lines recorded before it did. Rows without
    ``about`` (all rows of earlier releases) read back as before: their text is final.
    """

    KIND = "transcript line"
    kind: str
    text: str
    ts: int
    sender: bytes | None = None
    to: bytes | None = None
    about: bytes | None = None
    #: The message's id (:func:`~.events.message_id`): absent for notices, warnings
    #: and lines of earlier releases.
    mid: bytes | None = None
    #: The room's mode when a message or sidebar was recorded (see transcript.Line).
    mode: str | None = None
    #: When it was sent (ms), as shown: the sender's claim for what others sent,
    #: bounded on receipt (client/transcript.py); ``ts`` stays when it was recorded.
    #: Absent in lines of earlier releases, which were shown at ``ts``.
    sent: int | None = None


@dataclass(frozen=True)
class AskRecord(Record):
    """A question we put to a member about its log (ns ``ask``, key room + member)."""

    KIND = "log question"
    start: int
    end: int
    at: int
    sent: bool


@dataclass(frozen=True)
class HandledRecord(Record):
    """A room message handled beyond the cursor (ns ``handled``, in a :class:`Ring`)."""

    KIND = "handled mark"
