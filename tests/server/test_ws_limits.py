"""Every WebSocket limit gives its typed error; malformed frames never crash anything."""

from __future__ import annotations

import asyncio
import os
import socket

import cbor2
import httpx
import pytest
import websockets

from backchannel.protocol.keys import MemberKeyPair

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, WSClient, closed_with, frame


async def still_works(client: WSClient) -> None:
    await client.send_frame("ping")
    await client.expect("pong")


async def test_malformed_frames_get_errors(relay: RelayServer) -> None:
    key = MemberKeyPair.generate()
    client = await WSClient.connect(relay, [key])
    bystander = await WSClient.connect(relay, [MemberKeyPair.generate()])
    cases: list[tuple[bytes, str]] = [
        (b"\xff\xfe garbage", "malformed"),
        (b"", "malformed"),
        (cbor2.dumps([1, 2, 3]), "malformed"),
        (cbor2.dumps({"v": 1}), "malformed"),
        (frame("fly"), "malformed"),
        (cbor2.dumps({"v": 2, "t": "ping"}, canonical=True), "unsupported_version"),
        (cbor2.dumps({"v": "1", "t": "ping"}, canonical=True), "malformed"),
        (frame("ping", extra=1), "malformed"),
        (frame("sub", room="not bytes", after=0), "malformed"),
        (frame("sub", room=bytes(31), after=0), "malformed"),
        (frame("sub", room=bytes(32)), "malformed"),
        (frame("sub", room=bytes(32), after=-1), "malformed"),
        (frame("ack", ids=["x"]), "malformed"),
        (frame("auth", keys=[]), "malformed"),
        (cbor2.dumps({"v": 1, "t": "ping"}), "malformed"),  # not canonical key order
        (frame("ping") + b"\x00", "malformed"),  # trailing bytes
        (cbor2.dumps({"v": 1, "t": "ping", "x": 1.5}, canonical=True), "malformed"),
    ]
    for data, code in cases:
        await client.send(data)
        err = await client.expect("error")
        assert err["code"] == code, (data, err)
    await still_works(client)
    await still_works(bystander)
    await client.close()
    await bystander.close()


async def test_frame_too_large(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_frame_bytes=1024, max_message_bytes=512)
    key = MemberKeyPair.generate()
    other = await WSClient.connect(relay, [key])
    client = await WSClient.connect(relay, [key])
    await client.send_frame(
        "send", room=bytes(32), from_=key.public.sign, cid=bytes(16), data=bytes(1500)
    )
    assert (await client.expect("error"))["code"] == "frame_too_large"
    with pytest.raises(websockets.ConnectionClosed) as info:
        await client.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1009
    # Far over the limit: the WebSocket layer itself refuses it (1009 too).
    client = await WSClient.connect(relay, [key])
    await client.send(bytes(10_000))
    with pytest.raises(websockets.ConnectionClosed) as info:
        await client.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1009
    await still_works(other)
    await other.close()


async def test_message_too_large(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_frame_bytes=2048, max_message_bytes=512)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        bob = await room.add_member()
    client = await WSClient.connect(relay, [room.facilitator])
    err = await client.send_msg(room.id, room.facilitator, bytes(513))
    assert err["t"] == "error"
    assert err["code"] == "message_too_large"
    cid = os.urandom(16)
    await client.send_frame(
        "psend",
        room=room.id,
        from_=room.facilitator.public.sign,
        to=bob.public.sign,
        cid=cid,
        data=bytes(600),
    )
    assert (await client.expect_reply("psent", cid))["code"] == "message_too_large"
    ok = await client.send_msg(room.id, room.facilitator, bytes(512))
    assert ok["t"] == "sent"
    await client.close()


async def test_subscription_limit(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_subscriptions=2)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        rooms = [await TestRoom.create(http) for _ in range(3)]
    client = await WSClient.connect(relay, [r.facilitator for r in rooms])
    for room in rooms[:2]:
        await client.send_frame("sub", room=room.id, after=0)
        await client.expect("synced", room=room.id)
    await client.send_frame("sub", room=rooms[2].id, after=0)
    assert (await client.expect("error"))["code"] == "too_many_subscriptions"
    # Re-subscribing to a room already held is not a new subscription.
    await client.send_frame("sub", room=rooms[0].id, after=0)
    await client.expect("synced", room=rooms[0].id)
    await client.send_frame("unsub", room=rooms[1].id)
    await client.send_frame("sub", room=rooms[2].id, after=0)
    await client.expect("synced", room=rooms[2].id)
    # Delivery in the subscribed rooms is unaffected.
    await client.send_msg(rooms[2].id, rooms[2].facilitator, b"x")
    assert (await client.expect("msg", room=rooms[2].id))["seq"] == 1
    await client.close()


async def test_rate_limit(relay_factory: RelayFactory) -> None:
    relay = relay_factory(rate_messages_per_second=1.0, rate_burst=3)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    fast = await WSClient.connect(relay, [room.facilitator])
    calm = await WSClient.connect(relay, [room.facilitator])
    answers = [await fast.send_msg(room.id, room.facilitator, b"%d" % i) for i in range(5)]
    assert [a["t"] for a in answers[:3]] == ["sent"] * 3
    assert [a.get("code") for a in answers[3:]] == ["rate_limited"] * 2
    await still_works(fast)  # not closed
    assert (await calm.send_msg(room.id, room.facilitator, b"calm"))["seq"] == 4
    await asyncio.sleep(1.1)
    assert (await fast.send_msg(room.id, room.facilitator, b"later"))["t"] == "sent"
    await fast.close()
    await calm.close()


async def test_slow_consumer_is_dropped_alone(relay_factory: RelayFactory) -> None:
    relay = relay_factory(
        # A commit publishes up to batch_max messages at once: the depth must exceed it,
        # with room for a busy machine (the fast reader shares this process's CPU); the
        # slow one still overflows: 100 frames > depth + what the socket buffers hold.
        send_queue_depth=40,
        batch_max=4,
        rate_burst=1000,
        key_burst=1000,
        frame_burst=1000,
        max_inflight_writes=1000,
        frame_rate_per_second=1000,
        key_messages_per_second=1000,
        rate_messages_per_second=1000.0,
        max_message_bytes=128 * 1024,
    )
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        slow_key, fast_key = await room.add_member(), await room.add_member()
    # A client that reads nothing, with tiny socket buffers so they fill at once.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.port))
    slow = await WSClient.connect(relay, [slow_key], max_queue=1, sock=sock)
    fast = await WSClient.connect(relay, [fast_key])
    for client in (slow, fast):
        await client.send_frame("sub", room=room.id, after=0)
        await client.expect("synced")
    sender = await WSClient.connect(relay, [room.facilitator])
    n = 100
    blob = os.urandom(120 * 1024)
    for i in range(n):
        await sender.send_frame(
            "send",
            room=room.id,
            from_=room.facilitator.public.sign,
            cid=os.urandom(16),
            data=blob[:-1] + bytes([i]),
        )
    for _ in range(n):
        frame_ = await fast.expect("msg", timeout=20)
    assert frame_["seq"] == n
    # The slow one was cut off (after whatever the socket buffers held).
    subs = relay.hub.rooms.get(room.id, set())
    assert len(subs) == 1
    await closed_with(lambda: slow.recv(timeout=10))
    await still_works(sender)
    await fast.close()
    await sender.close()
