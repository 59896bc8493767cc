"""Retention: ciphertext older than the room's period is purged, on a timer and on demand."""

from __future__ import annotations

import asyncio
import os

import httpx

from backchannel.protocol import roomlog

from .conftest import RelayFactory
from .helpers import FakeClock, TestRoom, WSClient, now


async def test_purge_by_room_retention(relay_factory: RelayFactory) -> None:
    clock = FakeClock()
    relay = relay_factory(clock=clock)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        short = await TestRoom.create(http, retention=60)
        long = await TestRoom.create(http, retention=86_400)
        bob = await short.add_member()
    a = await WSClient.connect(relay, [short.facilitator, long.facilitator])
    for room in (short, long):
        for i in range(3):
            await a.send_msg(room.id, room.facilitator, b"%d" % i)
    cid = os.urandom(16)
    await a.send_frame(
        "psend",
        room=short.id,
        from_=short.facilitator.public.sign,
        to=bob.public.sign,
        cid=cid,
        data=b"pairwise",
    )
    await a.expect_reply("psent", cid)

    assert relay.call(relay.store.purge()) == {"room_messages": 0, "mailbox_items": 0, "nonces": 0}
    clock.advance(200)
    counts = relay.call(relay.store.purge())
    assert counts["room_messages"] == 3
    assert counts["mailbox_items"] == 1

    # The short room's history is gone; sequence numbers go on (never reused).
    await a.send_frame("sub", room=short.id, after=0)
    assert (await a.expect("synced", room=short.id))["seq"] == 0
    assert (await a.send_msg(short.id, short.facilitator, b"new"))["seq"] == 4
    assert (await a.expect("msg", room=short.id))["seq"] == 4
    # The long room keeps everything.
    await a.send_frame("sub", room=long.id, after=0)
    assert [(await a.expect("msg", room=long.id))["seq"] for _ in range(3)] == [1, 2, 3]
    b = await WSClient.connect(relay, [bob])
    await b.nothing("pmsg")
    await a.close()
    await b.close()


async def test_background_purge_and_set_rules(relay_factory: RelayFactory) -> None:
    clock = FakeClock()
    relay = relay_factory(clock=clock, purge_interval_seconds=0.1)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http, retention=86_400)
        a = await WSClient.connect(relay, [room.facilitator])
        await a.send_msg(room.id, room.facilitator, b"kept for a day")
        clock.advance(120)
        await asyncio.sleep(0.3)
        assert relay.call(relay.store.stats())["room_messages"] == 1
        # The facilitator shortens the retention: the next purge applies it.
        await room.append(
            roomlog.make_set_rules(room.facilitator, room.state, roomlog.Rules(retention=60), now())
        )
        for _ in range(50):
            if relay.call(relay.store.stats())["room_messages"] == 0:
                break
            await asyncio.sleep(0.1)
        assert relay.call(relay.store.stats())["room_messages"] == 0
    await a.close()


async def test_expired_nonces_are_purged(relay_factory: RelayFactory) -> None:
    clock = FakeClock()
    relay = relay_factory(clock=clock, clock_skew_seconds=60)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        from .helpers import signed_get

        room = await TestRoom.create(http)
        r = await signed_get(http, relay, room.facilitator, f"/v1/rooms/{room.id.hex()}/events")
        assert r.status_code == 200
    clock.advance(120)
    assert relay.call(relay.store.purge())["nonces"] == 1
