"""Room messages: ciphertext posted to a room, numbered by ``rooms.last_seq``.

The sequence number is taken inside the write transaction, so numbering
needs no in-process state and stays gap-free across relay instances. The
messages of one group commit are appended together (:meth:`MessageStore._append_sync`):
one duplicate check and one membership query for the batch, one numbering
update per room, one multi-row insert; each message still gets its own answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, func, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ..errors import RelayError
from .engine import BaseStore
from .models import Room, RoomMember, RoomMessage, coarse


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


#: Rows per ``IN`` list: far below SQLite's and PostgreSQL's limits on bound parameters.
_CHUNK = 200


def _key_of(post: _Post) -> tuple[bytes, bytes, bytes]:
    return post.room_id, post.sender, post.client_id


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
        return await self.batcher.submit_bulk(self._append_batch, post)  # type: ignore[no-any-return]

    async def _append_batch(self, session: AsyncSession, posts: list[_Post]) -> list[Any]:
        # A fixed handful of statements per batch rather than six per message: each
        # statement (and ORM flush) costs round trips between the event loop and the
        # database thread, and those, not SQLite, bounded the relay's throughput.
        return await session.run_sync(self._append_sync, posts)

    def _append_sync(self, session: Session, posts: list[_Post]) -> list[Any]:
        """The outcomes of ``posts`` in order, as if appended one after another."""
        conn = session.connection()
        keys = [_key_of(p) for p in posts]
        # A retried client id is answered with the original, before any other check:
        # the sender may have left since, or the room filled up.
        original: dict[tuple[bytes, bytes, bytes], tuple[int, int]] = {}
        unique = sorted(set(keys))
        for i in range(0, len(unique), _CHUNK):
            rows = conn.execute(
                select(
                    RoomMessage.room_id,
                    RoomMessage.sender,
                    RoomMessage.client_id,
                    RoomMessage.seq,
                    RoomMessage.created_at,
                ).where(
                    tuple_(RoomMessage.room_id, RoomMessage.sender, RoomMessage.client_id).in_(
                        unique[i : i + _CHUNK]
                    )
                )
            )
            for r in rows:
                original[r.room_id, r.sender, r.client_id] = (r.seq, r.created_at)
        pairs = sorted({(p.room_id, p.sender) for p in posts if _key_of(p) not in original})
        roles: dict[tuple[bytes, bytes], str] = {}
        for i in range(0, len(pairs), _CHUNK):
            rows = conn.execute(
                select(RoomMember.room_id, RoomMember.member, RoomMember.role).where(
                    tuple_(RoomMember.room_id, RoomMember.member).in_(pairs[i : i + _CHUNK]),
                    RoomMember.left_pos.is_(None),
                )
            )
            roles.update({(r.room_id, r.member): r.role for r in rows})

        out: list[Any] = [None] * len(posts)
        first_of: dict[tuple[bytes, bytes, bytes], int] = {}
        copies: list[tuple[int, int]] = []
        by_room: dict[bytes, list[int]] = {}
        for i, (post, key) in enumerate(zip(posts, keys, strict=True)):
            if key in original:
                seq, ts = original[key]
                out[i] = (StoredMessage(seq, b"", ts), False)
            elif key in first_of:
                copies.append((i, first_of[key]))  # the same send twice in one batch
            elif (role := roles.get((post.room_id, post.sender))) is None:
                out[i] = _not_member()
            elif role == "observer":
                out[i] = _observer()
            else:
                first_of[key] = i
                by_room.setdefault(post.room_id, []).append(i)

        ts = coarse(self.clock())
        rows_in: list[dict[str, Any]] = []
        # Rooms in a fixed order: two instances' batches then lock their rows in the
        # same order and cannot deadlock on PostgreSQL.
        for room_id in sorted(by_room):
            taken = self._number(conn, room_id, [posts[i] for i in by_room[room_id]])
            for i, seq in zip(by_room[room_id], taken, strict=True):
                post = posts[i]
                if isinstance(seq, RelayError):
                    out[i] = seq
                    continue
                out[i] = (StoredMessage(seq, post.data, ts), True)
                rows_in.append(
                    {
                        "room_id": room_id,
                        "seq": seq,
                        "sender": post.sender,
                        "client_id": post.client_id,
                        "data": post.data,
                        "created_at": ts,
                    }
                )
        if rows_in:
            conn.execute(insert(RoomMessage), rows_in)
        for i, first in copies:
            done = out[first]
            out[i] = done if isinstance(done, RelayError) else (replace(done[0], data=b""), False)
        return out

    def _number(self, conn: Connection, room_id: bytes, posts: list[_Post]) -> list[Any]:
        """Sequence numbers for ``posts`` (one room, in order), or the error for each
        that would exceed the room's quota. The quota is checked and spent in the row
        update that numbers the messages: no scan, and no race between two senders
        near the limit, since the row stays locked until the batch commits."""
        limit = self.quotas.max_room_bytes
        sizes = [len(p.data) for p in posts]
        total = sum(sizes)
        last = conn.execute(
            update(Room)
            .where(Room.id == room_id, Room.stored_bytes + total <= limit)
            .values(last_seq=Room.last_seq + len(sizes), stored_bytes=Room.stored_bytes + total)
            .returning(Room.last_seq)
        ).scalar()
        if last is not None:
            return list(range(last - len(sizes) + 1, last + 1))
        # Not all of them fit: take them in order, as if sent one by one, so that a
        # smaller message after one refused still goes in.
        used = conn.execute(
            select(Room.stored_bytes).where(Room.id == room_id).with_for_update()
        ).scalar()
        if used is None:
            return [RelayError("unknown_room", 404) for _ in posts]
        fits: list[bool] = []
        for size in sizes:
            fits.append(used + size <= limit)
            used += size if fits[-1] else 0
        taken = [size for size, fit in zip(sizes, fits, strict=True) if fit]
        if not taken:
            return [_over_quota() for _ in posts]
        spent = sum(taken)
        last = conn.execute(
            update(Room)
            .where(Room.id == room_id)
            .values(last_seq=Room.last_seq + len(taken), stored_bytes=Room.stored_bytes + spent)
            .returning(Room.last_seq)
        ).scalar_one()
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
        async with self.reading() as session:
            query = select(RoomMessage.seq, func.length(RoomMessage.data)).where(
                RoomMessage.room_id == room_id, RoomMessage.seq > after
            )
            if upto is not None:
                query = query.where(RoomMessage.seq <= upto)
            sizes = (await session.execute(query.order_by(RoomMessage.seq).limit(limit))).all()
            if not sizes:
                return [], False
            total, last, cut = 0, sizes[0][0], False
            for seq, size in sizes:
                total += size or 0
                if total > max_bytes and seq != sizes[0][0]:
                    cut = True
                    break
                last = seq
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
