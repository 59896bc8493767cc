"""In-process fan-out: which live connection wants what.

The hub holds only live connections (the one kind of state a second relay
instance does not need to share): room -> subscriptions, member key ->
connections that authenticated it (for pairwise mailboxes). Publishing never
awaits: it offers an item to each connection's bounded outbox; a connection
whose outbox is full is closed with ``too_slow`` and nothing else is affected.
What is delivered, and in which order, is decided by the connection's writer
against the database (see :mod:`.ws`), so a missed or reordered notification
is repaired from the database by cursor. Scale-out (Redis) will call the same
``publish_*`` methods from a subscriber task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .store import MailItem, StoredMessage


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
    """A room message was committed (live path)."""

    sub: Subscription
    msg: StoredMessage


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


OutItem = Frame | Notify | CatchUp | Mail | MailSync


@dataclass(slots=True)
class Hub:
    rooms: dict[bytes, set[Subscription]] = field(default_factory=dict)
    mailboxes: dict[bytes, set[Outbox]] = field(default_factory=dict)
    #: Called with (room, key) after a departure dropped subscriptions; tests hook it.
    on_departed: Callable[[bytes, bytes], None] | None = None

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

    def publish_message(self, room: bytes, msg: StoredMessage) -> None:
        for sub in list(self.rooms.get(room, ())):
            sub.conn.offer(Notify(sub, msg))

    def publish_event(self, room: bytes, frame: bytes) -> None:
        """A log event was appended: tell each subscribed connection once."""
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

    def counts(self) -> dict[str, int]:
        return {
            "rooms": len(self.rooms),
            "subscriptions": sum(len(s) for s in self.rooms.values()),
            "mailbox_keys": len(self.mailboxes),
        }
