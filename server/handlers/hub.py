"""In-process fan-out: which live connection wants what.

The hub holds only live connections (the one kind of state a second relay
instance does not need to share): room -> subscriptions, member key ->
connections that authenticated it (for pairwise mailboxes). Publishing never
awaits: it offers an item to each connection's bounded outbox; a connection
whose outbox is full is closed with ``too_slow`` and nothing else is affected.
What is delivered, and in which order, is decided by the connection's writer
against the database (see :mod:`backchannel.server.rest.ws`), so a missed or
reordered notification is repaired from the database by cursor. With several
instances, :mod:`.fanout` calls the ``wake_*`` methods for commits made
elsewhere (a Redis notification carries no payload, only where to look), and
its periodic catch-up tick calls them too, so a lost notification costs
latency, never a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..storage import MailItem, StoredMessage


class Outbox(Protocol):
    """What the hub needs from a connection."""

    def offer(self, item: OutItem) -> None: ...


@dataclass(eq=False, slots=True)
class Subscription:
    """One connection's subscription to one room, authorised by ``key``."""

    room: bytes
    conn: Outbox
    next_seq: int
    #: The member key that authorised this; ``None`` while that is being checked,
    #: when any of ``candidates`` leaving the room ends the subscription.
    key: bytes | None = None
    candidates: frozenset[bytes] = frozenset()
    active: bool = True

    def held_by(self, key: bytes) -> bool:
        return self.key == key if self.key is not None else key in self.candidates


@dataclass(frozen=True, slots=True)
class Frame:
    """An already encoded frame to send as is."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Notify:
    """A room message was committed here (live path); ``t`` is when (monotonic).

    ``frame`` is its ``msg`` frame, encoded once for every subscriber."""

    sub: Subscription
    msg: StoredMessage
    t: float = 0.0
    frame: bytes = b""


@dataclass(frozen=True, slots=True)
class Wake:
    """Messages up to ``seq`` exist (committed elsewhere, or found by the catch-up tick)."""

    sub: Subscription
    seq: int
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Send everything stored after the subscription's cursor."""

    sub: Subscription


@dataclass(frozen=True, slots=True)
class Mail:
    """A pairwise item was committed for a key this connection holds."""

    item: MailItem


@dataclass(frozen=True, slots=True)
class MailSync:
    """Send every pending mailbox item of ``key`` (after auth)."""

    key: bytes


@dataclass(frozen=True, slots=True)
class MailCheck:
    """``key`` has ``count`` pending items, the newest ``max_id`` (catch-up tick)."""

    key: bytes
    count: int
    max_id: int


OutItem = Frame | Notify | Wake | CatchUp | Mail | MailSync | MailCheck


@dataclass(slots=True)
class Hub:
    rooms: dict[bytes, set[Subscription]] = field(default_factory=dict)
    mailboxes: dict[bytes, set[Outbox]] = field(default_factory=dict)
    #: Called with (room, key) after a departure dropped subscriptions; tests hook it.
    on_departed: Callable[[bytes, bytes], None] | None = None
    #: The newest log position announced per subscribed room (for the catch-up tick).
    log_pos: dict[bytes, int] = field(default_factory=dict)

    # --- registration -------------------------------------------------------------------

    def subscribe(self, sub: Subscription) -> None:
        self.rooms.setdefault(sub.room, set()).add(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        sub.active = False
        subs = self.rooms.get(sub.room)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.rooms[sub.room]
                self.log_pos.pop(sub.room, None)

    def listen_mailbox(self, key: bytes, conn: Outbox) -> None:
        self.mailboxes.setdefault(key, set()).add(conn)

    def forget(self, conn: Outbox, keys: set[bytes], subs: list[Subscription]) -> None:
        """Drop everything a closing connection registered."""
        for sub in subs:
            self.unsubscribe(sub)
        for key in keys:
            conns = self.mailboxes.get(key)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.mailboxes[key]

    # --- publishing ---------------------------------------------------------------------

    def publish_message(
        self, room: bytes, msg: StoredMessage, t: float = 0.0, frame: bytes = b""
    ) -> None:
        for sub in list(self.rooms.get(room, ())):
            sub.conn.offer(Notify(sub, msg, t, frame))

    def wake_room(self, room: bytes, seq: int, t: float = 0.0) -> None:
        """Messages up to ``seq`` are in the database; subscribers behind it fetch them."""
        for sub in list(self.rooms.get(room, ())):
            if sub.active and sub.key is not None and seq >= sub.next_seq:
                sub.conn.offer(Wake(sub, seq, t))

    def publish_event(self, room: bytes, frame: bytes, pos: int | None = None) -> None:
        """A log event was appended: tell each subscribed connection once."""
        if pos is not None and room in self.rooms:
            if pos <= self.log_pos.get(room, -1):
                return  # already announced (a local commit, then its catch-up)
            self.log_pos[room] = pos
        for conn in {sub.conn for sub in self.rooms.get(room, ())}:
            conn.offer(Frame(frame))

    def member_departed(self, room: bytes, key: bytes, frame: bytes) -> None:
        """Stop ``key``'s subscriptions to ``room`` at once and tell its connections."""
        for sub in [s for s in self.rooms.get(room, ()) if s.held_by(key)]:
            self.unsubscribe(sub)
            sub.conn.offer(Frame(frame))
        if self.on_departed is not None:
            self.on_departed(room, key)

    def deliver_mail(self, item: MailItem) -> None:
        for conn in list(self.mailboxes.get(item.recipient, ())):
            conn.offer(Mail(item))

    def wake_mail(self, key: bytes) -> None:
        """Items for ``key`` were committed elsewhere: its connections re-read the mailbox."""
        for conn in list(self.mailboxes.get(key, ())):
            conn.offer(MailSync(key))

    def check_mail(self, key: bytes, count: int, max_id: int) -> None:
        for conn in list(self.mailboxes.get(key, ())):
            conn.offer(MailCheck(key, count, max_id))

    def counts(self) -> dict[str, int]:
        return {
            "rooms": len(self.rooms),
            "subscriptions": sum(len(s) for s in self.rooms.values()),
            "mailbox_keys": len(self.mailboxes),
        }
