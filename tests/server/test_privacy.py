"""What the relay keeps and says: no names, titles, plaintext, addresses, keys or ids."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from backchannel.protocol.encoding import decode
from backchannel.server.storage.models import Base

from .conftest import LOG_STREAM, RelayFactory
from .helpers import TestRoom, WSClient, make_upload, signed_get, upload, wait_until

REDIS_ENV = "BACKCHANNEL_TEST_REDIS_URL"

#: Every column the relay stores. A new one must be reviewed against DESIGN.md §4
#: ("only what routing needs") before it is added here.
EXPECTED_SCHEMA = {
    # state_len: how many events the state checkpoint covers; stored_bytes: the sum of
    # the room's ciphertext sizes, which the data columns show anyway (issue 12 quota).
    "rooms": {
        "id",
        "head",
        "log_len",
        "last_seq",
        "retention_seconds",
        "created_at",
        "state",
        "state_len",
        "stored_bytes",
    },
    "log_events": {"room_id", "pos", "hash", "data"},
    "room_members": {"room_id", "member", "dh", "role", "left_pos"},
    # Invite keys are in the log already; the row only finds a short code's room.
    "room_invites": {"invite", "room_id"},
    "room_messages": {"room_id", "seq", "sender", "client_id", "data", "created_at"},
    "mailbox": {"id", "recipient", "sender", "room_id", "client_id", "data", "created_at"},
    "prekeys": {"member", "kind", "key_id", "data"},
    "prekey_marks": {"member", "kind", "max_id"},
    "creation_tokens": {"token_hash", "created_at"},
    "seen_nonces": {"nonce", "expires_at"},
}
SUSPICIOUS = ("name", "title", "display", "affiliation", "ip", "addr", "host", "email", "text")


def test_schema_has_no_place_for_names_or_plaintext() -> None:
    actual = {t.name: {c.name for c in t.columns} for t in Base.metadata.sorted_tables}
    assert actual == EXPECTED_SCHEMA
    for columns in actual.values():
        for column in columns:
            assert not any(word in column.split("_") for word in SUSPICIOUS), column


def _spellings(blob: bytes) -> list[str]:
    return [
        blob.hex(),
        blob.hex().upper(),
        base64.urlsafe_b64encode(blob).rstrip(b"=").decode(),
        base64.b64encode(blob).rstrip(b"=").decode(),
    ]


async def test_logs_and_database_carry_no_ids_keys_or_addresses(
    relay_factory: RelayFactory, tmp_path: Path, backend: str
) -> None:
    mark = len(LOG_STREAM.getvalue())
    # With Redis available, the fan-out path is covered too: what crosses the channel
    # is captured and checked (route data only, never a payload or a sender).
    redis_url = os.environ.get(REDIS_ENV)
    channel = f"backchannel:test:{os.urandom(8).hex()}"
    notes: list[Any] = []
    listener = None
    if redis_url:
        listener = asyncio.create_task(_listen(redis_url, channel, notes))
        await asyncio.sleep(0.2)
    relay = relay_factory(
        log_level="debug", redis_url=redis_url, redis_channel=channel, catch_up_interval_seconds=0.2
    )
    wait_until(lambda: relay.app.state.fanout.available)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        bob = await room.add_member()
        await upload(http, make_upload(bob, opk=range(1, 3)))
        await signed_get(http, relay, bob, f"/v1/rooms/{room.id.hex()}/events")
        await http.post(f"/v1/rooms/{room.id.hex()}/events", json={"event": "AAAA"})
        a = await WSClient.connect(relay, [room.facilitator])
        b = await WSClient.connect(relay, [bob])
        await b.send_frame("sub", room=room.id, after=0)
        await b.expect("synced")
        payloads = [os.urandom(64) for _ in range(3)]
        for data in payloads:
            await a.send_msg(room.id, room.facilitator, data)
        cid = os.urandom(16)
        await a.send_frame(
            "psend",
            room=room.id,
            from_=room.facilitator.public.sign,
            to=bob.public.sign,
            cid=cid,
            data=payloads[0],
        )
        await a.expect_reply("psent", cid)
        await b.send(b"garbage")
        await b.expect("error")
        await room.remove(bob)
        await b.expect("removed")
        await asyncio.sleep(0.5)  # a few catch-up ticks
        async with httpx.AsyncClient(base_url=relay.admin_url) as operator:
            ops = (await operator.get("/metrics")).text + (await http.get("/readyz")).text
        await a.close()
        await b.close()
    await relay.astop()
    logs = LOG_STREAM.getvalue()[mark:]
    if listener is not None:
        listener.cancel()
        assert {n["k"] for n in notes} == {"m", "e", "p"}
        for note in notes:
            assert set(note) <= {"v", "i", "k", "r", "s", "p", "h", "g", "to"}
            assert room.facilitator.public.sign not in note.values()  # no sender
            assert not any(data in note.values() for data in payloads)
    for secret in [room.id, room.facilitator.public.sign, bob.public.sign]:
        for spelling in _spellings(secret):
            assert spelling not in ops
    assert "127.0.0.1" not in ops
    assert "room.created" in logs
    assert "ws.authenticated" in logs
    secrets = [room.id, room.facilitator.public.sign, bob.public.sign, bob.public.dh]
    for secret in secrets:
        for spelling in _spellings(secret):
            assert spelling not in logs
    assert "127.0.0.1" not in logs
    if backend == "sqlite":
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*"))
        assert b"127.0.0.1" not in raw


async def _listen(url: str, channel: str, notes: list[Any]) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    notes.append(decode(message["data"], max_size=4096))
    finally:
        await client.aclose()


async def test_the_database_and_its_directory_are_private(tmp_path: Path) -> None:
    """Any local user could read the room logs and who-talks-to-whom from a 0644
    relay.db (issue 12): the directory is made 0700 and the files 0600."""
    import stat

    from sqlalchemy import text

    from backchannel.server.storage import make_engine

    data = tmp_path / "fresh"
    engine = make_engine(f"sqlite+aiosqlite:///{data}/relay.db")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            await conn.execute(text("INSERT INTO t VALUES (1)"))
        files = [p for p in data.iterdir() if p.name.startswith("relay.db")]
        assert {p.name for p in files} >= {"relay.db", "relay.db-wal"}
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    finally:
        await engine.dispose()
