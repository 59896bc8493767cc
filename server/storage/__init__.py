"""The relay's storage layer: every SQL query it makes, one module per concept.

Everything another relay instance would need lives in the database: sequence
numbers come from ``rooms.last_seq`` incremented inside the write transaction,
the log head and validated room state from ``rooms``, membership from
``room_members``, request nonces from ``seen_nonces``. So the concept stores
below hold no state of their own beyond the shared engine and batcher
(:mod:`.engine`), and the relay uses them through the one :class:`Store`.
"""

from __future__ import annotations

from .engine import Quotas, make_engine
from .health import STORAGE_UNAVAILABLE, WriteHealth, storage_unavailable, unavailable
from .housekeeping import HousekeepingStore
from .mailboxes import MailboxStore, MailItem
from .messages import MessageStore, StoredMessage
from .prekeys import PreKeyStore
from .rooms import Appended, RoomStore

__all__ = [
    "STORAGE_UNAVAILABLE",
    "Appended",
    "MailItem",
    "Quotas",
    "Store",
    "StoredMessage",
    "WriteHealth",
    "make_engine",
    "storage_unavailable",
    "unavailable",
]


class Store(RoomStore, MessageStore, MailboxStore, PreKeyStore, HousekeepingStore):
    """Queries used by the relay; each method is one transaction."""
