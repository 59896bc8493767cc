"""Issue #6 §2.4: many idle and slow connections, within the configured limits, do not
stop another client from being served promptly.

Against a real relay (uvicorn on 127.0.0.1) with room for them in its limits:

* raw TCP connections that never send a byte, or send half an HTTP upgrade request and
  stall (slowloris), or half a REST request body;
* WebSocket connections that complete the handshake and never authenticate;
* authenticated connections subscribed to the busy room that never read (their TCP
  buffers fill; the relay must drop them as ``too_slow`` instead of waiting for them).

Meanwhile a well-behaved client authenticates, sends 100 room messages and another one
receives them all: every step within a tight bound, and ``/healthz`` keeps answering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from backchannel.server.config import Settings
from tests.server.helpers import RelayServer, TestRoom, WSClient

from .procs import SOAK

RAW = 400 if SOAK else 120
UNAUTHENTICATED = 200 if SOAK else 60
NON_READERS = 100 if SOAK else 30
MESSAGES = 100
PAD = bytes(16_000)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(
            data_dir=tmp_path,
            database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db",
            max_connections_per_address=2 * (RAW + UNAUTHENTICATED + NON_READERS),
            auth_timeout_seconds=120,
            max_unsettled_per_address=2 * (RAW + UNAUTHENTICATED + NON_READERS),
            setup_window_seconds=120,
            send_queue_depth=64,
            rate_messages_per_second=1000,
            rate_burst=1000,
            key_burst=1000,
            frame_burst=1000,
            max_inflight_writes=1000,
            frame_rate_per_second=1000,
            key_messages_per_second=1000,
        )
    ).start()
    yield server
    server.stop()
    assert server.app.state.internal_errors == 0


async def timed(what: str, coro: Any, bound: float) -> Any:
    start = time.monotonic()
    result = await asyncio.wait_for(coro, bound * 4)
    took = time.monotonic() - start
    assert took < bound, f"{what} took {took:.2f}s (bound {bound}s)"
    return result


async def test_idle_and_slow_connections_do_not_starve_others(relay: RelayServer) -> None:
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        room = await TestRoom.create(http)
        ann = await room.add_member()
        bob = await room.add_member()

    hold: list[Any] = []
    try:
        # Raw TCP: silent, half a WebSocket upgrade, half a REST body.
        for i in range(RAW):
            _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            if i % 3 == 1:
                writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs")
            elif i % 3 == 2:
                writer.write(
                    b"POST /v1/rooms HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"ev'
                )
            await writer.drain()
            hold.append(writer)
        # WebSockets that never authenticate.
        for _ in range(UNAUTHENTICATED):
            hold.append(await websockets.connect(relay.ws_url, max_size=None))
        # Authenticated subscribers of the busy room that never read.
        for _ in range(NON_READERS):
            slow = await WSClient.connect(relay, [bob], max_queue=1)
            await slow.send_frame("sub", room=room.id, after=0)
            hold.append(slow.ws)

        # A well-behaved pair is served promptly all the same.
        health = await timed("healthz", httpx.AsyncClient(base_url=relay.url).get("/healthz"), 1.0)
        assert health.status_code == 200
        sender = await timed("connect+auth", WSClient.connect(relay, [room.facilitator]), 1.0)
        receiver = await timed("connect+auth", WSClient.connect(relay, [ann]), 1.0)
        await receiver.send_frame("sub", room=room.id, after=0)
        await timed("sub", receiver.expect("synced", room=room.id), 1.0)
        worst = 0.0
        for i in range(MESSAGES):
            start = time.monotonic()
            # 16 KB each: enough to fill the non-readers' socket buffers and outboxes.
            sent = await sender.send_msg(room.id, room.facilitator, b"m%03d" % i + PAD)
            assert sent["t"] == "sent", sent
            worst = max(worst, time.monotonic() - start)
        assert worst < 1.0, f"slowest send took {worst:.2f}s"
        got = [
            await timed("msg", receiver.expect("msg", room=room.id), 2.0) for _ in range(MESSAGES)
        ]
        assert [m["data"] for m in got] == [b"m%03d" % i + PAD for i in range(MESSAGES)]
        await sender.send_frame("ping")
        await timed("ping", sender.expect("pong"), 1.0)
        await sender.close()
        await receiver.close()
    finally:
        for item in hold:
            try:
                if isinstance(item, asyncio.StreamWriter):
                    item.close()
                else:
                    item.transport.abort()  # a close handshake would wait on the stuck ones
            except Exception:
                pass
