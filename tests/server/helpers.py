"""Reusable pieces for relay tests (and later client, e2e and adversarial tests).

- :class:`RelayServer`: a real uvicorn serving ``create_app(settings)`` on
  127.0.0.1 in a background thread with its own event loop;
- :class:`WSClient`: a ``websockets`` client that answers the challenge and
  keeps frames it was not asked for, so tests can wait for one kind;
- :func:`signed_headers`: headers for a signed REST request;
- :class:`TestRoom`: a room built with ``protocol.roomlog.make_*`` and
  appended through the REST API, tracking its own validated :class:`RoomLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
import websockets

from backchannel.client.relay import signed_request_headers
from backchannel.protocol import relayauth, roomlog
from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.keys import (
    MemberKeyPair,
    PreKeyUpload,
    generate_kem_prekey,
    generate_x25519_prekey,
)
from backchannel.server.admin import create_admin_app
from backchannel.server.app import create_app
from backchannel.server.cli import admin_uvicorn_config, bind, serve_together, uvicorn_config
from backchannel.server.config import Settings
from backchannel.server.rest.auth import b64d, b64e

POSTGRES_ENV = "BACKCHANNEL_TEST_POSTGRES_URL"


class FakeClock:
    """Wall clock plus an adjustable offset, shared by the relay and the test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class RelayServer:
    """``create_app(settings)`` under a real uvicorn on 127.0.0.1 (in a thread)."""

    def __init__(
        self, settings: Settings, clock: FakeClock | None = None, *, port: int = 0
    ) -> None:
        # ``port``: a relay restarted where its clients know it (its origin is in
        # every signature they make).
        self.sock = bind("127.0.0.1", port)
        self.port = self.sock.getsockname()[1]
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        self.clock = clock or FakeClock()
        self.app = create_app(self.settings, clock=self.clock)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.settings))
        # The operator listener (/metrics, /openapi.json), as `serve` runs it.
        self.admin_sock = bind("127.0.0.1", 0)
        self.admin_port = self.admin_sock.getsockname()[1]
        self.admin = uvicorn.Server(admin_uvicorn_config(create_admin_app(self.app), self.settings))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        servers = [(self.server, self.sock), (self.admin, self.admin_sock)]
        # SystemExit is uvicorn's answer to a failed start-up (the lifespan raised).
        with contextlib.suppress(SystemExit):
            self.loop.run_until_complete(serve_together(servers))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def origin(self) -> str:
        return self.settings.origin()

    @property
    def store(self) -> Any:
        return self.app.state.store

    @property
    def hub(self) -> Any:
        return self.app.state.hub

    def start(self) -> RelayServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not (self.server.started and self.admin.started):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("relay did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.admin.should_exit = True
        self.thread.join(15)
        self.sock.close()
        self.admin_sock.close()

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run ``coro`` on the relay's own loop (for direct store access)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


# --- signed REST requests ------------------------------------------------------------------------


def signed_headers(
    signer: MemberKeyPair | bytes,
    origin: str,
    method: str,
    path: str,
    body: bytes = b"",
    **kwargs: Any,
) -> dict[str, str]:
    """Headers signed by a member key pair, or by a bare invite seed (bytes)."""
    seed = signer.sign_seed if isinstance(signer, MemberKeyPair) else signer
    return signed_request_headers(seed, origin, method, path, body, **kwargs)


async def signed_get(
    http: httpx.AsyncClient, relay: RelayServer, signer: MemberKeyPair | bytes, path: str
) -> httpx.Response:
    return await http.get(path, headers=signed_headers(signer, relay.origin, "GET", path))


async def signed_post(
    http: httpx.AsyncClient,
    relay: RelayServer,
    signer: MemberKeyPair | bytes,
    path: str,
    body: bytes = b"",
) -> httpx.Response:
    headers = signed_headers(signer, relay.origin, "POST", path, body)
    headers["content-type"] = "application/json"
    return await http.post(path, content=body, headers=headers)


# --- WebSocket client ----------------------------------------------------------------------------


def frame(t: str, **fields: Any) -> bytes:
    """Encode a client frame; ``from_`` is spelled ``from`` on the wire."""
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    return encode({"v": 1, "t": t, **fields})


def auth_frame(keys: list[MemberKeyPair], origin: str, nonce: bytes) -> bytes:
    items = [
        {"key": k.public.sign, "sig": relayauth.sign_challenge(k.sign_seed, origin, nonce)}
        for k in keys
    ]
    return frame("auth", keys=items)


@dataclass
class WSClient:
    ws: Any
    origin: str
    nonce: bytes = b""
    stash: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def connect(
        cls, relay: RelayServer, keys: list[MemberKeyPair] | None = None, **kwargs: Any
    ) -> WSClient:
        kwargs.setdefault("max_queue", 4096)
        ws = await websockets.connect(relay.ws_url, max_size=None, **kwargs)
        client = cls(ws, relay.origin)
        challenge = await client.expect("challenge")
        client.nonce = challenge["nonce"]
        assert challenge["origin"] == relay.origin
        if keys:
            await client.auth(keys)
        return client

    async def auth(self, keys: list[MemberKeyPair]) -> dict[str, Any]:
        await self.send(auth_frame(keys, self.origin, self.nonce))
        ready = await self.expect("ready")
        self.nonce = (await self.expect("challenge"))["nonce"]
        return ready

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def send_frame(self, t: str, **fields: Any) -> None:
        await self.ws.send(frame(t, **fields))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        if self.stash:
            return self.stash.pop(0)
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, bytes), "the relay sends binary frames only"
        value = decode(raw, max_size=1 << 24)
        assert isinstance(value, dict)
        assert value["v"] == 1
        return value

    async def expect(self, t: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The first frame of type ``t`` (matching ``match``); others are stashed."""

        def fits(f: dict[str, Any]) -> bool:
            return f["t"] == t and all(f.get(k) == v for k, v in match.items())

        for i, f in enumerate(self.stash):
            if fits(f):
                return self.stash.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {t!r} frame; stashed: {[f['t'] for f in self.stash]}")
            f = await self._read(remaining)
            if fits(f):
                return f
            self.stash.append(f)

    async def nothing(self, t: str, wait: float = 0.3) -> None:
        """Assert that no frame of type ``t`` arrives within ``wait`` seconds."""
        with contextlib_suppress_timeout():
            f = await self.expect(t, timeout=wait)
            raise AssertionError(f"unexpected {t!r} frame: {f}")

    async def send_msg(
        self, room: bytes, sender: MemberKeyPair, data: bytes, cid: bytes | None = None
    ) -> dict[str, Any]:
        cid = cid or os.urandom(16)
        await self.send_frame("send", room=room, from_=sender.public.sign, cid=cid, data=data)
        return await self.expect_reply("sent", cid)

    async def expect_reply(self, t: str, cid: bytes, timeout: float = 5.0) -> dict[str, Any]:
        """The ``t`` answer for ``cid``, or the error frame that refers to it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.stash):
                if (f["t"] == t and f.get("cid") == cid) or (
                    f["t"] == "error" and f.get("ref") == cid
                ):
                    return self.stash.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer for {cid.hex()}")
            self.stash.append(await self._read(remaining))

    async def close(self) -> None:
        await self.ws.close()


class contextlib_suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *_: Any) -> bool:
        return kind is not None and issubclass(kind, TimeoutError)


# --- rooms ---------------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class TestRoom:
    """A room made with the protocol builders and appended through the relay."""

    __test__ = False  # not a pytest class

    def __init__(self, http: httpx.AsyncClient, facilitator: MemberKeyPair) -> None:
        self.http = http
        self.facilitator = facilitator
        self.log = roomlog.RoomLog()
        self.members: dict[bytes, MemberKeyPair] = {facilitator.public.sign: facilitator}

    @classmethod
    async def create(
        cls,
        http: httpx.AsyncClient,
        *,
        retention: int = 86_400,
        token: str | None = None,
        ts: int | None = None,
    ) -> TestRoom:
        room = cls(http, MemberKeyPair.generate())
        data = roomlog.make_create(
            room.facilitator, roomlog.Rules(retention=retention), now() if ts is None else ts
        )
        body: dict[str, Any] = {"event": b64e(data)}
        if token is not None:
            body["token"] = token
        r = await http.post("/v1/rooms", json=body)
        assert r.status_code == 201, r.text
        room.log.append(data)
        assert r.json()["room_id"] == room.id.hex()
        return room

    @property
    def id(self) -> bytes:
        return self.log.room_id

    @property
    def state(self) -> roomlog.RoomState:
        return self.log.state

    async def post(self, data: bytes) -> httpx.Response:
        r = await self.http.post(f"/v1/rooms/{self.id.hex()}/events", json={"event": b64e(data)})
        if r.status_code == 201:
            self.log.append(data)
        return r

    async def append(self, data: bytes) -> dict[str, Any]:
        r = await self.post(data)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def invite(
        self,
        role: roomlog.Role = "participant",
        *,
        uses: int = 1,
        expires: int | None = None,
        by: MemberKeyPair | None = None,
        ts: int | None = None,
    ) -> bytes:
        data, seed = roomlog.make_invite(
            by or self.facilitator,
            self.state,
            role,
            expires or now() + 3600,
            uses,
            now() if ts is None else ts,
        )
        await self.append(data)
        return seed

    async def join(self, seed: bytes, member: MemberKeyPair | None = None) -> MemberKeyPair:
        member = member or MemberKeyPair.generate()
        await self.append(roomlog.make_join(member, seed, self.state, now()))
        self.members[member.public.sign] = member
        return member

    async def add_member(self, role: roomlog.Role = "participant") -> MemberKeyPair:
        return await self.join(await self.invite(role))

    async def remove(self, member: MemberKeyPair) -> dict[str, Any]:
        return await self.append(
            roomlog.make_remove(self.facilitator, self.state, member.public, now())
        )

    async def leave(self, member: MemberKeyPair) -> dict[str, Any]:
        return await self.append(roomlog.make_leave(member, self.state, now()))


# --- prekeys -------------------------------------------------------------------------------------


def make_upload(
    member: MemberKeyPair,
    *,
    spk: int | None = 1,
    kem_lr: int | None = 1,
    opk: range = range(0),
    kem: range = range(0),
) -> bytes:
    ts = now()
    prekeys = []
    if spk is not None:
        prekeys.append(generate_x25519_prekey(member, "spk", spk, ts)[0])
    if kem_lr is not None:
        prekeys.append(generate_kem_prekey(member, "kem-lr", kem_lr, ts)[0])
    prekeys += [generate_x25519_prekey(member, "opk", i, ts)[0] for i in opk]
    prekeys += [generate_kem_prekey(member, "kem", i, ts)[0] for i in kem]
    return PreKeyUpload(member=member.public, prekeys=prekeys).to_bytes()


async def upload(http: httpx.AsyncClient, data: bytes) -> httpx.Response:
    return await http.put("/v1/prekeys", json={"upload": b64e(data)})


__all__ = [
    "POSTGRES_ENV",
    "FakeClock",
    "RelayServer",
    "TestRoom",
    "WSClient",
    "auth_frame",
    "b64d",
    "b64e",
    "frame",
    "make_upload",
    "now",
    "signed_get",
    "signed_headers",
    "signed_post",
    "upload",
]


async def closed_with(
    recv: Callable[[], Awaitable[Any]], limit: int = 1000
) -> websockets.ConnectionClosed:
    """Read until the connection closes; returns the close exception."""
    for _ in range(limit):
        try:
            await recv()
        except websockets.ConnectionClosed as exc:
            return exc
    raise AssertionError("the connection stayed open")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)
