"""Two relay instances on 127.0.0.1 sharing PostgreSQL and Redis (DESIGN.md §4, issue #5 §2).

What a client on one instance sends reaches a client on the other in order and
without gaps; a restarted instance loses nothing acknowledged; a Redis restart or
a lost notification is repaired from the database by cursor.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx

from backchannel.protocol.keys import MemberKeyPair
from tests.server.conftest import LOG_STREAM
from tests.server.helpers import RelayServer, TestRoom, WSClient, frame

from .conftest import Cluster, PrivateRedis
from .helpers import collect, wait_ready


async def send_many(
    client: WSClient, room: bytes, sender: MemberKeyPair, count: int, tag: bytes
) -> dict[int, bytes]:
    """Send ``count`` messages without waiting in between; returns ``seq -> data`` as acked."""
    sent = {}
    for i in range(count):
        cid = os.urandom(16)
        sent[cid] = tag + b" %d " % i + os.urandom(24)
        await client.send(
            frame("send", room=room, from_=sender.public.sign, cid=cid, data=sent[cid])
        )
    acked = {}
    for cid, data in sent.items():
        ack = await client.expect_reply("sent", cid)
        assert ack["t"] == "sent", ack
        acked[ack["seq"]] = data
    return acked


async def room_on(relay: RelayServer, members: int) -> tuple[TestRoom, list[MemberKeyPair]]:
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        people = [await room.add_member() for _ in range(members)]
    return room, people


async def subscribed(relay: RelayServer, key: MemberKeyPair, room: bytes, after: int = 0) -> Any:
    client = await WSClient.connect(relay, [key])
    await client.send_frame("sub", room=room, after=after)
    await client.expect("synced", room=room)
    return client


async def test_cross_instance_delivery_in_order(cluster: Cluster) -> None:
    a, b = cluster(), cluster()
    room, (bob, carol, dave) = await room_on(a, 3)
    bob_a = await subscribed(a, bob, room.id)
    carol_b = await WSClient.connect(b, [carol])
    dave_a = await WSClient.connect(a, [dave])

    # Concurrent senders on both instances, one receiver on A.
    acked_b, acked_a = await asyncio.gather(
        send_many(carol_b, room.id, carol, 40, b"carol"),
        send_many(dave_a, room.id, dave, 40, b"dave"),
    )
    acked = {**acked_a, **acked_b}
    assert sorted(acked) == list(range(1, 81)), "sequence numbers are unique and gap-free"
    got = await collect(bob_a, room.id, 80)
    assert [seq for seq, _ in got] == list(range(1, 81)), "in order, no gaps"
    assert dict(got) == acked
    await bob_a.nothing("msg", wait=0.3)

    # Pairwise: carol on B -> bob on A.
    cid = os.urandom(16)
    await carol_b.send_frame(
        "psend", room=room.id, from_=carol.public.sign, to=bob.public.sign, cid=cid, data=b"hi"
    )
    assert (await carol_b.expect_reply("psent", cid))["t"] == "psent"
    pmsg = await bob_a.expect("pmsg")
    assert (pmsg["from"], pmsg["data"]) == (carol.public.sign, b"hi")

    # A log event appended through B reaches A's subscribers; a removal through B ends
    # the removed member's subscription on A at once.
    async with httpx.AsyncClient(base_url=b.url) as http_b:
        room.http = http_b
        dave_a_sub = await subscribed(a, dave, room.id, after=80)
        removal = await room.remove(bob)
    assert (await bob_a.expect("removed"))["room"] == room.id
    assert (await dave_a_sub.expect("event"))["pos"] == removal["pos"]
    await send_many(carol_b, room.id, carol, 1, b"after")
    assert [s for s, _ in await collect(dave_a_sub, room.id, 1)] == [81]
    await bob_a.nothing("msg", wait=0.3)
    for client in (bob_a, carol_b, dave_a, dave_a_sub):
        await client.close()


async def test_instance_restart_loses_nothing_acknowledged(cluster: Cluster) -> None:
    a, b = cluster(), cluster()
    room, (bob, carol) = await room_on(a, 2)
    bob_a = await subscribed(a, bob, room.id)
    carol_b = await WSClient.connect(b, [carol])
    acked = await send_many(carol_b, room.id, carol, 25, b"before")

    await b.astop()  # instance B goes away mid-conversation
    b2 = cluster()  # a new instance on the same database
    carol_b2 = await WSClient.connect(b2, [carol])
    acked |= await send_many(carol_b2, room.id, carol, 25, b"after")
    assert sorted(acked) == list(range(1, 51))
    got = await collect(bob_a, room.id, 50)
    assert [s for s, _ in got] == list(range(1, 51))
    assert dict(got) == acked
    # The new instance serves the whole history too.
    fresh = await WSClient.connect(b2, [bob])
    await fresh.send_frame("sub", room=room.id, after=0)
    assert dict(await collect(fresh, room.id, 50)) == acked
    for client in (bob_a, carol_b2, fresh):
        await client.close()


async def test_redis_restart_resumes_without_skipping(
    cluster: Cluster, private_redis: PrivateRedis
) -> None:
    a = cluster(redis_url=private_redis.url)
    b = cluster(redis_url=private_redis.url)
    room, (bob, carol) = await room_on(a, 2)
    bob_a = await subscribed(a, bob, room.id)
    carol_b = await WSClient.connect(b, [carol])
    acked = await send_many(carol_b, room.id, carol, 10, b"one")
    assert [s for s, _ in await collect(bob_a, room.id, 10)] == list(range(1, 11))

    mark = len(LOG_STREAM.getvalue())
    private_redis.kill()
    for relay in (a, b):
        body = await wait_ready(relay, ready=False)
        assert body["checks"]["fanout"] == "down"
        assert body["checks"]["database"] == "ok"
        assert "redis://" not in str(body)
    # A new send is refused clearly (not stored, not lost, not hanging).
    cid = os.urandom(16)
    started = time.monotonic()
    await carol_b.send_frame(
        "send", room=room.id, from_=carol.public.sign, cid=cid, data=b"while down"
    )
    err = await carol_b.expect_reply("sent", cid)
    assert (err["t"], err["code"]) == ("error", "fanout_unavailable")
    assert time.monotonic() - started < 2
    # A message committed on B whose notification could not go out (as when Redis dies
    # between commit and publish): it must still reach bob on A after Redis returns.
    late, _ = b.call(
        b.store.append_room_message(room.id, carol.public.sign, os.urandom(16), b"late")
    )
    assert late.seq == 11

    private_redis.start()  # same port, empty Redis
    for relay in (a, b):
        await wait_ready(relay, ready=True)
    got = await collect(bob_a, room.id, 1)
    assert got == [(11, b"late")]
    acked = await send_many(carol_b, room.id, carol, 10, b"two")
    assert sorted(acked) == list(range(12, 22))
    got = await collect(bob_a, room.id, 10)
    assert [s for s, _ in got] == list(range(12, 22))
    assert dict(got) == acked
    await bob_a.nothing("msg", wait=0.3)
    for client in (bob_a, carol_b):
        await client.close()
    # The outage was logged (by error type), without the Redis address or any id.
    logs = LOG_STREAM.getvalue()[mark:]
    assert "fanout.disconnected" in logs
    assert "fanout.subscribed" in logs
    for leak in (
        "127.0.0.1",
        str(private_redis.port),
        "redis://",
        room.id.hex(),
        carol.public.sign.hex(),
    ):
        assert leak not in logs


def drop_first(relay: RelayServer, kind: str) -> list[dict[str, Any]]:
    """Suppress the next Redis notification of ``kind`` that ``relay`` publishes."""
    dropped: list[dict[str, Any]] = []

    def keep(note: dict[str, Any]) -> bool:
        if note["k"] == kind and not dropped:
            dropped.append(note)
            return False
        return True

    relay.app.state.fanout.publish_filter = keep
    return dropped


async def test_lost_notification_repaired_by_next_one(cluster: Cluster) -> None:
    a, b = cluster(), cluster()
    room, (bob, carol) = await room_on(a, 2)
    bob_a = await subscribed(a, bob, room.id)
    carol_b = await WSClient.connect(b, [carol])
    dropped = drop_first(b, "m")
    first = await send_many(carol_b, room.id, carol, 1, b"lost wake-up")
    assert dropped
    assert dropped[0]["r"] == room.id
    await bob_a.nothing("msg", wait=0.5)  # the catch-up tick is 30 s away here
    second = await send_many(carol_b, room.id, carol, 1, b"next")
    got = await collect(bob_a, room.id, 2)
    assert got == sorted({**first, **second}.items())
    for client in (bob_a, carol_b):
        await client.close()


async def test_lost_notifications_repaired_by_catch_up_tick(cluster: Cluster) -> None:
    """The room goes quiet after a lost wake-up: the periodic tick still delivers."""
    a = cluster(catch_up_interval_seconds=0.5)
    b = cluster()
    room, (bob, carol) = await room_on(a, 2)
    bob_a = await subscribed(a, bob, room.id)
    carol_b = await WSClient.connect(b, [carol])
    drop_first(b, "m")
    sent = await send_many(carol_b, room.id, carol, 1, b"quiet")
    started = time.monotonic()
    assert await collect(bob_a, room.id, 1, timeout=5) == sorted(sent.items())
    assert time.monotonic() - started < 3

    drop_first(b, "p")  # a pairwise wake-up lost too
    cid = os.urandom(16)
    await carol_b.send_frame(
        "psend", room=room.id, from_=carol.public.sign, to=bob.public.sign, cid=cid, data=b"pw"
    )
    await carol_b.expect_reply("psent", cid)
    assert (await bob_a.expect("pmsg", timeout=5))["data"] == b"pw"

    drop_first(b, "e")  # and a removal's
    async with httpx.AsyncClient(base_url=b.url) as http_b:
        room.http = http_b
        await room.remove(bob)
    assert (await bob_a.expect("removed", timeout=5))["room"] == room.id
    for client in (bob_a, carol_b):
        await client.close()
