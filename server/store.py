"""Storage: SQLAlchemy 2 async over SQLite (WAL, synchronous=FULL) or PostgreSQL.

Writes on the hot path (room messages, mailbox puts and acks) go through a
group-commit :class:`Batcher`: callers enqueue and await; one task commits
everything that arrived within the batch window in a single transaction, then
resolves every caller. A send is acknowledged only after that commit returns,
so an acknowledged message is durable, and durability costs one fsync per
batch rather than per message.

Everything another relay instance would need lives in the database: sequence
numbers come from ``rooms.last_seq`` incremented inside the write transaction,
the log head and validated room state from ``rooms``, membership from
``room_members``, request nonces from ``seen_nonces``. On SQLite (one process
by construction) writers are additionally serialised by an in-process lock so
that a read-then-write transaction never meets ``SQLITE_BUSY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import and_, delete, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import aliased

from backchannel.protocol import errors as perr
from backchannel.protocol import roomlog
from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.keys import MemberPublicKey, PreKey, PreKeyBundle, PreKeyUpload

from .errors import RelayError, from_protocol
from .models import (
    CreationToken,
    LogEvent,
    MailboxItem,
    PreKeyMark,
    PreKeyRow,
    Room,
    RoomMember,
    RoomMessage,
    SeenNonce,
    coarse,
)

T = TypeVar("T")

ONE_TIME_KINDS = ("opk", "kem")
REPLACED_KINDS = ("spk", "kem-lr")


SQLITE_BEGIN = "backchannel_sqlite_begin"


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
            # We issue BEGIN ourselves (below), so the driver must not.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # A write transaction takes the write lock up front (BEGIN IMMEDIATE):
            # SQLite waits out a busy lock only then. A deferred transaction that
            # reads first and writes later fails at once when another process
            # holds the lock, whatever the busy timeout.
            mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_async_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        pool_timeout=10,
        # A database that went away must fail fast (storage_unavailable), not hang.
        connect_args={"timeout": 5, "command_timeout": 30},
    )


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database cannot be reached" (not "this write is bad")."""
    if isinstance(exc, OSError | ConnectionError | TimeoutError | PoolTimeout):
        return True
    if isinstance(exc, InterfaceError | OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


STORAGE_UNAVAILABLE = "storage_unavailable"


def storage_unavailable() -> RelayError:
    return RelayError(STORAGE_UNAVAILABLE, 503, "the database is unavailable; retry later")


def token_hash(token: str) -> bytes:
    return hashlib.blake2b(token.encode(), digest_size=32).digest()


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
        self,
        sessions: async_sessionmaker[AsyncSession],
        window: float,
        max_jobs: int,
        lock: asyncio.Lock | None = None,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self.on_commit = on_commit
        self._window = window
        self._max = max_jobs
        self._lock = lock
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="group-commit")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RelayError("shutting_down", 503))

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
            started = time.monotonic()
            await self._commit(jobs)
            if self.on_commit is not None:
                self.on_commit(len(jobs), time.monotonic() - started)

    async def _commit(self, jobs: list[_Job]) -> None:
        results: list[tuple[_Job, bool, Any]] = []
        try:
            async with (
                self._lock if self._lock else contextlib.nullcontext(),
                self._sessions() as session,
                session.begin(),
            ):
                for job in jobs:
                    try:
                        async with session.begin_nested():
                            results.append((job, True, await job.run(session)))
                    except RelayError as exc:
                        results.append((job, False, exc))
        except Exception as exc:
            if len(jobs) == 1 or unavailable(exc):
                # Nothing was committed: every caller gets a clear error, nobody hangs.
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(storage_unavailable())
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


@dataclass(frozen=True, slots=True)
class Appended:
    """The outcome of a log append: where the event sits, and whether it is new."""

    pos: int
    head: bytes
    fresh: bool
    event: roomlog.Event


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    data: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class MailItem:
    id: int
    room_id: bytes
    sender: bytes
    recipient: bytes
    data: bytes
    ts: int


class _Conflict(Exception):
    """Another writer moved the room's head between our read and our write."""


class Store:
    """Queries used by the relay; each method is one transaction."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_window: float,
        batch_max: int,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self.writing = (
            async_sessionmaker(
                engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"}), expire_on_commit=False
            )
            if self.is_sqlite
            else self.sessions
        )
        self.batcher = Batcher(
            self.writing, batch_window, batch_max, self._write_lock, on_commit=on_commit
        )
        self.clock = clock

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A read-write transaction (serialised with other writers on SQLite)."""
        async with (
            self._write_lock if self._write_lock else contextlib.nullcontext(),
            self.writing() as session,
            session.begin(),
        ):
            yield session

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()
        await self.engine.dispose()

    async def ping(self, timeout: float = 3.0) -> bool:
        try:
            async with asyncio.timeout(timeout), self.sessions() as session:
                await session.execute(select(1))
            return True
        except Exception:
            return False

    async def commit_once(self, run: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run ``run`` in its own transaction, translating integrity races."""
        try:
            async with self.transaction() as session:
                return await run(session)
        except IntegrityError as exc:
            raise RelayError("conflict", 409, "a concurrent write won; retry") from exc

    # --- creation tokens ------------------------------------------------------------

    async def create_token(self) -> str:
        token = "bct_" + secrets.token_urlsafe(24)

        async def run(session: AsyncSession) -> None:
            session.add(
                CreationToken(token_hash=token_hash(token), created_at=coarse(self.clock()))
            )

        await self.commit_once(run)
        return token

    # --- the room log ---------------------------------------------------------------

    def _check_not_future(self, event: roomlog.Event, skew: int) -> None:
        # The log only requires times never to decrease, so one far-future event
        # would force every later event to carry that time and make every
        # invite look expired: the relay holds every event to its own clock.
        if event.ts > int(self.clock()) + skew:
            raise RelayError("stale_event", 400, "event time is ahead of the relay's clock")

    async def create_room(
        self,
        data: bytes,
        *,
        limits: roomlog.LogLimits,
        token: str | None,
        need_token: bool,
        skew: int,
    ) -> Appended:
        try:
            state = roomlog.apply_event(None, data, limits=limits)
        except perr.ProtocolError as exc:
            raise from_protocol(exc) from exc
        event = roomlog.decode_event(data, max_size=limits.max_event_size)
        assert isinstance(event, roomlog.CreateEvent)
        self._check_not_future(event, skew)

        async def run(session: AsyncSession) -> Appended:
            existing = await session.scalar(
                select(LogEvent.hash).where(LogEvent.room_id == state.room_id, LogEvent.pos == 0)
            )
            if existing is not None:
                # The id is the hash of the create event: the same room, retried.
                return Appended(0, state.head, False, event)
            if need_token:
                if not token:
                    raise RelayError("creation_token_required", 403)
                used = await session.execute(
                    delete(CreationToken).where(CreationToken.token_hash == token_hash(token))
                )
                if (used.rowcount or 0) != 1:  # type: ignore[attr-defined]
                    raise RelayError("bad_creation_token", 403)
            session.add(
                Room(
                    id=state.room_id,
                    head=state.head,
                    log_len=state.length,
                    last_seq=0,
                    retention_seconds=state.rules.retention,
                    created_at=coarse(self.clock()),
                    state=state.to_bytes(),
                )
            )
            session.add(LogEvent(room_id=state.room_id, pos=0, hash=state.head, data=data))
            session.add(
                RoomMember(
                    room_id=state.room_id,
                    member=event.member.sign,
                    dh=event.member.dh,
                    role="facilitator",
                    left_pos=None,
                )
            )
            await session.flush()
            return Appended(0, state.head, True, event)

        try:
            return await self.commit_once(run)
        except RelayError as exc:
            if exc.code != "conflict":
                raise
            return Appended(0, state.head, False, event)  # a concurrent identical create won

    async def append_event(
        self,
        room_id: bytes,
        data: bytes,
        *,
        limits: roomlog.LogLimits,
        skew: int,
    ) -> Appended:
        """Validate ``data`` against the stored state and append it, or raise.

        Two appends racing for one position: the conditional update on
        ``(log_len, head)`` lets exactly one commit; the other is re-validated
        against the new head and so fails with ``chain_broken`` (or succeeds
        idempotently if it was the very same event).
        """
        for _ in range(4):
            try:
                async with self.transaction() as session:
                    return await self._append(session, room_id, data, limits, skew)
            except (_Conflict, IntegrityError):
                await asyncio.sleep(0)
        raise RelayError("conflict", 409, "the log moved on concurrently; fetch it and retry")

    async def _append(
        self,
        session: AsyncSession,
        room_id: bytes,
        data: bytes,
        limits: roomlog.LogLimits,
        skew: int,
    ) -> Appended:
        room = await session.get(Room, room_id)
        if room is None:
            raise RelayError("unknown_room", 404)
        digest = roomlog.event_hash(data)
        dup = await session.scalar(
            select(LogEvent.pos).where(LogEvent.room_id == room_id, LogEvent.hash == digest)
        )
        try:
            event = roomlog.decode_event(data, max_size=limits.max_event_size)
            if dup is not None:
                return Appended(dup, digest, False, event)
            state = roomlog.RoomState.from_bytes(room.state)
            new = roomlog.apply_event(state, data, limits=limits)
        except perr.ProtocolError as exc:
            raise from_protocol(exc) from exc
        self._check_not_future(event, skew)
        now = int(self.clock())
        if isinstance(event, roomlog.JoinEvent):
            # apply_event has no clock; the relay holds joins to its own.
            if abs(event.ts - now) > skew:
                raise RelayError("stale_event", 400, "join time is too far from the relay's clock")
            if now > state.invites[event.invite].expires:
                raise RelayError("invalid_invite", 403, "invite has expired")
        moved = await session.execute(
            update(Room)
            .where(Room.id == room_id, Room.log_len == state.length, Room.head == state.head)
            .values(
                log_len=new.length,
                head=new.head,
                state=new.to_bytes(),
                retention_seconds=new.rules.retention,
            )
        )
        if (moved.rowcount or 0) != 1:  # type: ignore[attr-defined]
            raise _Conflict
        session.add(LogEvent(room_id=room_id, pos=new.pos, hash=new.head, data=data))
        if isinstance(event, roomlog.JoinEvent):
            session.add(
                RoomMember(
                    room_id=room_id,
                    member=event.member.sign,
                    dh=event.member.dh,
                    role=new.members[event.member.sign].role,
                    left_pos=None,
                )
            )
        elif isinstance(event, roomlog.RemoveEvent | roomlog.LeaveEvent):
            gone = event.target if isinstance(event, roomlog.RemoveEvent) else event.author
            await session.execute(
                update(RoomMember)
                .where(RoomMember.room_id == room_id, RoomMember.member == gone)
                .values(left_pos=new.pos)
            )
        elif isinstance(event, roomlog.SetRoleEvent):
            await session.execute(
                update(RoomMember)
                .where(RoomMember.room_id == room_id, RoomMember.member == event.target)
                .values(role=event.role)
            )
        await session.flush()
        return Appended(new.pos, new.head, True, event)

    async def room_state(self, room_id: bytes) -> roomlog.RoomState:
        async with self.reading() as session:
            data = await session.scalar(select(Room.state).where(Room.id == room_id))
        if data is None:
            raise RelayError("unknown_room", 404)
        return roomlog.RoomState.from_bytes(data)

    async def membership(self, room_id: bytes, member: bytes) -> RoomMember | None:
        async with self.reading() as session:
            return await session.get(RoomMember, (room_id, member))

    async def current_member_among(self, room_id: bytes, keys: list[bytes]) -> bytes | None:
        """One of ``keys`` that is a current member of the room, if any."""
        if not keys:
            return None
        async with self.reading() as session:
            return await session.scalar(
                select(RoomMember.member)
                .where(
                    RoomMember.room_id == room_id,
                    RoomMember.member.in_(keys),
                    RoomMember.left_pos.is_(None),
                )
                .order_by(RoomMember.member)
                .limit(1)
            )

    async def read_events(
        self, room_id: bytes, after: int, limit: int, upto: int | None = None
    ) -> tuple[list[bytes], int]:
        """Events with ``after < pos`` (and ``pos <= upto``), and the log's length."""
        async with self.reading() as session:
            length = await session.scalar(select(Room.log_len).where(Room.id == room_id))
            if length is None:
                raise RelayError("unknown_room", 404)
            query = select(LogEvent.data).where(LogEvent.room_id == room_id, LogEvent.pos > after)
            if upto is not None:
                query = query.where(LogEvent.pos <= upto)
            rows = await session.scalars(query.order_by(LogEvent.pos).limit(limit))
            return list(rows), length

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

    # --- room messages -----------------------------------------------------------

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
            seq = await session.scalar(
                update(Room)
                .where(Room.id == room_id)
                .values(last_seq=Room.last_seq + 1)
                .returning(Room.last_seq)
            )
            if seq is None:
                raise RelayError("unknown_room", 404)
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

    # --- mailboxes ------------------------------------------------------------------

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

    # --- prekeys ----------------------------------------------------------------------

    async def upload_prekeys(
        self, upload: PreKeyUpload, max_per_member: int
    ) -> tuple[int, dict[str, int]]:
        member = upload.member.sign

        async def run(session: AsyncSession) -> tuple[int, dict[str, int]]:
            ok = await session.scalar(
                select(RoomMember.room_id)
                .where(
                    RoomMember.member == member,
                    RoomMember.dh == upload.member.dh,
                    RoomMember.left_pos.is_(None),
                )
                .limit(1)
            )
            if ok is None:
                raise RelayError("not_a_member", 403, "the key is not a current member of a room")
            marks = {
                m.kind: m.max_id
                for m in await session.scalars(
                    select(PreKeyMark).where(PreKeyMark.member == member)
                )
            }
            stored = {
                (r.kind, r.key_id): r.data
                for r in await session.scalars(select(PreKeyRow).where(PreKeyRow.member == member))
            }
            fresh: dict[tuple[str, int], bytes] = {}
            for prekey in upload.prekeys:
                key = (prekey.kind, prekey.id)
                data = encode(prekey.to_value())
                if key in stored:
                    if stored[key] != data:
                        raise RelayError(
                            "prekey_conflict", 409, "a different prekey with this id is stored"
                        )
                    continue  # the same prekey again: an idempotent retry
                if prekey.id <= marks.get(prekey.kind, -1):
                    raise RelayError(
                        "prekey_replayed", 409, f"{prekey.kind} ids must grow; {prekey.id} is old"
                    )
                fresh[key] = data
            for kind in REPLACED_KINDS:
                ids = [i for (k, i) in fresh if k == kind]
                if ids:
                    newest = max(ids)
                    for i in ids:
                        if i != newest:
                            del fresh[(kind, i)]
                    for k, i in list(stored):
                        if k == kind:
                            del stored[(k, i)]
                    await session.execute(
                        delete(PreKeyRow).where(PreKeyRow.member == member, PreKeyRow.kind == kind)
                    )
            if len(stored) + len(fresh) > max_per_member:
                raise RelayError(
                    "too_many_prekeys",
                    413,
                    f"at most {max_per_member} prekeys may be stored for one member key",
                )
            for (kind, key_id), data in fresh.items():
                session.add(PreKeyRow(member=member, kind=kind, key_id=key_id, data=data))
            for kind in {k for k, _ in fresh}:
                top = max(i for k, i in fresh if k == kind)
                if kind in marks:
                    await session.execute(
                        update(PreKeyMark)
                        .where(PreKeyMark.member == member, PreKeyMark.kind == kind)
                        .values(max_id=max(top, marks[kind]))
                    )
                else:
                    session.add(PreKeyMark(member=member, kind=kind, max_id=top))
            await session.flush()
            kinds = [k for k, _ in stored] + [k for k, _ in fresh]
            return len(fresh), {"opk": kinds.count("opk"), "kem": kinds.count("kem")}

        return await self.commit_once(run)

    async def _take_one(self, session: AsyncSession, member: bytes, kind: str) -> bytes | None:
        """Delete and return the lowest-id one-time prekey of ``kind``, atomically."""
        if self.is_sqlite:
            lowest = (
                select(func.min(PreKeyRow.key_id))
                .where(PreKeyRow.member == member, PreKeyRow.kind == kind)
                .scalar_subquery()
            )
            return await session.scalar(
                delete(PreKeyRow)
                .where(
                    PreKeyRow.member == member, PreKeyRow.kind == kind, PreKeyRow.key_id == lowest
                )
                .returning(PreKeyRow.data)
            )
        key_id = await session.scalar(
            select(PreKeyRow.key_id)
            .where(PreKeyRow.member == member, PreKeyRow.kind == kind)
            .order_by(PreKeyRow.key_id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if key_id is None:
            return None
        return await session.scalar(
            delete(PreKeyRow)
            .where(PreKeyRow.member == member, PreKeyRow.kind == kind, PreKeyRow.key_id == key_id)
            .returning(PreKeyRow.data)
        )

    async def claim_prekeys(self, target: bytes, claimer: bytes) -> bytes:
        """A bundle for ``target``, consuming one-time prekeys; ``claimer`` must share a room."""

        async def run(session: AsyncSession) -> bytes:
            a, b = aliased(RoomMember), aliased(RoomMember)
            shared = await session.execute(
                select(a.dh)
                .join(b, and_(a.room_id == b.room_id))
                .where(
                    a.member == target,
                    a.left_pos.is_(None),
                    b.member == claimer,
                    b.left_pos.is_(None),
                )
                .limit(1)
            )
            row = shared.first()
            if row is None:
                raise RelayError("not_authorized", 403, "you share no room with that member")
            spk = await session.scalar(
                select(PreKeyRow.data)
                .where(PreKeyRow.member == target, PreKeyRow.kind == "spk")
                .order_by(PreKeyRow.key_id.desc())
                .limit(1)
            )
            last_resort = await session.scalar(
                select(PreKeyRow.data)
                .where(PreKeyRow.member == target, PreKeyRow.kind == "kem-lr")
                .order_by(PreKeyRow.key_id.desc())
                .limit(1)
            )
            if spk is None:
                raise RelayError("no_prekeys", 404, "that member has no signed prekey here")
            kem = await self._take_one(session, target, "kem") or last_resort
            if kem is None:
                raise RelayError("no_prekeys", 404, "that member has no KEM prekey here")
            opk = await self._take_one(session, target, "opk")
            bundle = PreKeyBundle(
                member=MemberPublicKey(sign=target, dh=row.dh),
                spk=PreKey.from_value(decode(spk)),
                kem=PreKey.from_value(decode(kem)),
                opk=PreKey.from_value(decode(opk)) if opk is not None else None,
            )
            return bundle.to_bytes()

        return await self.commit_once(run)

    # --- the catch-up tick (see fanout.py) ---------------------------------------------

    async def room_marks(self, rooms: list[bytes]) -> dict[bytes, tuple[int, int, bytes]]:
        """``room -> (last_seq, log_len, head)`` for the listed rooms."""
        out: dict[bytes, tuple[int, int, bytes]] = {}
        async with self.reading() as session:
            for i in range(0, len(rooms), 500):
                rows = await session.execute(
                    select(Room.id, Room.last_seq, Room.log_len, Room.head).where(
                        Room.id.in_(rooms[i : i + 500])
                    )
                )
                out.update({r.id: (r.last_seq, r.log_len, r.head) for r in rows})
        return out

    async def departed_among(self, pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The ``(room, member)`` pairs whose member has left or was removed."""
        gone: list[tuple[bytes, bytes]] = []
        wanted = set(pairs)
        rooms = sorted({room for room, _ in pairs})
        async with self.reading() as session:
            for i in range(0, len(rooms), 500):
                rows = await session.execute(
                    select(RoomMember.room_id, RoomMember.member).where(
                        RoomMember.room_id.in_(rooms[i : i + 500]),
                        RoomMember.left_pos.is_not(None),
                    )
                )
                gone += [(r.room_id, r.member) for r in rows if (r.room_id, r.member) in wanted]
        return gone

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

    # --- housekeeping -------------------------------------------------------------------

    async def purge(self, now: float | None = None) -> dict[str, int]:
        """Delete ciphertext older than its room's retention, and expired nonces."""
        at = int(self.clock() if now is None else now)

        def lapsed(column: Any, room_column: Any) -> Any:
            retention = (
                select(Room.retention_seconds).where(Room.id == room_column).scalar_subquery()
            )
            return column + retention < at

        async with self.transaction() as session:
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
