"""Room messages: order, catch-up by cursor, idempotent resend, roles, removal."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from backchannel.protocol import roomlog

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, WSClient, now


async def collect(client: WSClient, room: bytes, count: int, timeout: float = 10) -> list[int]:
    seqs = []
    for _ in range(count):
        msg = await client.expect("msg", timeout=timeout, room=room)
        seqs.append(msg["seq"])
    return seqs


async def test_live_order_and_catch_up_after_reconnect(relay_factory: RelayFactory) -> None:
    # 41 sends in well under a second: above the default burst on a fast machine,
    # and the send rate is not what this test is about.
    relay = relay_factory(rate_burst=100, key_burst=100)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        alice, bob = room.facilitator, await room.add_member()
        a = await WSClient.connect(relay, [alice])
        b = await WSClient.connect(relay, [bob])
        await b.send_frame("sub", room=room.id, after=0)
        assert (await b.expect("synced", room=room.id))["seq"] == 0

        # Many concurrent sends: every subscriber sees 1..N in order, no gaps.
        payloads = {os.urandom(16): os.urandom(40) for _ in range(30)}
        for cid, data in payloads.items():
            await a.send_frame("send", room=room.id, from_=alice.public.sign, cid=cid, data=data)
        acks = [await a.expect_reply("sent", cid) for cid in payloads]
        assert sorted(ack["seq"] for ack in acks) == list(range(1, 31))
        assert await collect(b, room.id, 30) == list(range(1, 31))

        # Bob drops off at cursor 30; more arrive; he reconnects with the cursor.
        await b.close()
        for i in range(10):
            await a.send_msg(room.id, alice, f"later {i}".encode())
        b = await WSClient.connect(relay, [bob])
        await b.send_frame("sub", room=room.id, after=30)
        seqs = await collect(b, room.id, 10)
        assert seqs == list(range(31, 41))
        assert (await b.expect("synced", room=room.id))["seq"] == 40
        # ...then live, with no duplicates.
        assert (await a.send_msg(room.id, alice, b"live"))["t"] == "sent"
        assert await collect(b, room.id, 1) == [41]
        await b.nothing("msg")
        await a.close()
        await b.close()


async def test_catch_up_pages_and_payloads(relay_factory: RelayFactory) -> None:
    relay = relay_factory(catch_up_page=3)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    a = await WSClient.connect(relay, [room.facilitator])
    sent = {}
    for i in range(10):
        data = os.urandom(20 + i)
        sent[(await a.send_msg(room.id, room.facilitator, data))["seq"]] = data
    await a.send_frame("sub", room=room.id, after=2)
    got = {}
    for _ in range(8):
        msg = await a.expect("msg")
        got[msg["seq"]] = msg["data"]
        assert msg["ts"] % 60 == 0
        assert abs(msg["ts"] - now()) < 120
    assert list(got) == list(range(3, 11))
    assert got == {s: d for s, d in sent.items() if s > 2}
    await a.close()


async def test_idempotent_resend_same_seq(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    a = await WSClient.connect(relay, [room.facilitator])
    cid = os.urandom(16)
    first = await a.send_msg(room.id, room.facilitator, b"x", cid)
    await a.send_msg(room.id, room.facilitator, b"y")
    again = await a.send_msg(room.id, room.facilitator, b"x", cid)
    assert first["seq"] == again["seq"] == 1
    # On a new connection too, and concurrently.
    b = await WSClient.connect(relay, [room.facilitator])
    cid2 = os.urandom(16)
    for _ in range(3):
        await b.send_frame(
            "send", room=room.id, from_=room.facilitator.public.sign, cid=cid2, data=b"z"
        )
    seqs = {(await b.expect_reply("sent", cid2))["seq"] for _ in range(3)}
    assert seqs == {3}
    await b.send_frame("sub", room=room.id, after=0)
    assert await collect(b, room.id, 3) == [1, 2, 3]
    await b.nothing("msg")
    await a.close()
    await b.close()


async def test_observer_and_non_member_cannot_send(
    http: httpx.AsyncClient, relay: RelayServer
) -> None:
    room = await TestRoom.create(http)
    observer = await room.add_member("observer")
    stranger_room = await TestRoom.create(http)
    c = await WSClient.connect(relay, [observer, stranger_room.facilitator])
    err = await c.send_msg(room.id, observer, b"hi")
    assert err["t"] == "error"
    assert err["code"] == "not_authorized"
    err = await c.send_msg(room.id, stranger_room.facilitator, b"hi")
    assert err["t"] == "error"
    assert err["code"] == "not_authorized"
    # An observer may read.
    await c.send_frame("sub", room=room.id, after=0)
    await c.expect("synced", room=room.id)
    # Sending as a key this connection did not authenticate.
    other = await room.add_member()
    err = await c.send_msg(room.id, other, b"hi")
    assert err["code"] == "not_authenticated"
    # Subscribing to a room where no key here is a member.
    fresh = await TestRoom.create(http)
    await c.send_frame("sub", room=fresh.id, after=0)
    assert (await c.expect("error"))["code"] == "not_authorized"
    await c.close()


async def test_removed_member_subscription_stops(
    http: httpx.AsyncClient, relay: RelayServer
) -> None:
    room = await TestRoom.create(http)
    alice = room.facilitator
    bob, carol = await room.add_member(), await room.add_member()
    a = await WSClient.connect(relay, [alice])
    b = await WSClient.connect(relay, [bob])
    c = await WSClient.connect(relay, [carol])
    for client in (b, c):
        await client.send_frame("sub", room=room.id, after=0)
        await client.expect("synced")
    await a.send_msg(room.id, alice, b"before")
    assert await collect(b, room.id, 1) == [1]
    removal = await room.remove(bob)
    removed = await b.expect("removed")
    assert removed["room"] == room.id
    assert (await c.expect("event"))["pos"] == removal["pos"]
    await a.send_msg(room.id, alice, b"after")
    assert await collect(c, room.id, 2) == [1, 2]
    await b.nothing("msg", wait=0.5)
    # Bob can neither send nor subscribe again.
    err = await b.send_msg(room.id, bob, b"still here?")
    assert err["code"] == "not_authorized"
    await b.send_frame("sub", room=room.id, after=0)
    assert (await b.expect("error"))["code"] == "not_authorized"
    # Leaving works the same way.
    await room.leave(carol)
    await c.expect("removed")
    for client in (a, b, c):
        await client.close()


async def test_log_event_notifications(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    a = await WSClient.connect(relay, [room.facilitator])
    await a.send_frame("sub", room=room.id, after=0)
    await a.expect("synced")
    appended = await room.append(
        roomlog.make_set_rules(room.facilitator, room.state, roomlog.Rules(retention=120), now())
    )
    ev = await a.expect("event")
    assert ev["pos"] == appended["pos"]
    assert ev["head"].hex() == appended["head"]
    # set_rules updated the room's retention.
    from backchannel.server.storage.models import Room

    async def retention() -> int:
        async with relay.store.reading() as s:
            return int((await s.get(Room, room.id)).retention_seconds)

    assert relay.call(retention()) == 120
    await a.send_frame("unsub", room=room.id)
    await room.invite()
    await a.nothing("event")
    await a.close()


async def test_gap_repair_from_database(http: httpx.AsyncClient, relay: RelayServer) -> None:
    """A live notification that skips ahead is repaired from the database."""
    room = await TestRoom.create(http)
    a = await WSClient.connect(relay, [room.facilitator])
    await a.send_frame("sub", room=room.id, after=0)
    await a.expect("synced")
    store = relay.store
    # Store two messages without notifying the hub (as if a wake-up was lost).
    for i in range(2):
        relay.call(
            store.append_room_message(
                room.id, room.facilitator.public.sign, os.urandom(16), b"%d" % i
            )
        )
    await a.nothing("msg", wait=0.2)
    await a.send_msg(room.id, room.facilitator, b"third")
    assert await collect(a, room.id, 3) == [1, 2, 3]
    await a.close()


@pytest.mark.parametrize("n_subscribers", [5])
async def test_fan_out_many_subscribers(
    http: httpx.AsyncClient, relay: RelayServer, n_subscribers: int
) -> None:
    room = await TestRoom.create(http)
    members = [await room.add_member() for _ in range(n_subscribers)]
    clients = [await WSClient.connect(relay, [m]) for m in members]
    for c in clients:
        await c.send_frame("sub", room=room.id, after=0)
        await c.expect("synced")
    sender = await WSClient.connect(relay, [room.facilitator])
    for i in range(20):
        await sender.send_frame(
            "send",
            room=room.id,
            from_=room.facilitator.public.sign,
            cid=os.urandom(16),
            data=b"m%d" % i,
        )
    results = await asyncio.gather(*(collect(c, room.id, 20) for c in clients))
    assert all(r == list(range(1, 21)) for r in results)
    for c in [*clients, sender]:
        await c.close()
