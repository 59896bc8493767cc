"""Frames written straight to the WebSocket protocol (issue 14): offered only to the
relay's own app, and delivering exactly what the ASGI path delivered, in order,
whether a frame goes out at once from the publisher, in a batch from a busy
writer, or waits behind a reader that stopped reading."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx

from backchannel.server.app import create_app
from backchannel.server.cli import uvicorn_config
from backchannel.server.config import Settings

from .conftest import RelayFactory
from .helpers import TestRoom, WSClient

COUNT = 1200
SIZE = 4096


def test_the_wire_is_offered_to_the_relay_app_only(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path)
    own = uvicorn_config(create_app(settings), settings)
    assert own.ws.offer_wire is True  # type: ignore[union-attr]

    async def wrapper(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        raise AssertionError("not run")

    # Something between uvicorn and the relay that reads the ASGI messages would
    # not see frames written around them.
    assert uvicorn_config(wrapper, settings).ws.offer_wire is False  # type: ignore[union-attr]


async def test_every_write_path_keeps_order_and_bytes(relay_factory: RelayFactory) -> None:
    # Room for a reader that stops for a while: its frames wait in its outbox.
    relay = relay_factory(
        max_pending_bytes=64 * 1024 * 1024,
        send_queue_depth=100_000,
        # One sender flat out, as fast as the test can go.
        rate_messages_per_second=100_000,
        rate_burst=100_000,
        key_messages_per_second=100_000,
        key_burst=100_000,
        frame_rate_per_second=100_000,
        frame_burst=100_000,
        max_inflight_writes=100_000,
        member_cpu_share=1.0,
    )
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        room = await TestRoom.create(http)
        fast_member, slow_member = await room.add_member(), await room.add_member()
    # A small client-side queue: the slow reader's socket fills, the relay's
    # transport pauses, and what follows goes the queued, batched way.
    fast = await WSClient.connect(relay, [fast_member])
    slow = await WSClient.connect(relay, [slow_member], max_queue=4)
    for client in (fast, slow):
        await client.send_frame("sub", room=room.id, after=0)
        await client.expect("synced", room=room.id)
    sender = await WSClient.connect(relay, [room.facilitator])
    sent = [os.urandom(SIZE) for _ in range(COUNT)]

    async def send_all() -> None:
        for i, data in enumerate(sent):
            await sender.send_frame(
                "send",
                room=room.id,
                from_=room.facilitator.public.sign,
                cid=i.to_bytes(16, "big"),
                data=data,
            )
            if i % 50 == 49:
                await asyncio.sleep(0)  # bursts and gaps: idle writers and busy ones

    async def read_all(client: WSClient, pause: float) -> list[tuple[int, bytes]]:
        await asyncio.sleep(pause)
        got = []
        while len(got) < COUNT:
            msg = await client.expect("msg", timeout=30, room=room.id)
            got.append((msg["seq"], msg["data"]))
        return got

    _, fast_got, slow_got = await asyncio.gather(
        send_all(), read_all(fast, 0.0), read_all(slow, 1.5)
    )
    expected = list(enumerate(sent, start=1))
    assert fast_got == expected
    assert slow_got == expected
    await fast.nothing("msg", wait=0.2)
    for client in (fast, slow, sender):
        await client.ws.close()


async def test_an_idle_connection_keeps_no_writer_no_outbox_and_no_handshake(
    relay_factory: RelayFactory,
) -> None:
    """What an idle connection holds (bench: RSS per idle connection): its reader
    task and little else. Writers and outboxes exist while something waits to be
    written, and the handshake's request and headers are let go once answered."""
    # 41 sends in well under a second: over the default burst of 40.
    relay = relay_factory(rate_burst=100, key_burst=100)
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        room = await TestRoom.create(http)
        member = await room.add_member()
    reader = await WSClient.connect(relay, [member])
    await reader.send_frame("sub", room=room.id, after=0)
    await reader.expect("synced", room=room.id)
    sender = await WSClient.connect(relay, [room.facilitator])
    for i in range(40):
        await sender.send_msg(room.id, room.facilitator, b"%d" % i)
    for _ in range(40):
        await reader.expect("msg", room=room.id)

    conns = list(relay.app.state.connections)
    assert len(conns) == 2
    for _ in range(200):
        # A send's task may still be finishing (publishing) just after its `sent`.
        if all(c.writer is None and c.outbox is None and not c.tasks for c in conns):
            break
        await asyncio.sleep(0.01)
    for conn in conns:
        assert conn.writer is None, "a writer task outlived its outbox"
        assert conn.outbox is None
        assert conn.space is None
        assert conn.tasks is None or not conn.tasks
        assert conn.wire is not None
        assert conn.wire.request is None
        assert conn.wire.response is None
        assert conn.ws.scope["headers"] == []
        assert not hasattr(conn, "__dict__"), "Connection lost its __slots__"

    # Still a working connection: what comes next is delivered, in order.
    assert (await sender.send_msg(room.id, room.facilitator, b"after"))["t"] == "sent"
    msg = await reader.expect("msg", room=room.id)
    assert msg["seq"] == 41
    for client in (reader, sender):
        await client.ws.close()
