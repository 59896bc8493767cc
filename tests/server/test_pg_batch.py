"""On PostgreSQL a batch of room messages is one statement on the batcher's own
psycopg connection (issue 14): one round trip to the server, one transaction.
These tests count the statements the relay really runs, and kill the connection
under it the way a server restart does.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from sqlalchemy import event, text

from backchannel.server.errors import RelayError
from backchannel.server.storage import Store
from backchannel.server.storage.appendsql import PG_JUDGE

from .conftest import BACKENDS
from .test_batch_append import make_room


@pytest.fixture(params=BACKENDS[1:])
def backend(request: pytest.FixtureRequest) -> str:
    """PostgreSQL only (skipped, with the reason, where it is not set)."""
    return str(request.param)


def _statements(store: Store) -> list[str]:
    assert store.direct is not None, "PostgreSQL without query options gets a direct writer"
    seen: list[str] = []

    @event.listens_for(store.direct, "before_cursor_execute")
    def _record(_c: Any, _cur: Any, sql: str, _params: Any, _ctx: Any, _many: bool) -> None:
        seen.append(sql)

    return seen


async def test_a_mixed_batch_is_one_statement(store: Store) -> None:
    sender, observer, stranger = os.urandom(32), os.urandom(32), os.urandom(32)
    room = await make_room(store, {sender: ("participant", None), observer: ("observer", None)})
    other = await make_room(store, {sender: ("facilitator", None)})
    first, _ = await store.append_room_message(room, sender, b"c" * 16, b"first")
    seen = _statements(store)
    results = await asyncio.gather(
        store.append_room_message(room, sender, os.urandom(16), b"new"),
        store.append_room_message(other, sender, os.urandom(16), b"elsewhere"),
        store.append_room_message(room, sender, b"c" * 16, b"first"),  # a retry
        store.append_room_message(room, observer, os.urandom(16), b"no"),
        store.append_room_message(room, stranger, os.urandom(16), b"no"),
        store.append_room_message(room, sender, b"d" * 16, b"twice"),
        store.append_room_message(room, sender, b"d" * 16, b"twice"),
        return_exceptions=True,
    )
    assert seen == [PG_JUDGE], seen
    new, elsewhere, retry, by_observer, by_stranger, once, copy = results
    assert new == (type(first)(first.seq + 1, b"new", first.ts), True)
    assert elsewhere[0].seq == 1
    assert elsewhere[1] is True
    assert retry == (type(first)(first.seq, b"", first.ts), False)
    assert isinstance(by_observer, RelayError)
    assert by_observer.detail == "observers cannot post"
    assert isinstance(by_stranger, RelayError)
    assert by_stranger.code == "not_authorized"
    assert once[0].seq == first.seq + 2
    assert once[1] is True
    assert copy == (type(first)(first.seq + 2, b"", once[0].ts), False)
    stored = await store.room_messages_after(room, 0, 10)
    assert [(m.seq, m.data) for m in stored] == [(1, b"first"), (2, b"new"), (3, b"twice")]


async def test_a_room_near_its_quota_takes_what_fits_in_order(store: Store) -> None:
    sender = os.urandom(32)
    room = await make_room(store, {sender: ("participant", None)})
    store.quotas = type(store.quotas)(max_room_bytes=100)
    results = await asyncio.gather(
        store.append_room_message(room, sender, os.urandom(16), b"a" * 60),
        store.append_room_message(room, sender, os.urandom(16), b"b" * 60),
        store.append_room_message(room, sender, os.urandom(16), b"c" * 30),
        return_exceptions=True,
    )
    assert results[0][0].seq == 1
    assert isinstance(results[1], RelayError)
    assert results[1].code == "quota_exceeded"
    assert results[2][0].seq == 2
    stored = await store.room_messages_after(room, 0, 10)
    assert [m.data[:1] for m in stored] == [b"a", b"c"]


async def test_a_connection_the_server_closed_costs_no_message(store: Store) -> None:
    sender = os.urandom(32)
    room = await make_room(store, {sender: ("participant", None)})
    await store.append_room_message(room, sender, os.urandom(16), b"warm")  # pool has one
    # What a server restart does to the pooled connection, with no ping to find out.
    async with store.engine.connect() as conn:
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                "AND application_name = '' AND backend_type = 'client backend' "
                "AND query LIKE '%%WITH k AS%%'"
            )
        )
    msg, fresh = await store.append_room_message(room, sender, os.urandom(16), b"after")
    assert fresh
    assert msg.seq == 2
    assert not store.health.failing
