"""Room messages: ciphertext posted to a room, numbered by ``rooms.last_seq``.

The sequence number is taken inside the write transaction, so numbering
needs no in-process state and stays gap-free across relay instances.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..errors import RelayError
from .engine import BaseStore
from .models import Room, RoomMember, RoomMessage, coarse


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    data: bytes
    ts: int


class MessageStore(BaseStore):
    async def append_room_message(
        self, room_id: bytes, sender: bytes, client_id: bytes, data: bytes
    ) -> tuple[StoredMessage, bool]:
        """Store a room message once; returns the stored message and ``fresh``."""

        async def run(session: AsyncSession) -> tuple[StoredMessage, bool]:
            existing = (
                await session.execute(
                    select(RoomMessage.seq, RoomMessage.created_at).where(
                        RoomMessage.room_id == room_id,
                        RoomMessage.sender == sender,
                        RoomMessage.client_id == client_id,
                    )
                )
            ).first()
            if existing is not None:
                return StoredMessage(existing.seq, b"", existing.created_at), False
            role = await session.scalar(
                select(RoomMember.role).where(
                    RoomMember.room_id == room_id,
                    RoomMember.member == sender,
                    RoomMember.left_pos.is_(None),
                )
            )
            if role is None:
                raise RelayError("not_authorized", 403, "sender is not a member of the room")
            if role == "observer":
                raise RelayError("not_authorized", 403, "observers cannot post")
            # The quota is checked and spent in the row update that numbers the
            # message: no scan, and no race between two senders near the limit.
            size = len(data)
            seq = await session.scalar(
                update(Room)
                .where(
                    Room.id == room_id,
                    Room.stored_bytes + size <= self.quotas.max_room_bytes,
                )
                .values(last_seq=Room.last_seq + 1, stored_bytes=Room.stored_bytes + size)
                .returning(Room.last_seq)
            )
            if seq is None:
                if await session.get(Room, room_id) is None:
                    raise RelayError("unknown_room", 404)
                raise RelayError(
                    "quota_exceeded",
                    429,
                    "the room's storage quota is used up until older messages expire",
                )
            ts = coarse(self.clock())
            session.add(
                RoomMessage(
                    room_id=room_id,
                    seq=seq,
                    sender=sender,
                    client_id=client_id,
                    data=data,
                    created_at=ts,
                )
            )
            await session.flush()
            return StoredMessage(seq, data, ts), True

        return await self.batcher.submit(run)

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
