"""The database engine, the group-commit :class:`Batcher` and the base every store builds on.

SQLAlchemy 2 async over SQLite (WAL, synchronous=FULL) or PostgreSQL.

Writes on the hot path (room messages, mailbox puts and acks) go through a
group-commit :class:`Batcher`: callers enqueue and await; one task commits
everything that arrived within the batch window in a single transaction, then
resolves every caller. A send is acknowledged only after that commit returns,
so an acknowledged message is durable, and durability costs one fsync per
batch rather than per message.

On SQLite (one process by construction) writers are additionally serialised by
an in-process lock so that a read-then-write transaction never meets
``SQLITE_BUSY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import SingletonThreadPool

from ..errors import RelayError
from ..logging import get_logger

log = get_logger("backchannel.relay.storage")

T = TypeVar("T")


SQLITE_BEGIN = "backchannel_sqlite_begin"


def _sqlite_connection_setup(sync_engine: Engine) -> None:
    @event.listens_for(sync_engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL + FULL: an acknowledged write survives power loss (DESIGN.md §4).
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
        # We issue BEGIN ourselves (below), so the driver must not.
        dbapi_conn.isolation_level = None

    @event.listens_for(sync_engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        # A write transaction takes the write lock up front (BEGIN IMMEDIATE):
        # SQLite waits out a busy lock only then. A deferred transaction that
        # reads first and writes later fails at once when another process
        # holds the lock, whatever the busy timeout.
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, *, busy_timeout: float = 30.0) -> AsyncEngine:
    """``busy_timeout``: seconds an SQLite write waits for another process's lock. The
    relay passes its short setting; operator commands may wait longer."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # Private from other local users: the log shows who talks to whom.
            # SQLite gives its -wal and -shm files the database file's mode.
            database = Path(parsed.database)
            database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not database.exists():
                os.close(os.open(database, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = create_async_engine(url, connect_args={"timeout": busy_timeout})
        _sqlite_connection_setup(engine.sync_engine)
        engine.sync_engine.backchannel_busy_timeout = busy_timeout  # type: ignore[attr-defined]
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


def make_direct_writer(engine: AsyncEngine) -> Engine | None:
    """A synchronous engine on the same database, for writes done in one hop.

    Through an async driver every statement, ``BEGIN`` and ``COMMIT`` is a
    round trip through the event loop: on a loaded two-core machine each waits
    its turn behind the fan-out, so a commit of one message took 5 to 20 ms on
    SQLite, and a small batch 4 to 10 ms (median) on PostgreSQL, although the
    database and its fsync needed well under one. A batch of room messages is instead run whole,
    transaction included, on one thread of ours: one hop there and one back,
    however many statements. On SQLite: same file, same pragmas, same busy
    timeout, same ``BEGIN IMMEDIATE``. On PostgreSQL: psycopg on the same
    server, with the async engine's timeouts. ``None`` for an in-memory
    database (which a second engine could not see) and for a PostgreSQL URL
    with query options, which are the async driver's and might mean something
    else, or nothing, to psycopg."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        if url.query:
            return None
        return create_engine(
            url.set(drivername="postgresql+psycopg"),
            # The batcher's thread and the catch-up reader's: one connection each.
            pool_size=2,
            max_overflow=0,
            pool_timeout=10,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 5, "options": "-c statement_timeout=30000"},
        )
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    timeout = getattr(engine.sync_engine, "backchannel_busy_timeout", 30.0)
    direct = create_engine(
        url.set(drivername="sqlite+pysqlite"),
        # Each connection is used by one thread (the batcher's writer, or the
        # catch-up reader); disposal may come from another.
        connect_args={"timeout": timeout, "check_same_thread": False},
        poolclass=SingletonThreadPool,
        pool_size=2,
    )
    _sqlite_connection_setup(direct)
    return direct


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database cannot be reached" (not "this write is bad")."""
    if isinstance(exc, RelayError):
        return exc.code == STORAGE_UNAVAILABLE
    if isinstance(exc, sqlite3.OperationalError):
        # Raised as is by the statements run on sqlite3 itself (see appendsql.py):
        # locked, disk I/O error, disk full, cannot open.
        return True
    if isinstance(exc, OSError | ConnectionError | TimeoutError | PoolTimeout):
        return True
    if isinstance(getattr(exc, "orig", exc), psycopg.errors.TransactionRollback):
        return False  # a deadlock or serialization failure: each write is retried alone
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True  # raised as is by the catch-up reader's binary queries (messages._page_pg)
    if isinstance(exc, InterfaceError | OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


STORAGE_UNAVAILABLE = "storage_unavailable"


def storage_unavailable() -> RelayError:
    return RelayError(STORAGE_UNAVAILABLE, 503, "the database is unavailable; retry later")


def busy() -> RelayError:
    return RelayError("busy", 503, "the relay is busy; retry shortly")


def _reason(exc: BaseException) -> str:
    """A word for the log about why writes fail (the driver's message may name paths)."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    for word, reason in (("locked", "locked"), ("busy", "locked"), ("full", "full")):
        if word in text:
            return reason
    if "i/o" in text or isinstance(exc, OSError):
        return "io_error"
    return type(getattr(exc, "orig", None) or exc).__name__


class WriteHealth:
    """Whether writes reach the database, from the outcome of the latest one.

    While they fail, writers do not queue behind the write that is trying (each
    would wait a busy timeout in turn): they are answered ``storage_unavailable``
    at once, and ``/readyz`` says not ready. The next write after that one, or
    the probe ``/readyz`` makes, finds out whether the database is back.
    """

    #: Least time between two probes that ``/readyz`` makes while writes fail.
    PROBE_INTERVAL = 1.0

    def __init__(self) -> None:
        self.failing_since: float | None = None
        self.last_probe = 0.0

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("storage.writes_failing", reason=_reason(exc))

    def succeeded(self) -> None:
        if self.failing_since is not None:
            took = time.monotonic() - self.failing_since
            self.failing_since = None
            log.info("storage.writes_recovered", after_seconds=round(took, 1))

    def probe_due(self) -> bool:
        now = time.monotonic()
        if not self.failing or now - self.last_probe < self.PROBE_INTERVAL:
            return False
        self.last_probe = now
        return True


@dataclass(frozen=True, slots=True)
class Quotas:
    """The storage limits the stores enforce themselves (see the settings of the
    same names)."""

    max_room_bytes: int = 256 * 1024 * 1024
    max_mailbox_per_sender: int = 200
    state_cache_entries: int = 100_000


#: Runs a whole batch's worth of one kind of write at once, as synchronous code
#: on a session (on SQLite on the batcher's own thread, else through
#: ``run_sync``): gets their items in arrival order and returns one outcome per
#: item, a :class:`RelayError` for an item refused. It must refuse items only
#: before writing anything for them, since there is no savepoint to roll back
#: to, and raise only for what should abort the batch (an unexpected database
#: error).
BulkRun = Callable[[Session, list[Any]], list[Any]]


@dataclass(slots=True)
class _Job:
    run: Callable[[AsyncSession], Awaitable[Any]] | None
    future: asyncio.Future[Any]
    bulk: BulkRun | None = None
    item: Any = None


class Batcher:
    """Group commit for small, independent writes.

    Each job runs inside the shared transaction. A job that raises
    :class:`RelayError` (a limit, a bad reference) is answered with that error
    and the batch goes on; an unexpected database error aborts the batch, and
    every job in it is retried alone so that one bad write never fails others.

    Jobs submitted with :meth:`submit_bulk` skip the per-job savepoint: all the
    batch's jobs of one :data:`BulkRun` are handed to it in one call, so a kind
    of write that is most of the traffic (room messages) costs a few statements
    per batch rather than several per job.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        window: float,
        max_jobs: int,
        lock: asyncio.Lock | None = None,
        on_commit: Callable[[int, float], None] | None = None,
        depth: int = 4096,
        health: WriteHealth | None = None,
        direct: sessionmaker[Session] | None = None,
    ) -> None:
        self._sessions = sessions
        #: Batches of bulk writes run whole on this thread (see make_direct_writer).
        self._direct = direct
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="group-commit") if direct is not None else None
        )
        self.health = health or WriteHealth()
        self._committing = False
        self.on_commit = on_commit
        self._window = window
        self._max = max_jobs
        self._lock = lock
        # Bounded: a full queue answers `busy` at once, rather than holding every
        # waiting writer's data in memory behind a slow or stuck disk.
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(depth)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="group-commit")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            # A commit already on the thread finishes (bounded by the busy timeout)
            # before the engine under it is disposed.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RelayError("shutting_down", 503))

    async def submit(self, run: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await self._enqueue(run, None, None)  # type: ignore[no-any-return]

    async def submit_bulk(self, bulk: BulkRun, item: Any) -> Any:
        """Enqueue ``item`` for ``bulk``; its outcome, or the error it was refused with."""
        return await self._enqueue(None, bulk, item)

    async def _enqueue(
        self, run: Callable[[AsyncSession], Awaitable[Any]] | None, bulk: BulkRun | None, item: Any
    ) -> Any:
        if self.health.failing and self._committing:
            # The write in progress finds out whether the database is back; queueing
            # behind it would answer this one a busy timeout late, for nothing.
            raise storage_unavailable()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(run, future, bulk, item))
        except asyncio.QueueFull:
            raise busy() from None
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
            self._committing = True
            try:
                await self._commit(jobs)
            finally:
                self._committing = False
            if self.on_commit is not None:
                self.on_commit(len(jobs), time.monotonic() - started)

    async def _commit(self, jobs: list[_Job]) -> None:
        if self._direct is not None and all(job.bulk is not None for job in jobs):
            await self._commit_direct(jobs)
            return
        results: list[tuple[_Job, bool, Any]] = []
        try:
            async with (
                self._lock if self._lock else contextlib.nullcontext(),
                self._sessions() as session,
                session.begin(),
            ):
                groups: dict[BulkRun, list[_Job]] = {}
                for job in jobs:
                    if job.bulk is not None:
                        groups.setdefault(job.bulk, []).append(job)
                        continue
                    assert job.run is not None
                    try:
                        async with session.begin_nested():
                            results.append((job, True, await job.run(session)))
                    except RelayError as exc:
                        results.append((job, False, exc))
                for bulk, group in groups.items():
                    outcomes = await session.run_sync(bulk, [job.item for job in group])
                    for job, outcome in zip(group, outcomes, strict=True):
                        results.append((job, not isinstance(outcome, RelayError), outcome))
        except Exception as exc:
            await self._failed(jobs, exc)
            return
        self._resolve(results)

    async def _commit_direct(self, jobs: list[_Job]) -> None:
        """A batch of bulk writes only: the transaction runs whole on our thread."""
        assert self._executor is not None
        groups: dict[BulkRun, list[_Job]] = {}
        for job in jobs:
            assert job.bulk is not None
            groups.setdefault(job.bulk, []).append(job)
        loop = asyncio.get_running_loop()
        retried = False
        while True:
            try:
                async with self._lock if self._lock else contextlib.nullcontext():
                    outcomes = await loop.run_in_executor(self._executor, self._run_direct, groups)
                break
            except Exception as exc:
                if not retried and isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    # A pooled connection the server had closed (a restart): once
                    # more on a new one, rather than a ping before every batch. A
                    # batch is safe to run twice: what the first run stored comes
                    # back as stored before.
                    retried = True
                    continue
                await self._failed(jobs, exc)
                return
        results: list[tuple[_Job, bool, Any]] = []
        for group, found in zip(groups.values(), outcomes, strict=True):
            for job, outcome in zip(group, found, strict=True):
                results.append((job, not isinstance(outcome, RelayError), outcome))
        self._resolve(results)

    def _run_direct(self, groups: dict[BulkRun, list[_Job]]) -> list[list[Any]]:
        assert self._direct is not None
        with self._direct() as session, session.begin():
            return [bulk(session, [job.item for job in group]) for bulk, group in groups.items()]

    async def _failed(self, jobs: list[_Job], exc: Exception) -> None:
        """Nothing of ``jobs`` was committed: answer them, or retry each alone."""
        if len(jobs) == 1 or unavailable(exc):
            # Nothing was committed: every caller gets a clear error, nobody hangs.
            if unavailable(exc):
                self.health.failed(exc)
                # What queued behind this write would only wait to fail the same way.
                while not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(storage_unavailable())
            return
        for job in jobs:
            await self._commit([job])

    def _resolve(self, results: list[tuple[_Job, bool, Any]]) -> None:
        self.health.succeeded()
        for job, ok, value in results:
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)


class BaseStore:
    """The engine, sessions and batcher that every concept's store queries through.

    Each concept (rooms, messages, mailboxes, ...) subclasses this, and
    :class:`~backchannel.server.storage.Store` combines them, so they all share
    one engine, one write lock and one batcher.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_window: float,
        batch_max: int,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[int, float], None] | None = None,
        write_queue_depth: int = 4096,
        quotas: Quotas | None = None,
    ) -> None:
        self.engine = engine
        self.quotas = quotas or Quotas()
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
        self.health = WriteHealth()
        self.direct = make_direct_writer(engine)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="catch-up")
        self.batcher = Batcher(
            self.writing,
            batch_window,
            batch_max,
            self._write_lock,
            on_commit=on_commit,
            depth=write_queue_depth,
            health=self.health,
            direct=(
                sessionmaker(
                    # PostgreSQL's direct engine is in autocommit already: each of a
                    # batch's statements is its own transaction (appendsql.PgRows).
                    self.direct.execution_options(
                        **({SQLITE_BEGIN: "IMMEDIATE"} if self.is_sqlite else {})
                    ),
                    expire_on_commit=False,
                )
                if self.direct is not None
                else None
            ),
        )
        self.clock = clock

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A read-write transaction (serialised with other writers on SQLite).

        A database that cannot be reached is :func:`storage_unavailable` (a
        :class:`RelayError`, so it is answered, not logged as a crash)."""
        if self.health.failing and self._write_lock is not None and self._write_lock.locked():
            raise storage_unavailable()  # see WriteHealth: no queue behind a stuck write
        try:
            async with (
                self._write_lock if self._write_lock else contextlib.nullcontext(),
                self.writing() as session,
                session.begin(),
            ):
                yield session
        except Exception as exc:
            if isinstance(exc, RelayError) or not unavailable(exc):
                raise
            self.health.failed(exc)
            raise storage_unavailable() from exc
        self.health.succeeded()

    async def read_direct(self, run: Callable[[Any], T]) -> T:
        """Run ``run`` on the reader thread, one hop however many statements: on
        SQLite with sqlite3 itself, in one read transaction; on PostgreSQL with the
        direct engine's connection (psycopg, autocommit). Errors as :meth:`reading`."""
        assert self.direct is not None
        direct, sqlite = self.direct, self.is_sqlite

        def read() -> T:
            with direct.connect() as conn:
                if not sqlite:
                    return run(conn)
                db = conn.connection.driver_connection
                assert isinstance(db, sqlite3.Connection)
                db.execute("BEGIN")
                try:
                    return run(db)
                finally:
                    db.execute("ROLLBACK")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, read)
        except Exception as exc:
            if isinstance(exc, RelayError) or not unavailable(exc):
                raise
            raise storage_unavailable() from exc

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self.sessions() as session:
                yield session
        except Exception as exc:
            if isinstance(exc, RelayError) or not unavailable(exc):
                raise
            raise storage_unavailable() from exc

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._reader.shutdown)
        if self.direct is not None:
            self.direct.dispose()
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
