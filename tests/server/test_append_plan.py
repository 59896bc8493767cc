"""A batch of room messages costs the same however many are stored (issue 12's O(1)
appends, kept under issue 14's batching): every statement it runs finds its rows
through an index, never by reading the messages or members table whole.

The statements are the ones the relay really ran for a batch (captured from the
driver), asked back of the database with EXPLAIN. On PostgreSQL sequential scans
are switched off for the question, so a plan that still has one means no index
could serve it. SQLite answers ``(a, b, c) IN (VALUES …)``, which SQLAlchemy
renders for a tuple ``IN``, by scanning the table: 45 ms a batch at 200,000
messages, growing with every message stored.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from typing import Any

from sqlalchemy import event, insert

from backchannel.server.storage import Store
from backchannel.server.storage.models import RoomMessage

from .test_batch_append import make_room

STORED = 3000
TABLES = ("room_messages", "room_members")


def _capture(store: Store) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []
    if store.direct is not None and store.is_sqlite:
        # The batcher's own thread runs plain SQL on sqlite3: its trace hook gives
        # each statement as run, values in place.
        @event.listens_for(store.direct, "connect")
        def _trace(dbapi: sqlite3.Connection, _record: Any) -> None:
            dbapi.set_trace_callback(lambda sql: seen.append((sql, None)))

    else:
        # PostgreSQL: the batcher's thread runs psycopg through its own engine.
        engine = store.direct if store.direct is not None else store.engine.sync_engine

        @event.listens_for(engine, "before_cursor_execute")
        def _record(_c: Any, _cur: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
            if not many:
                seen.append((sql, params))

    return seen


async def _plans(store: Store, statements: list[tuple[str, Any]]) -> list[str]:
    plans = []
    if store.is_sqlite:
        async with store.engine.connect() as conn:
            for sql, _ in statements:
                rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)
                plans.append("\n".join(str(r[-1]) for r in rows))
        return plans
    if store.direct is not None:
        direct = store.direct

        def explain() -> list[str]:
            # EXPLAIN without ANALYZE runs nothing, not even the data-modifying CTEs.
            with direct.connect() as conn:
                conn.exec_driver_sql("SET enable_seqscan = off")
                return [
                    "\n".join(str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
                    for sql, params in statements
                ]

        return await asyncio.to_thread(explain)
    async with store.engine.connect() as conn:
        await conn.exec_driver_sql("SET enable_seqscan = off")
        for sql, params in statements:
            rows = await conn.exec_driver_sql("EXPLAIN " + sql, params)
            plans.append("\n".join(str(r[0]) for r in rows))
    return plans


def _full_scans(plan: str) -> list[str]:
    found = []
    for table in TABLES:
        # SQLite: "SCAN room_messages" (or "SCAN m" for an alias of it);
        # PostgreSQL: "Seq Scan on room_messages".
        if re.search(rf"\bSCAN {table}\b|Seq Scan on {table}\b", plan):
            found.append(table)
    if re.search(r"\bSCAN m\b", plan):
        found.append("an aliased table")
    return found


async def test_a_batch_reads_by_index_only(store: Store) -> None:
    sender, observer = os.urandom(32), os.urandom(32)
    room = await make_room(store, {sender: ("participant", None), observer: ("observer", None)})
    async with store.transaction() as session:
        await session.execute(
            insert(RoomMessage),
            [
                {
                    "room_id": room,
                    "seq": 10_000 + i,
                    "sender": sender,
                    "client_id": os.urandom(16),
                    "data": b"x" * 64,
                    "created_at": 0,
                }
                for i in range(STORED)
            ],
        )
    first = await store.append_room_message(room, sender, b"c" * 16, b"first")
    seen = _capture(store)
    if store.direct is not None and store.is_sqlite:
        store.direct.dispose()  # the next batch connects again, with the trace hook
    # One batch: a new message, a retry of an old one, and an observer's refused one.
    results = await asyncio.gather(
        store.append_room_message(room, sender, os.urandom(16), b"new"),
        store.append_room_message(room, sender, b"c" * 16, b"first"),
        store.append_room_message(room, observer, os.urandom(16), b"no"),
        return_exceptions=True,
    )
    assert results[1] == (first[0].__class__(first[0].seq, b"", first[0].ts), False)
    lookups = [
        (sql, params)
        for sql, params in seen
        if re.match(r"\s*(SELECT|UPDATE|WITH)\b", sql, re.I) and any(t in sql for t in TABLES)
    ]
    touched = " ".join(sql for sql, _ in lookups)
    assert "room_messages" in touched, seen
    assert "room_members" in touched, seen
    for (sql, _), plan in zip(lookups, await _plans(store, lookups), strict=True):
        assert not _full_scans(plan), f"{sql}\n--- plan ---\n{plan}"
