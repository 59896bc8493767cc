"""Pairwise mailboxes: items one member leaves for another until they are acknowledged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..errors import RelayError
from .engine import BaseStore
from .models import MailboxItem, RoomMember, coarse

_PENDING = (
    "SELECT id, room_id, sender, data, created_at FROM mailbox WHERE recipient = ? AND id > ? "
    "ORDER BY id LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class MailItem:
    id: int
    room_id: bytes
    sender: bytes
    recipient: bytes
    data: bytes
    ts: int


class MailboxStore(BaseStore):
    async def mailbox_put(
        self,
        recipient: bytes,
        sender: bytes,
        room_id: bytes,
        client_id: bytes,
        data: bytes,
        max_depth: int,
    ) -> tuple[MailItem, bool]:
        async def run(session: AsyncSession) -> tuple[MailItem, bool]:
            existing = (
                await session.execute(
                    select(MailboxItem.id, MailboxItem.created_at).where(
                        MailboxItem.recipient == recipient,
                        MailboxItem.sender == sender,
                        MailboxItem.client_id == client_id,
                    )
                )
            ).first()
            if existing is not None:
                return MailItem(existing.id, room_id, sender, recipient, b"", 0), False
            current = await session.scalar(
                select(func.count())
                .select_from(RoomMember)
                .where(
                    RoomMember.room_id == room_id,
                    RoomMember.member.in_([sender, recipient]),
                    RoomMember.left_pos.is_(None),
                )
            )
            if current != (1 if sender == recipient else 2):
                raise RelayError("not_authorized", 403, "both ends must be members of the room")
            # Each sender has its own share of the recipient's mailbox, so one member
            # filling it (as an attack, or a client stuck in a loop) cannot refuse
            # everyone else's pairwise messages, sender-key distributions among them.
            # Counted on the (recipient, sender, client_id) unique index.
            mine = await session.scalar(
                select(func.count())
                .select_from(MailboxItem)
                .where(MailboxItem.recipient == recipient, MailboxItem.sender == sender)
            )
            if (mine or 0) >= self.quotas.max_mailbox_per_sender:
                raise RelayError(
                    "mailbox_full", 429, "your share of the recipient's mailbox is full"
                )
            depth = await session.scalar(
                select(func.count())
                .select_from(MailboxItem)
                .where(MailboxItem.recipient == recipient)
            )
            if (depth or 0) >= max_depth:
                raise RelayError("mailbox_full", 429, "the recipient's mailbox is full")
            ts = coarse(self.clock())
            item = MailboxItem(
                recipient=recipient,
                sender=sender,
                room_id=room_id,
                client_id=client_id,
                data=data,
                created_at=ts,
            )
            session.add(item)
            await session.flush()
            return MailItem(item.id, room_id, sender, recipient, data, ts), True

        return await self.batcher.submit(run)

    async def mailbox_pending(self, recipient: bytes, after: int, limit: int) -> list[MailItem]:
        if self.direct is not None:
            # Every connection asks this for each of its keys as it authenticates: on
            # the reader thread in one hop, a small work item while it waits, rather
            # than an async session (and its greenlet's stack) held per connection
            # through a storm of reconnections (bench: RSS per idle connection).
            sqlite = self.is_sqlite
            args = (recipient, after, limit)

            def read(db: Any) -> list[Any]:
                if sqlite:
                    return list(db.execute(_PENDING, args).fetchall())
                pg = db.connection.driver_connection  # psycopg, rows in binary (see _page_pg)
                return list(pg.execute(_PENDING.replace("?", "%s"), args, binary=True).fetchall())

            rows = await self.read_direct(read)
            return [
                MailItem(i, bytes(room), bytes(sender), recipient, bytes(data), ts)
                for i, room, sender, data, ts in rows
            ]
        async with self.reading() as session:
            rows = await session.execute(
                select(
                    MailboxItem.id,
                    MailboxItem.room_id,
                    MailboxItem.sender,
                    MailboxItem.data,
                    MailboxItem.created_at,
                )
                .where(MailboxItem.recipient == recipient, MailboxItem.id > after)
                .order_by(MailboxItem.id)
                .limit(limit)
            )
            return [
                MailItem(r.id, r.room_id, r.sender, recipient, r.data, r.created_at) for r in rows
            ]

    async def mailbox_ack(self, recipients: list[bytes], ids: list[int]) -> list[int]:
        """Delete the listed items that belong to one of ``recipients``; returns their ids."""

        async def run(session: AsyncSession) -> list[int]:
            found = await session.scalars(
                select(MailboxItem.id).where(
                    MailboxItem.recipient.in_(recipients), MailboxItem.id.in_(ids)
                )
            )
            mine = sorted(found)
            if mine:
                await session.execute(delete(MailboxItem).where(MailboxItem.id.in_(mine)))
            return mine

        return await self.batcher.submit(run)

    # --- the catch-up tick (see handlers/fanout.py) -------------------------------------

    async def mailbox_marks(self, keys: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """``recipient -> (pending count, newest id)`` for recipients with pending items."""
        out: dict[bytes, tuple[int, int]] = {}
        async with self.reading() as session:
            for i in range(0, len(keys), 500):
                rows = await session.execute(
                    select(MailboxItem.recipient, func.count(), func.max(MailboxItem.id))
                    .where(MailboxItem.recipient.in_(keys[i : i + 500]))
                    .group_by(MailboxItem.recipient)
                )
                out.update({r[0]: (int(r[1]), int(r[2])) for r in rows})
        return out
