"""Helpers for scale-out tests: readiness polling, collecting messages, a TCP proxy
that can take PostgreSQL away from a relay and give it back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

from tests.server.helpers import RelayServer, WSClient


async def readyz(relay: RelayServer) -> httpx.Response:
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        return await http.get("/readyz")


async def wait_ready(relay: RelayServer, ready: bool = True, timeout: float = 15) -> dict[str, Any]:
    """Poll /readyz until it answers 200 (``ready``) or 503; returns the body."""
    deadline = time.monotonic() + timeout
    while True:
        r = await readyz(relay)
        if (r.status_code == 200) == ready:
            assert r.status_code in (200, 503)
            return r.json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"/readyz stayed {r.status_code}: {r.text}"
        await asyncio.sleep(0.05)


async def collect(
    client: WSClient, room: bytes, count: int, timeout: float = 10
) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(count):
        msg = await client.expect("msg", timeout=timeout, room=room)
        out.append((msg["seq"], msg["data"]))
    return out


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to a target; ``down()`` refuses and cuts every
    connection (as if the database host vanished), ``up()`` listens again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}
