"""Gap repair: a flaky link never costs a message the relay still holds.

The relay numbers each room's messages without gaps and delivers them in order
(``synced`` says where a catch-up ended). So a number that is skipped, or a
message that does not open, on *this* connection is asked for again with a
``fetch`` (at most :data:`MAX_TRIES` times) before anything is reported: a
dropped, damaged or reordered frame is repaired, and only what the relay no
longer holds (lapsed), or still cannot be read after the retries, is final.

The room's cursor never passes a gap still being repaired; messages handled
beyond it are marked (a bounded ring, one row each) so that a later connection,
which the relay serves from the cursor, does not show them twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backchannel.protocol import primitives as P

from .records import HandledRecord, Ring
from .relay import RelaySocket
from .room import Room, Rooms
from .store import Store

#: Attempts at one message on one connection before its refusal is final.
MAX_TRIES = 3
#: Sequence numbers asked for in one ``fetch`` (the relay's limit).
MAX_FETCH = 64
#: A gap wider than this is taken as lapsed messages, not a flaky link.
MAX_GAP = 1024
#: Messages handled beyond a gap that are remembered per room.
MAX_MARKS = 1000


@dataclass
class Attempt:
    """What came for one sequence number on this connection, and what to say if final."""

    tries: int = 0
    digest: bytes | None = None
    asked: bool = False
    #: The bytes that failed, judged for good if the relay disowns them.
    data: bytes | None = None


@dataclass
class Link:
    """One room's delivery state on one connection."""

    high: int
    open: dict[int, Attempt] = field(default_factory=dict)


class Repair:
    def __init__(self, store: Store, rooms: Rooms) -> None:
        self.store, self.rooms = store, rooms
        self._marks: Ring[HandledRecord] = Ring(store, "handled", HandledRecord, MAX_MARKS)
        self._links: dict[bytes, Link] = {}
        self._sock: RelaySocket | None = None

    def link(self, sock: RelaySocket, room: Room) -> Link:
        """This connection's state for ``room`` (a new connection starts afresh)."""
        if sock is not self._sock:
            # Held, not compared by id(): a new socket may reuse a closed one's id.
            self._sock, self._links = sock, {}
        if room.room_id not in self._links:
            self._links[room.room_id] = Link(high=room.cursor)
        return self._links[room.room_id]

    @staticmethod
    def _mark(room: Room, seq: int, data: bytes) -> bytes:
        return room.room_id + seq.to_bytes(8, "big") + P.hash_bytes(b"bc-seen-msg", data, 16)

    def already_handled(self, room: Room, seq: int, data: bytes) -> bool:
        """A message a previous connection handled (the relay resends from the cursor)."""
        if seq <= room.cursor:
            return True
        return seq <= room.high and self._marks.items.get(self._mark(room, seq, data)) is not None

    def seen_before(self, room: Room, link: Link, seq: int) -> None:
        """A message handled on an earlier connection came again: nothing to do but
        note that it is not missing."""
        self.arrived(link, seq)
        link.open.pop(seq, None)
        self._move_cursor(room, link)

    def arrived(self, link: Link, seq: int) -> None:
        """Numbers skipped before ``seq`` are missing (until they come, or are lapsed)."""
        if seq > link.high + 1 and seq - link.high <= MAX_GAP:
            for missing in range(link.high + 1, seq):
                link.open.setdefault(missing, Attempt())
        link.high = max(link.high, seq)

    def synced(self, link: Link, seq: int) -> None:
        """The catch-up ended at ``seq``: anything after what we saw was lost on the way."""
        if seq > link.high:
            self.arrived(link, seq + 1)
            link.high = seq

    def failed(self, link: Link, seq: int, data: bytes) -> bool:
        """A message that did not open: True if it is asked for again (the failure
        could be the link's), False if it is final (the relay holds exactly these
        bytes, or the tries are used up)."""
        attempt = link.open.setdefault(seq, Attempt())
        digest = P.hash_bytes(b"bc-attempt", data, 16)
        if attempt.digest == digest or attempt.tries + 1 >= MAX_TRIES:
            return False
        attempt.tries += 1
        attempt.digest = digest
        attempt.asked = False
        attempt.data = data
        return True

    def done(self, room: Room, link: Link, seq: int, data: bytes) -> None:
        """``seq`` is handled for good (shown, refused for good, or not ours)."""
        link.open.pop(seq, None)
        if link.open and seq > min(link.open):
            # Beyond a gap still open: remembered, so a reconnection skips it.
            mark = self._mark(room, seq, data)
            self._marks.add(room.room_id, mark, HandledRecord())
        self._move_cursor(room, link)

    def _move_cursor(self, room: Room, link: Link) -> None:
        cursor = (min(link.open) - 1) if link.open else link.high
        high = max(room.high, link.high)
        if cursor > room.cursor or high != room.high:
            room.cursor, room.high = max(room.cursor, cursor), high
            self.rooms.save_cursor(room)

    def to_ask(self, link: Link) -> list[int]:
        seqs = sorted(s for s, a in link.open.items() if not a.asked)[:MAX_FETCH]
        for seq in seqs:
            link.open[seq].asked = True
        return seqs

    def answered(
        self, room: Room, link: Link, asked: list[int], held: set[int]
    ) -> list[tuple[int, bytes]]:
        """The relay answered a fetch. What it does not hold has lapsed (nothing to
        repair) or was never its own: bytes that failed under a number it disowns are
        returned, to be judged for good. What it holds but did not reach us again is
        asked for again, up to :data:`MAX_TRIES`; after that it stays open, below
        the cursor, for the next connection (a message the relay holds is never
        given up)."""
        disowned: list[tuple[int, bytes]] = []
        for seq in asked:
            attempt = link.open.get(seq)
            if attempt is None or not attempt.asked:
                continue  # it came (handled, or failed and queued again)
            if seq not in held:
                link.open.pop(seq)
                if attempt.data is not None:
                    disowned.append((seq, attempt.data))
                continue
            attempt.tries += 1
            attempt.asked = attempt.tries >= MAX_TRIES  # stop asking on this connection
        self._move_cursor(room, link)
        return disowned

    def outstanding(self, link: Link) -> bool:
        return any(a.asked and a.tries < MAX_TRIES for a in link.open.values())
