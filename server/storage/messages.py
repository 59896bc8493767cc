"""Room messages: ciphertext posted to a room, numbered by ``rooms.last_seq``.

The sequence number is taken inside the write transaction, so numbering
needs no in-process state and stays gap-free across relay instances. The
messages of one group commit are appended together (:meth:`MessageStore._append_sync`):
one duplicate check and one membership query for the batch, one numbering
update per room, one multi-row insert (on PostgreSQL all of it one statement,
``appendsql.PG_JUDGE``); each message still gets its own answer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from ..errors import RelayError
from .appendsql import NEW, NOT_MEMBER, OBSERVER, OLD, AppendRows, NewRow, rows_for
from .batcher import Done
from .engine import BaseStore
from .models import RoomMessage, coarse


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    data: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class _Post:
    room_id: bytes
    sender: bytes
    client_id: bytes
    data: bytes


def _key_of(post: _Post) -> tuple[bytes, bytes, bytes]:
    return post.room_id, post.sender, post.client_id


def _stored(room_id: bytes, seq: int, post: _Post, ts: int) -> NewRow:
    return room_id, seq, post.sender, post.client_id, post.data, ts


def _not_member() -> RelayError:
    return RelayError("not_authorized", 403, "sender is not a member of the room")


def _observer() -> RelayError:
    return RelayError("not_authorized", 403, "observers cannot post")


def _over_quota() -> RelayError:
    return RelayError(
        "quota_exceeded", 429, "the room's storage quota is used up until older messages expire"
    )


class MessageStore(BaseStore):
    async def append_room_message(
        self, room_id: bytes, sender: bytes, client_id: bytes, data: bytes
    ) -> tuple[StoredMessage, bool]:
        """Store a room message once; returns the stored message and ``fresh``."""
        post = _Post(room_id, sender, client_id, data)
        return await self.batcher.submit_bulk(self._append_sync, post)  # type: ignore[no-any-return]

    def post_room_message(
        self, room_id: bytes, sender: bytes, client_id: bytes, data: bytes, done: Done
    ) -> None:
        """:meth:`append_room_message` answered through ``done`` (see
        :meth:`.batcher.Batcher.post_bulk`): ``(True, (message, fresh))`` or
        ``(False, RelayError)``. Raises :class:`RelayError` if not taken."""
        self.batcher.post_bulk(self._append_sync, _Post(room_id, sender, client_id, data), done)

    def _append_sync(self, session: Session, posts: list[_Post]) -> list[Any]:
        """The outcomes of ``posts`` in order, as if appended one after another.

        A fixed handful of statements per batch rather than six per message, and
        synchronous: each statement through the async driver costs round trips
        between the event loop and the database thread, and those, not the
        database, bounded the relay's throughput (see :class:`.batcher.Batcher`)."""
        db = rows_for(session.connection())
        # The same send twice in one batch is stored once; the copy is answered
        # like a retry. A retry is answered with the original before any other
        # check: the sender may have left since, or the room filled up.
        first_of: dict[tuple[bytes, bytes, bytes], int] = {}
        unique: list[_Post] = []
        copies: list[tuple[int, int]] = []
        slot: list[int] = []
        for i, post in enumerate(posts):
            key = _key_of(post)
            if key in first_of:
                copies.append((i, first_of[key]))
                slot.append(-1)
            else:
                first_of[key] = i
                slot.append(len(unique))
                unique.append(post)
        ts = coarse(self.clock())
        items = [(p.room_id, p.sender, p.client_id, p.data) for p in unique]
        verdicts = db.judge(items, self.quotas.max_room_bytes, ts)

        done: list[Any] = [None] * len(unique)
        full: dict[bytes, list[int]] = {}
        for j, (kind, seq, created) in enumerate(verdicts):
            if kind == NEW:
                done[j] = (StoredMessage(seq, unique[j].data, created), True)
            elif kind == OLD:
                done[j] = (StoredMessage(seq, b"", created), False)
            elif kind == NOT_MEMBER:
                done[j] = _not_member()
            elif kind == OBSERVER:
                done[j] = _observer()
            else:
                full.setdefault(unique[j].room_id, []).append(j)
        if full:
            # A room near its quota: message by message, as if sent one by one.
            rows_in: list[NewRow] = []
            with db.atomic():
                for room_id in sorted(full):
                    mine = full[room_id]
                    taken = self._number(db, room_id, [unique[j] for j in mine])
                    for j, seq in zip(mine, taken, strict=True):
                        if isinstance(seq, RelayError):
                            done[j] = seq
                        else:
                            done[j] = (StoredMessage(seq, unique[j].data, ts), True)
                            rows_in.append(_stored(room_id, seq, unique[j], ts))
                if rows_in:
                    db.insert(rows_in)
        out = [done[j] if j >= 0 else None for j in slot]
        for i, first in copies:
            was = out[first]
            out[i] = was if isinstance(was, RelayError) else (replace(was[0], data=b""), False)
        return out

    def _number(self, db: AppendRows, room_id: bytes, posts: list[_Post]) -> list[Any]:
        """Sequence numbers for ``posts`` (one room, in order), or the error for each
        that would exceed the room's quota. The quota is checked and spent in the row
        update that numbers the messages: no scan, and no race between two senders
        near the limit, since the row stays locked until the batch commits."""
        limit = self.quotas.max_room_bytes
        sizes = [len(p.data) for p in posts]
        last = db.number(room_id, len(sizes), sum(sizes), limit)
        if last is not None:
            return list(range(last - len(sizes) + 1, last + 1))
        # Not all of them fit: take them in order, as if sent one by one, so that a
        # smaller message after one refused still goes in.
        used = db.stored_bytes(room_id)
        if used is None:
            return [RelayError("unknown_room", 404) for _ in posts]
        fits: list[bool] = []
        for size in sizes:
            fits.append(used + size <= limit)
            used += size if fits[-1] else 0
        taken = [size for size, fit in zip(sizes, fits, strict=True) if fit]
        if not taken:
            return [_over_quota() for _ in posts]
        last = db.number(room_id, len(taken), sum(taken), None)
        assert last is not None  # the row was there a statement ago, and is locked
        seqs = iter(range(last - len(taken) + 1, last + 1))
        return [next(seqs) if fit else _over_quota() for fit in fits]

    async def room_messages_after(
        self, room_id: bytes, after: int, limit: int, upto: int | None = None
    ) -> list[StoredMessage]:
        async with self.reading() as session:
            query = select(RoomMessage.seq, RoomMessage.data, RoomMessage.created_at).where(
                RoomMessage.room_id == room_id, RoomMessage.seq > after
            )
            if upto is not None:
                query = query.where(RoomMessage.seq <= upto)
            rows = await session.execute(query.order_by(RoomMessage.seq).limit(limit))
            return [StoredMessage(r.seq, r.data, r.created_at) for r in rows]

    async def room_messages_at(self, room_id: bytes, seqs: list[int]) -> list[StoredMessage]:
        """The stored messages among ``seqs`` (gap repair); lapsed ones are simply absent."""
        async with self.reading() as session:
            rows = await session.execute(
                select(RoomMessage.seq, RoomMessage.data, RoomMessage.created_at)
                .where(RoomMessage.room_id == room_id, RoomMessage.seq.in_(seqs))
                .order_by(RoomMessage.seq)
            )
            return [StoredMessage(r.seq, r.data, r.created_at) for r in rows]

    async def room_messages_page(
        self, room_id: bytes, after: int, limit: int, max_bytes: int, upto: int | None = None
    ) -> tuple[list[StoredMessage], bool]:
        """Like :meth:`room_messages_after`, but stopping once ``max_bytes`` of
        ciphertext are in the page (always at least one message), since a catch-up
        page is held in memory until a possibly slow reader takes it. The flag says
        whether more may follow."""
        if self.direct is not None:
            page = _page_sqlite if self.is_sqlite else _page_pg
            return await self.read_direct(
                lambda db: page(db, room_id, after, limit, max_bytes, upto)
            )
        async with self.reading() as session:
            query = select(RoomMessage.seq, func.length(RoomMessage.data)).where(
                RoomMessage.room_id == room_id, RoomMessage.seq > after
            )
            if upto is not None:
                query = query.where(RoomMessage.seq <= upto)
            sizes = (await session.execute(query.order_by(RoomMessage.seq).limit(limit))).all()
            if not sizes:
                return [], False
            last, cut = _page_end(sizes, max_bytes)
            rows = await session.execute(
                select(RoomMessage.seq, RoomMessage.data, RoomMessage.created_at)
                .where(
                    RoomMessage.room_id == room_id,
                    RoomMessage.seq > after,
                    RoomMessage.seq <= last,
                )
                .order_by(RoomMessage.seq)
            )
            page = [StoredMessage(r.seq, r.data, r.created_at) for r in rows]
            return page, cut or len(sizes) == limit


def _page_end(sizes: Sequence[Any], max_bytes: int) -> tuple[int, bool]:
    """The last ``seq`` of a page of these (seq, size) rows within ``max_bytes``
    (always at least the first), and whether the page was cut short by it."""
    total = 0
    for i, (_seq, size) in enumerate(sizes):
        total += size or 0
        if total > max_bytes and i > 0:
            return sizes[i - 1][0], True
    return sizes[-1][0], False


#: The two queries of a catch-up page on the reader's own connection, by the
#: primary key; ``?`` placeholders (sqlite3's; psycopg's are ``%s``).
_PAGE_SIZES = (
    "SELECT seq, length(data) FROM room_messages WHERE room_id = ? AND seq > ? AND seq <= ? "
    "ORDER BY seq LIMIT ?"
)
_PAGE_ROWS = (
    "SELECT seq, data, created_at FROM room_messages WHERE room_id = ? AND seq > ? "
    "AND seq <= ? ORDER BY seq"
)

Fetch = Callable[[str, tuple[Any, ...]], Sequence[Any]]


def _page_direct(
    fetch: Fetch, room_id: bytes, after: int, limit: int, max_bytes: int, upto: int | None
) -> tuple[list[StoredMessage], bool]:
    """:meth:`MessageStore.room_messages_page` in plain SQL, for the catch-up
    reader's thread. Messages that lapse between the two queries (PostgreSQL reads
    them in autocommit) are simply not in the page."""
    top = upto if upto is not None else (1 << 62)
    sizes = fetch(_PAGE_SIZES, (room_id, after, top, limit))
    if not sizes:
        return [], False
    last, cut = _page_end(sizes, max_bytes)
    rows = fetch(_PAGE_ROWS, (room_id, after, last))
    page = [StoredMessage(seq, bytes(data), created) for seq, data, created in rows]
    return page, cut or len(sizes) == limit


def _page_sqlite(
    db: sqlite3.Connection, room_id: bytes, after: int, limit: int, max_bytes: int, upto: int | None
) -> tuple[list[StoredMessage], bool]:
    return _page_direct(
        lambda sql, args: db.execute(sql, args).fetchall(), room_id, after, limit, max_bytes, upto
    )


def _page_pg(
    conn: Connection, room_id: bytes, after: int, limit: int, max_bytes: int, upto: int | None
) -> tuple[list[StoredMessage], bool]:
    """On psycopg, rows in binary: as text, a bytea is hex, twice the bytes to send
    and to decode."""
    db = conn.connection.driver_connection
    assert isinstance(db, psycopg.Connection)
    return _page_direct(
        lambda sql, args: db.execute(sql.replace("?", "%s"), args, binary=True).fetchall(),
        room_id,
        after,
        limit,
        max_bytes,
        upto,
    )
