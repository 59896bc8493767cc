"""Room-creation tokens, request nonces, the retention purge and storage statistics."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..errors import RelayError
from .engine import BaseStore
from .models import (
    CreationToken,
    LogEvent,
    MailboxItem,
    PreKeyRow,
    Room,
    RoomMessage,
    SeenNonce,
    coarse,
)


def token_hash(token: str) -> bytes:
    return hashlib.blake2b(token.encode(), digest_size=32).digest()


def spent_hash(token: str) -> bytes:
    """The row a spent token leaves, so that a second use can be told from a typo; a
    different hash, so that it can never be spent as a token itself."""
    return hashlib.blake2b(token.encode(), digest_size=32, person=b"bc-spent-token").digest()


async def spend_token(session: AsyncSession, token: str, now: int) -> str:
    """Spend the creation token inside the caller's transaction: ``"ok"``, ``"used"``
    (spent before) or ``"unknown"``."""
    used = await session.execute(
        delete(CreationToken).where(CreationToken.token_hash == token_hash(token))
    )
    if (used.rowcount or 0) == 1:  # type: ignore[attr-defined]
        session.add(CreationToken(token_hash=spent_hash(token), created_at=now))
        return "ok"
    spent = await session.scalar(
        select(CreationToken.token_hash).where(CreationToken.token_hash == spent_hash(token))
    )
    return "unknown" if spent is None else "used"


class HousekeepingStore(BaseStore):
    # --- creation tokens ------------------------------------------------------------

    async def create_token(self) -> str:
        token = "bct_" + secrets.token_urlsafe(24)

        async def run(session: AsyncSession) -> None:
            session.add(
                CreationToken(token_hash=token_hash(token), created_at=coarse(self.clock()))
            )

        await self.commit_once(run)
        return token

    # --- nonces of signed requests --------------------------------------------------

    async def remember_nonce(self, nonce: bytes, expires_at: int) -> bool:
        """``False`` if the nonce was seen before (a replayed request)."""

        async def run(session: AsyncSession) -> None:
            session.add(SeenNonce(nonce=nonce, expires_at=expires_at))
            await session.flush()

        try:
            await self.commit_once(run)
        except RelayError as exc:
            if exc.code == "conflict":
                return False
            raise
        return True

    async def probe_write(self, timeout: float = 3.0) -> bool:
        """Whether a write reaches the database: a throwaway nonce inserted and deleted
        in one committed transaction (for ``/readyz`` while writes fail)."""
        nonce = secrets.token_bytes(16)
        try:
            async with asyncio.timeout(timeout), self.transaction() as session:
                session.add(SeenNonce(nonce=nonce, expires_at=0))
                await session.flush()
                await session.execute(delete(SeenNonce).where(SeenNonce.nonce == nonce))
        except Exception:
            return False
        return True

    # --- retention and statistics ---------------------------------------------------

    async def purge(self, now: float | None = None) -> dict[str, int]:
        """Delete ciphertext older than its room's retention, and expired nonces."""
        at = int(self.clock() if now is None else now)

        def lapsed(column: Any, room_column: Any) -> Any:
            retention = (
                select(Room.retention_seconds).where(Room.id == room_column).scalar_subquery()
            )
            return column + retention < at

        async with self.transaction() as session:
            # Each room's byte count goes down by what is deleted from it, in the
            # same transaction (the quota in messages.py reads the count).
            freed = await session.execute(
                select(RoomMessage.room_id, func.sum(func.length(RoomMessage.data)))
                .where(lapsed(RoomMessage.created_at, RoomMessage.room_id))
                .group_by(RoomMessage.room_id)
            )
            for room_id, size in freed.all():
                spent = int(size or 0)
                await session.execute(
                    update(Room)
                    .where(Room.id == room_id)
                    .values(
                        stored_bytes=case(
                            (Room.stored_bytes > spent, Room.stored_bytes - spent), else_=0
                        )
                    )
                )
            messages = await session.execute(
                delete(RoomMessage).where(lapsed(RoomMessage.created_at, RoomMessage.room_id))
            )
            mail = await session.execute(
                delete(MailboxItem).where(lapsed(MailboxItem.created_at, MailboxItem.room_id))
            )
            nonces = await session.execute(delete(SeenNonce).where(SeenNonce.expires_at < at))
        return {
            "room_messages": int(messages.rowcount or 0),  # type: ignore[attr-defined]
            "mailbox_items": int(mail.rowcount or 0),  # type: ignore[attr-defined]
            "nonces": int(nonces.rowcount or 0),  # type: ignore[attr-defined]
        }

    async def stats(self) -> dict[str, int]:
        async with self.reading() as session:

            async def count(model: Any) -> int:
                return int(await session.scalar(select(func.count()).select_from(model)) or 0)

            async def size(column: Any) -> int:
                return int(
                    await session.scalar(select(func.coalesce(func.sum(func.length(column)), 0)))
                    or 0
                )

            return {
                "rooms": await count(Room),
                "log_events": await count(LogEvent),
                "room_messages": await count(RoomMessage),
                "mailbox_items": await count(MailboxItem),
                "prekeys": await count(PreKeyRow),
                "bytes": (
                    await size(LogEvent.data)
                    + await size(RoomMessage.data)
                    + await size(MailboxItem.data)
                    + await size(PreKeyRow.data)
                    + await size(Room.state)
                ),
            }
