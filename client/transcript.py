"""The transcript: what the user is shown, one sealed row per line, under the room's retention.

Lines are shown in the order they were sent, not received: a catch-up brings a
member's sidebars (its pairwise mailbox) before the room's backlog, and both
belong among what was said meanwhile. What others sent carries its sender's
clock, which is a claim: it is bounded on receipt to no later than it arrived
and no earlier than the room's *floor*, the last moment this client was online
and caught up there (or than the retention allows). So a lying member can move
its own lines only within the time we were not watching; it can never put one
before a line we were already shown, nor keep one pinned below newer ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from backchannel.protocol import primitives as P

from .context import Context
from .records import CounterRecord, LineRecord, Table
from .room import FLOOR_NS, Room, stricter

Kind = Literal["message", "sidebar", "notice", "warning"]
#: While online, how often the floor is stored (ms).
FLOOR_EVERY_MS = 10_000


@dataclass(frozen=True)
class Line:
    """One transcript entry as the user sees it."""

    n: int
    kind: str  # "message", "sidebar", "notice", "warning"
    sender: bytes | None
    text: str
    ts: int
    mine: bool = False
    to: bytes | None = None
    #: The member a notice or warning is about: ``text`` then has ``{who}`` for its name.
    about: bytes | None = None
    #: Room messages and sidebars: the id sender and receivers share (events.message_id).
    mid: bytes | None = None
    #: Messages and sidebars: the room's mode when the line was recorded (None in
    #: rows of earlier releases), so a later rule change never re-labels it.
    mode: str | None = None
    #: When this client recorded it (``ts`` is when it was sent, as bounded).
    received: int = 0
    #: ``ts`` in milliseconds: the transcript's order (ties by ``n``, arrival).
    sent_ms: int = 0


_LABEL_ID = b"bc-message-id"
ID_SIZE = 16


def message_id(ciphertext: bytes) -> bytes:
    """What sender and receivers both call one message: a digest of the exact bytes
    that went through the relay (a room envelope, or a pairwise message)."""
    return P.hash_bytes(_LABEL_ID, ciphertext, ID_SIZE)


class Transcript:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: Warnings of this process, newest last (tests and front ends read them).
        self.notices: list[tuple[bytes, str]] = []
        #: Called with each line once it is stored (inside the caller's transaction).
        self.on_line: Callable[[Room, Line], None] | None = None
        self._floors: Table[CounterRecord] = Table(ctx.store, FLOOR_NS, CounterRecord)
        self._stored: dict[bytes, int] = {}

    def add(
        self,
        room: Room,
        kind: Kind,
        text: str,
        *,
        sender: bytes | None = None,
        to: bytes | None = None,
        about: bytes | None = None,
        mid: bytes | None = None,
        sent: int | None = None,
        mode: str | None = None,
    ) -> None:
        """``sent``: when the sender says it sent it (ms); bounded here. Without it the
        line is shown at the moment it is recorded (ours, notices, warnings). ``mode``:
        the room's mode at the message's epoch; the stricter of it and the mode now is
        kept with the line."""
        now, received = self.ctx.now(), self.ctx.now_ms()
        shown = received if sent is None else self.bound(room, sent, received)
        if kind in ("message", "sidebar"):
            mode = stricter(mode or room.state.rules.mode, room.state.rules.mode)
        record = LineRecord(
            kind=kind,
            text=text,
            ts=now,
            sender=sender,
            to=to,
            about=about,
            mid=mid,
            sent=shown,
            mode=mode,
        )
        expires = now + room.state.rules.retention
        n = self.ctx.store.add_message(room.room_id, record.to_bytes(), expires)
        if room.live:
            self.raise_floor(room, lazily=True)
        if self.on_line is not None:
            self.on_line(room, _line(n, record, room.me))

    def bound(self, room: Room, claimed: int, received: int) -> int:
        """A sender's claimed send time (ms) as it may be shown: not after it arrived
        (a clock a little fast loses nothing: it arrived when sent), not before the
        floor, nor before the relay could still have held it (the retention)."""
        lowest = max(room.floor, received - room.state.rules.retention * 1000)
        return min(max(claimed, lowest), received)

    def raise_floor(self, room: Room, *, lazily: bool = False) -> None:
        """Online and caught up (or just joined): whatever arrives from now on was
        stored by the relay from now on, so it is shown no earlier than now.
        ``lazily`` (a line while online): stored only every :data:`FLOOR_EVERY_MS`,
        so a message costs no extra write; the next catch-up's floor lags that much."""
        room.floor = max(room.floor, self.ctx.now_ms())
        if lazily and room.floor - self._stored.get(room.room_id, 0) < FLOOR_EVERY_MS:
            return
        self._floors.put(room.room_id, CounterRecord(n=room.floor))
        self._stored[room.room_id] = room.floor

    def notice(
        self, room: Room, text: str, *, about: bytes | None = None, sent: int | None = None
    ) -> None:
        """``about``: the member concerned, named where ``text`` says ``{who}``; ``sent``:
        when what it reports happened (a log event's time), bounded like a message's."""
        self.add(room, "notice", text, about=about, sent=sent)

    def warn(self, room: Room, text: str, *, about: bytes | None = None) -> None:
        self.notices.append((room.room_id, text))
        self.add(room, "warning", text, about=about)

    def shorten(self, room: Room, retention: int) -> None:
        """The room's retention became ``retention``: every line we hold goes by its
        own time plus that (a longer retention extends nothing already promised)."""
        for n, data in self.ctx.store.messages(room.room_id):
            self.ctx.store.cap_expiry(room.room_id, n, LineRecord.from_bytes(data).ts + retention)
        self.ctx.store.purge_expired(self.ctx.now())

    def lines(self, room: Room, after: int = -1) -> list[Line]:
        """Lines recorded after line ``after``, in the order they were sent."""
        self.ctx.store.purge_expired(self.ctx.now())
        found = [
            _line(n, LineRecord.from_bytes(data), room.me)
            for n, data in self.ctx.store.messages(room.room_id, after=after)
        ]
        # What one member sent on one channel arrives in the order it was sent (room
        # messages by their key's index, a mailbox in order): it keeps that order,
        # whatever its clock said (one set back, or a release that sent only seconds).
        order: dict[int, int] = {}
        last: dict[tuple[bytes, str], int] = {}
        for line in found:
            key = line.sent_ms
            if line.sender is not None and line.kind in ("message", "sidebar"):
                stream = (line.sender, line.kind)
                key = last[stream] = max(key, last.get(stream, key))
            order[line.n] = key
        return sorted(found, key=lambda line: (order[line.n], line.n))


def _line(n: int, record: LineRecord, me: bytes) -> Line:
    sent = record.ts * 1000 if record.sent is None else record.sent
    return Line(
        n=n,
        kind=record.kind,
        sender=record.sender,
        text=record.text,
        ts=sent // 1000,
        received=record.ts,
        sent_ms=sent,
        mine=record.sender is not None and record.sender == me,
        to=record.to,
        about=record.about,
        mid=record.mid,
        mode=record.mode,
    )
