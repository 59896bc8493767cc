"""Quotas and budgets on storage (issue 12, points 5 and 6): bytes per room, rooms per
address, the mailbox split per sender, prekey claims per claimer, log appends per room;
and the validated-state cache that makes an append cost the same at any log length."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
from alembic import command
from sqlalchemy import select, text

from backchannel.protocol import roomlog
from backchannel.protocol.keys import MemberKeyPair
from backchannel.server.migrate import alembic_config, head_revision, upgrade
from backchannel.server.storage import make_engine
from backchannel.server.storage.models import Room

from .conftest import RelayFactory
from .helpers import (
    FakeClock,
    RelayServer,
    TestRoom,
    WSClient,
    b64e,
    make_upload,
    now,
    signed_post,
    upload,
)
from .test_mailbox import psend


async def room_row(relay: RelayServer, room: bytes) -> Room:
    async def read() -> Room:
        async with relay.store.reading() as session:
            return (await session.execute(select(Room).where(Room.id == room))).scalar_one()

    return relay.call(read())  # type: ignore[no-any-return]


async def test_room_storage_quota(relay_factory: RelayFactory) -> None:
    clock = FakeClock()
    relay = relay_factory(clock, max_room_bytes=4096, rate_burst=100)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http, retention=roomlog.MIN_RETENTION)
        other = await TestRoom.create(http)
    client = await WSClient.connect(relay, [room.facilitator, other.facilitator])
    sent = [await client.send_msg(room.id, room.facilitator, os.urandom(1000)) for _ in range(4)]
    assert [s["t"] for s in sent] == ["sent"] * 4
    full = await client.send_msg(room.id, room.facilitator, os.urandom(1000))
    assert (full["t"], full["code"]) == ("error", "quota_exceeded")
    # What fits still goes in; a retried message is answered as before, not counted again.
    assert (await client.send_msg(room.id, room.facilitator, b"x" * 96))["t"] == "sent"
    cid = os.urandom(16)
    first = await client.send_msg(other.id, other.facilitator, b"y" * 1000, cid=cid)
    again = await client.send_msg(other.id, other.facilitator, b"y" * 1000, cid=cid)
    assert first["seq"] == again["seq"]
    assert (await room_row(relay, other.id)).stored_bytes == 1000
    assert (await room_row(relay, room.id)).stored_bytes == 4096
    # Retention deletes the old messages and gives their bytes back.
    clock.advance(roomlog.MIN_RETENTION + 120)
    relay.call(relay.store.purge())
    assert (await room_row(relay, room.id)).stored_bytes == 0
    assert (await room_row(relay, other.id)).stored_bytes == 1000
    assert (await client.send_msg(room.id, room.facilitator, os.urandom(1000)))["t"] == "sent"
    await client.close()


async def create(http: httpx.AsyncClient, key: MemberKeyPair | None = None) -> httpx.Response:
    data = roomlog.make_create(
        key or MemberKeyPair.generate(), roomlog.Rules(retention=86_400), now()
    )
    return await http.post("/v1/rooms", json={"event": b64e(data)})


async def test_rooms_per_address(relay_factory: RelayFactory) -> None:
    relay = relay_factory(rooms_per_address="3/minute")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        # Refused creations spend nothing.
        for _ in range(5):
            r = await http.post("/v1/rooms", json={"event": b64e(os.urandom(200))})
            assert r.status_code == 400, r.text
        key = MemberKeyPair.generate()
        data = roomlog.make_create(key, roomlog.Rules(retention=86_400), now())
        assert (await http.post("/v1/rooms", json={"event": b64e(data)})).status_code == 201
        # A retry of the same creation is answered 200 and is not a new room.
        assert (await http.post("/v1/rooms", json={"event": b64e(data)})).status_code == 200
        assert [(await create(http)).status_code for _ in range(2)] == [201, 201]
        r = await create(http)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limited"


async def test_rooms_per_address_is_for_the_open_policy(relay_factory: RelayFactory) -> None:
    relay = relay_factory(creation_policy="token", rooms_per_address="1/minute")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        for _ in range(3):
            token = relay.call(relay.store.create_token())
            await TestRoom.create(http, token=token)


async def test_log_appends_per_room(relay_factory: RelayFactory) -> None:
    relay = relay_factory(rate_log_appends="5/minute")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room, other = await TestRoom.create(http), await TestRoom.create(http)
        # Refused events (a stranger cannot sign one) spend none of the room's budget.
        for _ in range(10):
            data, _ = roomlog.make_invite(
                room.facilitator, room.state, "participant", now() + 3600, 1, now()
            )
            forged = data[:-1] + bytes([data[-1] ^ 1])
            assert (await room.post(forged)).status_code == 403
        for _ in range(5):
            await room.invite()
        data, _ = roomlog.make_invite(
            room.facilitator, room.state, "participant", now() + 3600, 1, now()
        )
        r = await room.post(data)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limited"
        await other.invite()  # the budget is per room


async def test_mailbox_share_per_sender(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_mailbox_depth=10, max_mailbox_per_sender=3)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        alice, bob, carol = room.facilitator, await room.add_member(), await room.add_member()
    client = await WSClient.connect(relay, [alice, carol])
    for i in range(3):
        ok = await psend(client, room.id, alice.public.sign, bob.public.sign, b"%d" % i)
        assert ok["t"] == "psent"
    full = await psend(client, room.id, alice.public.sign, bob.public.sign, b"more")
    assert (full["t"], full["code"]) == ("error", "mailbox_full")
    # Another co-member's pairwise message (a sender-key distribution, say) gets through.
    assert (await psend(client, room.id, carol.public.sign, bob.public.sign, b"sk"))["t"] == (
        "psent"
    )
    await client.close()


async def test_prekey_claims_per_claimer(relay_factory: RelayFactory) -> None:
    relay = relay_factory(rate_prekey_claims="3/minute", rate_prekey_claims_per_target="2/minute")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        claimer, bob, carol = room.facilitator, await room.add_member(), await room.add_member()
        for member in (bob, carol):
            r = await upload(http, make_upload(member, opk=range(1, 10), kem=range(1, 10)))
            assert r.status_code == 200, r.text

        async def claim(target: MemberKeyPair) -> int:
            path = f"/v1/prekeys/{target.public.sign.hex()}/claim"
            r = await signed_post(http, relay, claimer, path)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limited"
            return r.status_code

        assert [await claim(bob), await claim(bob), await claim(bob)] == [200, 200, 429]
        assert await claim(carol) == 200
        assert await claim(carol) == 429  # the claimer's own budget (3) is spent


# --- the validated-state cache and its checkpoints ---------------------------------------


async def test_appends_survive_stale_and_empty_caches(relay_factory: RelayFactory) -> None:
    """Two relays on one database (as instances do): each validates against the
    database's head whatever its own cache holds, and a new one rebuilds the head
    state from the checkpoint and the events after it."""
    a = relay_factory()
    b = relay_factory()
    async with (
        httpx.AsyncClient(base_url=a.url) as http_a,
        httpx.AsyncClient(base_url=b.url) as http_b,
    ):
        room = await TestRoom.create(http_a)
        await room.invite()  # cached in a
        room.http = http_b
        for _ in range(3):
            await room.invite()  # b: a's cached head is three events behind
        room.http = http_a
        member = await room.add_member()  # a catches up from its stale state
        # An event built on an older head is refused by both, whatever they cached.
        old, _ = roomlog.make_invite(
            room.facilitator, room.log.state_at(2), "participant", now() + 3600, 1, now()
        )
        for http in (http_a, http_b):
            r = await http.post(f"/v1/rooms/{room.id.hex()}/events", json={"event": b64e(old)})
            assert r.status_code == 409, r.text
        room.http = http_b
        await room.remove(member)
        c = relay_factory(room_state_cache_entries=0)  # no cache at all
        async with httpx.AsyncClient(base_url=c.url) as http_c:
            room.http = http_c
            for _ in range(3):
                await room.invite()
    assert c.call(c.store.room_state(room.id)) == room.state


async def test_checkpoint_is_taken_off_the_append_path(relay_factory: RelayFactory) -> None:
    relay = relay_factory(rate_log_appends="1000/minute")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        for _ in range(10):
            await room.invite()
        row = await room_row(relay, room.id)
        assert (row.log_len, row.state_len) == (11, 1)  # not re-encoded on every append
        for _ in range(30):
            await room.invite()
    for _ in range(100):
        row = await room_row(relay, room.id)
        if row.state_len > 1:
            break
        await asyncio.sleep(0.05)
    assert 32 <= row.state_len <= row.log_len == 41
    checkpoint = roomlog.RoomState.from_bytes(row.state)
    assert checkpoint == room.log.state_at(checkpoint.pos)
    assert relay.call(relay.store.room_state(room.id)) == room.state


async def test_migration_counts_bytes_and_downgrade_restores_head_state(
    database_url: str, relay_factory: RelayFactory
) -> None:
    engine = make_engine(database_url)
    try:
        await upgrade(engine, "0002")
    finally:
        await engine.dispose()
    relay = relay_factory(auto_migrate=True, rate_log_appends="1000/minute")
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        for _ in range(40):
            await room.invite()
    client = await WSClient.connect(relay, [room.facilitator])
    for size in (100, 250):
        assert (await client.send_msg(room.id, room.facilitator, os.urandom(size)))["t"] == "sent"
    await client.close()
    await relay.astop()

    def downgrade(conn: Any, target: str) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, target)

    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE rooms SET state_len = 1"))  # an old checkpoint
            await conn.run_sync(downgrade, "0002")
        async with engine.connect() as conn:
            state = (await conn.execute(text("SELECT state FROM rooms"))).scalar_one()
        assert roomlog.RoomState.from_bytes(bytes(state)) == room.state
        await upgrade(engine)
        async with engine.connect() as conn:
            row = (
                await conn.execute(text("SELECT state_len, log_len, stored_bytes FROM rooms"))
            ).one()
        assert tuple(row) == (41, 41, 350)
        async with engine.connect() as conn:
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).one()
        assert version[0] == head_revision()
    finally:
        await engine.dispose()
