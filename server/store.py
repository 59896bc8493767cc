"""Storage: SQLAlchemy 2 async over SQLite (WAL, synchronous=FULL) or PostgreSQL.

Writes on the hot path (room messages, mailbox puts and acks) go through a
group-commit :class:`Batcher`: callers enqueue and await; one task commits
everything that arrived within the batch window in a single transaction, then
resolves every caller. A send is acknowledged only after that commit returns,
so an acknowledged message is durable, and durability costs one fsync per
batch rather than per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from .errors import RelayError
from .models import (
    SCHEMA_VERSION,
    Base,
    MailboxItem,
    Room,
    RoomMessage,
    SchemaInfo,
    coarse,
)

T = TypeVar("T")


def make_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL + FULL: an acknowledged write survives power loss (DESIGN.md §4).
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine) as session, session.begin():
        info = await session.get(SchemaInfo, 1)
        if info is None:
            session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))


@dataclass(slots=True)
class _Job:
    run: Callable[[AsyncSession], Awaitable[Any]]
    future: asyncio.Future[Any]


class Batcher:
    """Group commit for small, independent writes.

    Each job runs inside the shared transaction. A job that raises
    :class:`RelayError` (a limit, a bad reference) is answered with that error
    and the batch goes on; an unexpected database error aborts the batch, and
    every job in it is retried alone so that one bad write never fails others.
    """

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], window: float, max_jobs: int
    ) -> None:
        self._sessions = sessions
        self._window = window
        self._max = max_jobs
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # read by metrics; trimmed by the reader

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="group-commit")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, run: Callable[[AsyncSession], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(run, future))
        return await future

    async def _loop(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            deadline = time.monotonic() + self._window
            while len(jobs) < self._max:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                    else:
                        jobs.append(self._queue.get_nowait())
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            self.batch_sizes.append(len(jobs))
            if len(self.batch_sizes) > 10_000:
                del self.batch_sizes[:5000]
            await self._commit(jobs)

    async def _commit(self, jobs: list[_Job]) -> None:
        results: list[tuple[_Job, bool, Any]] = []
        try:
            async with self._sessions() as session, session.begin():
                for job in jobs:
                    try:
                        async with session.begin_nested():
                            results.append((job, True, await job.run(session)))
                    except RelayError as exc:
                        results.append((job, False, exc))
        except Exception:
            if len(jobs) == 1:
                job = jobs[0]
                if not job.future.done():
                    job.future.set_exception(RelayError("storage_unavailable", 503))
                return
            for job in jobs:
                await self._commit([job])
            return
        for job, ok, value in results:
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)


class Store:
    """Queries used by the relay; each method is one transaction."""

    def __init__(self, engine: AsyncEngine, *, batch_window: float, batch_max: int) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.batcher = Batcher(self.sessions, batch_window, batch_max)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
            yield session

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()
        await self.engine.dispose()

    async def ping(self) -> bool:
        try:
            async with self.sessions() as session:
                await session.execute(select(1))
            return True
        except Exception:
            return False

    # --- room messages -----------------------------------------------------------

    async def append_room_message(
        self, room_id: bytes, sender: bytes, client_id: bytes, data: bytes
    ) -> tuple[int, bool]:
        """Store a room message once; returns ``(seq, fresh)``."""

        async def run(session: AsyncSession) -> tuple[int, bool]:
            existing = await session.scalar(
                select(RoomMessage.seq).where(
                    RoomMessage.room_id == room_id,
                    RoomMessage.sender == sender,
                    RoomMessage.client_id == client_id,
                )
            )
            if existing is not None:
                return existing, False
            seq = await session.scalar(
                update(Room)
                .where(Room.id == room_id)
                .values(last_seq=Room.last_seq + 1)
                .returning(Room.last_seq)
            )
            if seq is None:
                raise RelayError("unknown_room", 404)
            session.add(
                RoomMessage(
                    room_id=room_id,
                    seq=seq,
                    sender=sender,
                    client_id=client_id,
                    data=data,
                    created_at=coarse(time.time()),
                )
            )
            await session.flush()
            return seq, True

        return await self.batcher.submit(run)

    async def room_messages_after(
        self, room_id: bytes, after: int, limit: int
    ) -> list[tuple[int, bytes]]:
        async with self.sessions() as session:
            rows = await session.execute(
                select(RoomMessage.seq, RoomMessage.data)
                .where(RoomMessage.room_id == room_id, RoomMessage.seq > after)
                .order_by(RoomMessage.seq)
                .limit(limit)
            )
            return [(r.seq, r.data) for r in rows]

    # --- mailboxes ------------------------------------------------------------------

    async def mailbox_put(
        self,
        recipient: bytes,
        sender: bytes,
        room_id: bytes,
        client_id: bytes,
        data: bytes,
        max_depth: int,
    ) -> tuple[int, bool]:
        async def run(session: AsyncSession) -> tuple[int, bool]:
            existing = await session.scalar(
                select(MailboxItem.id).where(
                    MailboxItem.recipient == recipient,
                    MailboxItem.sender == sender,
                    MailboxItem.client_id == client_id,
                )
            )
            if existing is not None:
                return existing, False
            depth = await session.scalar(
                select(func.count()).select_from(MailboxItem).where(
                    MailboxItem.recipient == recipient
                )
            )
            if (depth or 0) >= max_depth:
                raise RelayError("mailbox_full", 429)
            item = MailboxItem(
                recipient=recipient,
                sender=sender,
                room_id=room_id,
                client_id=client_id,
                data=data,
                created_at=coarse(time.time()),
            )
            session.add(item)
            await session.flush()
            return item.id, True

        return await self.batcher.submit(run)

    async def mailbox_after(
        self, recipient: bytes, after: int, limit: int
    ) -> list[tuple[int, bytes, bytes, bytes]]:
        async with self.sessions() as session:
            rows = await session.execute(
                select(MailboxItem.id, MailboxItem.sender, MailboxItem.room_id, MailboxItem.data)
                .where(MailboxItem.recipient == recipient, MailboxItem.id > after)
                .order_by(MailboxItem.id)
                .limit(limit)
            )
            return [(r.id, r.sender, r.room_id, r.data) for r in rows]

    async def mailbox_ack(self, recipient: bytes, ids: list[int]) -> int:
        async def run(session: AsyncSession) -> int:
            result = await session.execute(
                delete(MailboxItem).where(
                    MailboxItem.recipient == recipient, MailboxItem.id.in_(ids)
                )
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

        return await self.batcher.submit(run)

    async def commit_once(self, run: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run ``run`` in its own transaction, translating integrity races."""
        try:
            async with self.transaction() as session:
                return await run(session)
        except IntegrityError as exc:
            raise RelayError("conflict", 409, "a concurrent write won; retry") from exc
