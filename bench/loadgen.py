"""Load-generating worker processes for ``bench/run.py``.

A worker is a separate process (so the load does not share the relay's core
scheduling) running one asyncio loop with many WebSocket connections
("seats"). The orchestrator drives it over a pipe: the worker opens and
authenticates its seats, answers ``ready``, then runs commands (``run``,
``catchup``) until ``stop`` or until the pipe closes. Every loop is bounded in
count and in time.

The same code drives the relay (``/v1/ws``: challenge, auth, sub, send) and
the bare baseline (``/r/<room>``: no auth); the frames sent are identical
canonical-CBOR ``send`` frames, and receivers decode every frame they get.
Each payload starts with the sender's ``time.monotonic()`` (one system-wide
clock on Linux) and its seat id, so end-to-end latency is measured across
processes without clock skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import struct
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

import cbor2
import websockets
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from websockets.asyncio.client import ClientConnection, connect

from backchannel.protocol import primitives as P
from backchannel.protocol import relayauth
from backchannel.protocol.encoding import encode

HEADER = struct.Struct(">dQ")  # send time (monotonic), sender seat id
OPEN_TIMEOUT = 120.0
#: Upper bound on any single wait inside a command.
STEP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Target:
    kind: str  # "relay" or "baseline"
    port: int
    compression: bool = False

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Seat:
    """One connection: its room, its member key seed (relay auth), its role."""

    id: int
    room: bytes
    seed: bytes = b""
    subscribe: bool = True
    sender: bool = False
    keep: bool = False  # baseline: keep frames for catch-up
    after: int | None = None  # baseline: replay kept frames from here on connect


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Conn:
    target: Target
    seat: Seat
    ws: ClientConnection | None = None
    public: bytes = b""
    received: int = 0
    in_window: int = 0
    acks: int = 0
    sent: int = 0
    echoes: int = 0  # own messages seen back (many-rooms flow control)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: array = field(default_factory=lambda: array("d"))
    window: tuple[float, float] = (0.0, 0.0)
    run_start: float = float("inf")
    rx_run: int = 0  # receipts since ``run_start`` (the whole run, drain included)
    last_rx: float = 0.0
    record_latency: bool = False
    watch: int = -1  # seat id whose messages wake ``waiter``
    watched: int = 0
    waiter: asyncio.Event | None = None
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        kwargs: dict[str, Any] = {
            "max_size": None,
            "open_timeout": OPEN_TIMEOUT,
            "compression": "deflate" if self.target.compression else None,
        }
        seat = self.seat
        if self.target.kind == "baseline":
            query = f"sub={int(seat.subscribe)}&keep={int(seat.keep)}"
            if seat.after is not None:
                query += f"&after={seat.after}"
            url = f"ws://127.0.0.1:{self.target.port}/r/{seat.room.hex()}?{query}"
            self.ws = await connect(url, **kwargs)
            self.reader = asyncio.create_task(self._read_loop())
            if seat.after is not None:
                await asyncio.wait_for(self.synced.wait(), STEP_TIMEOUT)
            return
        self.ws = await connect(f"ws://127.0.0.1:{self.target.port}/v1/ws", **kwargs)
        challenge = cbor2.loads(await asyncio.wait_for(self.ws.recv(), OPEN_TIMEOUT))
        self.public = P.ed25519_public(seat.seed)
        sig = relayauth.sign_challenge(seat.seed, self.target.origin, challenge["nonce"])
        await self.ws.send(
            encode({"v": 1, "t": "auth", "keys": [{"key": self.public, "sig": sig}]})
        )
        while True:
            frame = cbor2.loads(await asyncio.wait_for(self.ws.recv(), OPEN_TIMEOUT))
            if frame["t"] == "error" and frame.get("ref") is None:
                continue  # a notice (reading slows down), not an answer to our auth
            if frame["t"] == "error":
                raise RuntimeError(f"auth refused: {frame.get('code')}")
            if frame["t"] == "challenge":
                break  # the fresh challenge follows `ready`
        self.reader = asyncio.create_task(self._read_loop())
        if seat.subscribe:
            after = seat.after or 0
            await self.ws.send(encode({"v": 1, "t": "sub", "room": seat.room, "after": after}))
            await asyncio.wait_for(self.synced.wait(), STEP_TIMEOUT)

    async def _read_loop(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(websockets.ConnectionClosed, asyncio.CancelledError):
            async for raw in self.ws:
                frame = cbor2.loads(raw)
                t = frame["t"]
                if t == "msg" or t == "send":
                    now = time.monotonic()
                    sent_at, origin = HEADER.unpack_from(frame["data"])
                    self.received += 1
                    if now >= self.run_start:
                        self.rx_run += 1
                        self.last_rx = now
                    lo, hi = self.window
                    if lo <= now <= hi:
                        self.in_window += 1
                        if self.record_latency:
                            self.latencies.append(now - sent_at)
                    if origin == self.watch:
                        self.watched += 1
                        if self.waiter is not None:
                            self.waiter.set()
                elif t == "sent":
                    self.acks += 1
                    if self.watch == -2 and self.waiter is not None:
                        self.waiter.set()
                elif t == "synced":
                    self.synced.set()
                elif t == "error":
                    code = str(frame.get("code"))
                    self.errors[code] = self.errors.get(code, 0) + 1

    def frame(self, size: int, pad: bytes) -> bytes:
        data = HEADER.pack(time.monotonic(), self.seat.id) + pad[: size - HEADER.size]
        return encode(
            {
                "v": 1,
                "t": "send",
                "room": self.seat.room,
                "from": self.public or bytes(32),
                "cid": HEADER.pack(time.time(), self.sent),
                "data": data,
            }
        )

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 2.0)


async def send_loop(
    conn: Conn,
    progress: Conn,
    *,
    start: float,
    stop: float,
    count: int,
    window: int,
    rate: float | None,
    size: int,
) -> None:
    """Send until ``stop`` or ``count`` messages, at most ``window`` ahead of
    what ``progress`` has seen of ours (own echo, a monitor's receipt, or acks)."""
    assert conn.ws is not None
    pad = os.urandom(size)
    waiter = asyncio.Event()
    progress.waiter = waiter

    def seen() -> int:
        return progress.acks if progress.watch == -2 else progress.watched

    base = seen()
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    first = time.monotonic()
    sent = 0
    while sent < count:
        now = time.monotonic()
        if now >= stop:
            break
        if sent - (seen() - base) >= window:
            waiter.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), min(1.0, stop - now))
            continue
        if rate is not None:
            due = int((now - first) * rate) + 1
            if sent >= due:
                await asyncio.sleep(0.001)
                continue
        await conn.ws.send(conn.frame(size, pad))
        sent += 1
        conn.sent += 1
    # Drain: wait (bounded) until everything we sent has been seen.
    deadline = time.monotonic() + STEP_TIMEOUT / 2
    while seen() - base < sent and time.monotonic() < deadline:
        waiter.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), 0.5)


async def _run(conns: list[Conn], args: dict[str, Any]) -> dict[str, Any]:
    """One measured run: every sender sends, every seat counts receipts in the window."""
    t0, t1 = args["window"]
    for c in conns:
        c.in_window = 0
        c.window = (t0, t1)
        c.run_start = args["start"]
        c.rx_run = 0
        c.last_rx = 0.0
        c.record_latency = args.get("latency", False)
        c.latencies = array("d")
        c.errors = {}
    tasks = []
    by_id = {c.seat.id: c for c in conns}
    for c in conns:
        if not c.seat.sender:
            continue
        mode = args.get("progress", "self")
        if mode == "acks":
            progress = c
            c.watch = -2
        elif mode == "self":
            progress = c
            c.watch = c.seat.id
        else:  # a monitor seat (in this process) watches this sender
            progress = by_id[args["monitor"]]
            progress.watch = c.seat.id
        tasks.append(
            send_loop(
                c,
                progress,
                start=args["start"],
                stop=args["stop"],
                count=args["count"],
                window=args["flow_window"],
                rate=args.get("rate"),
                size=args["size"],
            )
        )
    sent_before = sum(c.sent for c in conns)
    await asyncio.gather(*tasks)
    # Receivers: wait until the counting window has passed.
    await asyncio.sleep(max(0.0, t1 - time.monotonic() + 0.05))
    lat = array("d")
    errors: dict[str, int] = {}
    for c in conns:
        lat.extend(c.latencies)
        for k, v in c.errors.items():
            errors[k] = errors.get(k, 0) + v
        c.window = (0.0, 0.0)
        c.run_start = float("inf")
    return {
        "in_window": sum(c.in_window for c in conns),
        "rx_run": sum(c.rx_run for c in conns),
        "last_rx": max((c.last_rx for c in conns), default=0.0),
        "sent": sum(c.sent for c in conns) - sent_before,
        "latencies": lat.tobytes(),
        "errors": errors,
    }


async def _catchup(target: Target, seat: Seat, expect: int) -> dict[str, Any]:
    """Connect, authenticate, subscribe after a cursor; time until all ``expect`` arrived."""
    start = time.monotonic()
    conn = Conn(target, seat)
    await conn.open()  # returns after `synced`, i.e. after the stored messages
    took = time.monotonic() - start
    got = conn.received
    await conn.close()
    return {"seconds": took, "received": got}


async def _open_all(conns: list[Conn], parallel: int) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one(c: Conn) -> None:
        # Thousands of handshakes at once on two cores: one may be dropped by the
        # listener (either server's); opening it again is not part of the figure.
        async with gate:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((websockets.InvalidMessage, OSError)),
                wait=wait_random_exponential(multiplier=0.1, max=2.0),
                stop=stop_after_attempt(4),
                reraise=True,
            ):
                with attempt:
                    await c.open()

    await asyncio.gather(*(one(c) for c in conns))


async def _main(pipe: Pipe, target: Target, seats: list[Seat], parallel: int) -> None:
    loop = asyncio.get_running_loop()
    conns = [Conn(target, s) for s in seats]
    try:
        await asyncio.wait_for(_open_all(conns, parallel), OPEN_TIMEOUT)
        pipe.send(("ready", {"connections": len(conns)}))
        while True:
            cmd, args = await loop.run_in_executor(None, pipe.recv)
            if cmd == "stop":
                break
            if cmd == "run":
                result = await asyncio.wait_for(_run(conns, args), STEP_TIMEOUT * 2)
            elif cmd == "catchup":
                result = await asyncio.wait_for(
                    _catchup(target, args["seat"], args["expect"]), STEP_TIMEOUT
                )
            else:
                raise ValueError(cmd)
            pipe.send(("ok", result))
    except (EOFError, BrokenPipeError):
        pass  # the orchestrator went away: stop
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        await asyncio.wait_for(
            asyncio.gather(*(c.close() for c in conns), return_exceptions=True), 30
        )


def worker(pipe: Pipe, target: Target, seats: list[Seat], parallel: int = 200) -> None:
    """Process entry point."""
    raise_nofile()
    try:
        import uvloop

        uvloop.run(_main(pipe, target, seats, parallel))
    except ImportError:  # pragma: no cover
        asyncio.run(_main(pipe, target, seats, parallel))
