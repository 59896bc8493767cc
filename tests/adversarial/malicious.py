"""A malicious relay: the real relay wrapped in an ASGI layer the test controls.

Everything the relay sends to a client — REST responses and WebSocket frames —
passes through :class:`Tamper` hooks first, and everything a client sends
passes through them before the relay sees it. A hook can alter, drop,
duplicate, reorder, reroute or inject. The relay underneath is the real one
(its database, its validation), which is what a compromised server looks like:
honest code with a hostile operator in front of it, or behind it (tests also
edit the relay's database directly).

What a test asserts is what the *client* makes of it: detected, reported to
the user, and never encrypted to or displayed as genuine.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from backchannel.protocol.encoding import decode, encode
from backchannel.server.cli import uvicorn_config
from backchannel.server.config import Settings
from tests.server.helpers import FakeClock, RelayServer

Frame = dict[str, Any]


@dataclass
class Conn:
    """What the wrapper knows about one WebSocket: the member keys it authenticated."""

    keys: set[bytes] = field(default_factory=set)


@dataclass
class HttpExchange:
    method: str
    path: str
    query: str
    signer: bytes | None
    status: int
    body: Any


ServerHook = Callable[[Conn, Frame], list[Frame]]
ClientHook = Callable[[Conn, Frame], list[Frame]]
HttpHook = Callable[[HttpExchange], None]


class Tamper:
    """The test's levers. Each hook defaults to honest pass-through."""

    def __init__(self) -> None:
        self.server_frame: ServerHook | None = None
        self.client_frame: ClientHook | None = None
        self.http: HttpHook | None = None
        self.conns: list[Conn] = []

    def to_client(self, conn: Conn, frame: Frame) -> list[Frame]:
        return [frame] if self.server_frame is None else self.server_frame(conn, frame)

    def to_relay(self, conn: Conn, frame: Frame) -> list[Frame]:
        if frame.get("t") == "auth":
            conn.keys |= {k["key"] for k in frame.get("keys", [])}
        return [frame] if self.client_frame is None else self.client_frame(conn, frame)

    def honest(self) -> None:
        self.server_frame = self.client_frame = self.http = None


class MaliciousApp:
    """ASGI wrapper applying :class:`Tamper` to one relay app."""

    def __init__(self, app: Any, tamper: Tamper) -> None:
        self.app = app
        self.tamper = tamper

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            await self._respond(scope, start, b"".join(chunks), send)

        await self.app(scope, receive, capture)

    async def _respond(
        self, scope: dict[str, Any], start: dict[str, Any], body: bytes, send: Any
    ) -> None:
        headers = dict(scope.get("headers", []))
        signer = headers.get(b"x-bc-key")
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = body
        exchange = HttpExchange(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode(),
            signer=bytes.fromhex(signer.decode()) if signer else None,
            status=start["status"],
            body=parsed,
        )
        if self.tamper.http is not None:
            self.tamper.http(exchange)
        out = json.dumps(exchange.body).encode() if exchange.body is not None else b""
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send(
            {
                "type": "http.response.start",
                "status": exchange.status,
                "headers": [*kept, (b"content-length", str(len(out)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": out})

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        conn = Conn()
        self.tamper.conns.append(conn)
        pending: list[dict[str, Any]] = []

        async def from_client() -> dict[str, Any]:
            while True:
                if pending:
                    return pending.pop(0)
                message = await receive()
                data = message.get("bytes") if message["type"] == "websocket.receive" else None
                if not data:
                    return message  # type: ignore[no-any-return]
                frames = self.tamper.to_relay(conn, decode(data, max_size=1 << 24))  # type: ignore[arg-type]
                pending.extend({"type": "websocket.receive", "bytes": encode(f)} for f in frames)

        async def to_client(message: dict[str, Any]) -> None:
            data = message.get("bytes") if message["type"] == "websocket.send" else None
            if not data:
                await send(message)
                return
            for frame in self.tamper.to_client(conn, decode(data, max_size=1 << 24)):  # type: ignore[arg-type]
                await send({"type": "websocket.send", "bytes": encode(frame)})

        await self.app(scope, from_client, to_client)


class MaliciousRelay(RelayServer):
    """:class:`RelayServer` whose clients talk to it only through :class:`MaliciousApp`."""

    def __init__(self, settings: Settings, tamper: Tamper, clock: FakeClock | None = None) -> None:
        super().__init__(settings, clock)
        self.tamper = tamper
        self.server = uvicorn.Server(uvicorn_config(MaliciousApp(self.app, tamper), self.settings))


def store_unchecked(db: Path, room_id: bytes, sender: bytes, data: bytes) -> int:
    """Play a relay that stores what it should refuse (another sender's envelope, a
    departed member's): the message goes straight into its database, at the next
    sequence number, and is served like any other. Returns that number."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            (last,) = conn.execute("SELECT last_seq FROM rooms WHERE id = ?", (room_id,)).fetchone()
            conn.execute(
                "INSERT INTO room_messages (room_id, seq, sender, client_id, data, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (room_id, last + 1, sender, os.urandom(16), data, int(time.time())),
            )
            conn.execute("UPDATE rooms SET last_seq = ? WHERE id = ?", (last + 1, room_id))
    finally:
        conn.close()
    return int(last) + 1
