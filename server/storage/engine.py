"""The database engines and the base every store builds on.

SQLAlchemy 2 async over SQLite (WAL, synchronous=FULL) or PostgreSQL.

Writes on the hot path (room messages, mailbox puts and acks) go through a
group-commit :class:`~.batcher.Batcher`: callers enqueue and await; one task commits
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

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import SingletonThreadPool

from ..errors import RelayError
from ..logging import get_logger
from .batcher import Batcher
from .health import WriteHealth, storage_unavailable, unavailable

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


@dataclass(frozen=True, slots=True)
class Quotas:
    """The storage limits the stores enforce themselves (see the settings of the
    same names)."""

    max_room_bytes: int = 256 * 1024 * 1024
    max_mailbox_per_sender: int = 200
    state_cache_entries: int = 100_000


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
