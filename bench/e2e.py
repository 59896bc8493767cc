"""End to end with real crypto: the client library, one process per client.

Relay: a facilitator and a participant made with ``backchannel.client``
(Argon2 at its minimum cost, as in the tests). Per repeat, the sender process
opens its profile, connects and sends ``count`` messages the way a process that
stays connected does (the daemon, issue 13: :class:`~backchannel.client.pipeline.Pipeline`),
``WINDOW`` at a time: seal with its sender key, sign, store in its encrypted
local store, send them all, and wait for every durable ``sent``. Meanwhile the
receiver is offline; then the receiver process connects and handles every
``msg`` (verify, decrypt, store the line). Each process's messages/second is its
own work, not shared with the other.

Baseline: the same protocol work without the client library and without the
relay: ``OutboundSenderKey.seal`` of the same payload, ``WINDOW`` at a time, sent
over the bare websocket server and waited for (its ``sent``) like the client's,
two windows in flight in both,
and the receiver running ``InboundSenderKey.open`` over the frames replayed from
memory. The ratio is what the client library and the relay add to the crypto.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import cbor2
from websockets.asyncio.client import connect

from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import encode

PASS = "pw"
#: Messages sealed and in flight at once, for the client and the baseline alike.
WINDOW = 64
FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}


def text_of(size: int) -> str:
    return ("x" * size)[:size]


# --- set-up ---------------------------------------------------------------------------------


async def _setup(url: str, root: Path) -> None:
    from backchannel.client.core import Client
    from backchannel.client.store import Store
    from backchannel.protocol import roomlog as L

    clients = []
    for name in ("sender", "receiver"):
        store = Store.create(root / name, PASS, **FAST)
        Client.init_profile(store, url, name)
        clients.append(Client(store))
    sender, receiver = clients
    room = await sender.create_room("bench", L.Rules())
    code = await sender.invite(room, "participant", 3600, 1)
    joined = await receiver.join(code, accept_rules=lambda r: True)
    # Exchange sender keys (pairwise, PQXDH) once, as the tests' `online` does.
    for client, r in ((sender, room), (receiver, joined), (sender, room), (receiver, joined)):
        async with client.connect([r]) as sock:
            await client.pump(sock, [r], idle=0.3)
            await client.retry_stash(r)
    for client in clients:
        await client.aclose()
        client.store.close()


def setup(url: str, root: Path) -> None:
    asyncio.run(_setup(url, root))


# --- relay side -----------------------------------------------------------------------------


def _profiler(path: str | None) -> Any:
    if not path:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="enabled")
    profiler.start()
    return profiler


def _save_profile(profiler: Any, path: str | None) -> None:
    if profiler is None or not path:
        return
    profiler.stop()
    Path(path).write_text(profiler.output_text(unicode=False, color=False, show_all=False))


async def _relay_sender(home: Path, count: int, size: int, limit: float, prof: str | None) -> Any:
    from backchannel.client.core import Client
    from backchannel.client.pipeline import Pipeline
    from backchannel.client.store import Store

    client = Client(Store.open(home, PASS))
    room = client.rooms()[0]
    text = text_of(size)
    try:
        async with client.connect([room]) as sock:
            await client.pump(sock, [room], idle=0.2)
            pipeline = Pipeline(client)
            profiler = _profiler(prof)
            start = time.monotonic()
            sent = 0
            waiting: list[Any] = []

            async def settle(batch: list[Any]) -> None:
                await pipeline.settle(sock, room, batch)
                failed = [item for item in batch if item.error or item.queued]
                if failed:
                    raise RuntimeError(f"{len(failed)} sends did not go: {failed[0].error!r}")

            # Two windows in flight, as the daemon keeps them: one is sealed while
            # the relay commits the other.
            while sent < count and time.monotonic() - start < limit:
                batch = await pipeline.seal(sock, room, [text] * min(WINDOW, count - sent))
                if waiting:
                    await settle(waiting)
                waiting = batch
                sent += len(batch)
            if waiting:
                await settle(waiting)
            took = time.monotonic() - start
            _save_profile(profiler, prof)
    finally:
        await client.aclose()
        client.store.close()
    return {"messages": sent, "seconds": took}


async def _relay_receiver(home: Path, count: int, limit: float, prof: str | None) -> Any:
    from backchannel.client.core import Client
    from backchannel.client.store import Store

    client = Client(Store.open(home, PASS))
    room = client.rooms()[0]
    before = sum(1 for line in client.lines(room) if line.kind == "message")
    got = 0
    profiler = _profiler(prof)
    start = time.monotonic()
    try:
        async with client.connect([room]) as sock:
            by_id = {room.room_id: room}
            while got < count and time.monotonic() - start < limit:
                try:
                    frame = await sock.recv(timeout=max(0.1, limit - (time.monotonic() - start)))
                except TimeoutError:
                    break
                # As the client's own pump: what has arrived is handled together.
                frames = [frame, *sock.ready(255)]
                await client.handle_frames(sock, by_id, frames)
                got += sum(1 for f in frames if f.type == "msg")
            took = time.monotonic() - start
            _save_profile(profiler, prof)
        after = sum(1 for line in client.lines(room) if line.kind == "message")
    finally:
        await client.aclose()
        client.store.close()
    return {"messages": got, "decrypted": after - before, "seconds": took}


# --- baseline side --------------------------------------------------------------------------


async def _base_sender(port: int, room: bytes, count: int, size: int, limit: float) -> Any:
    from backchannel.protocol.senderkey import OutboundSenderKey

    out = OutboundSenderKey.generate(room, os.urandom(32), since=0)
    dist = out.distribution().to_bytes()
    epoch = (0, os.urandom(32))
    text = text_of(size)
    url = f"ws://127.0.0.1:{port}/r/{room.hex()}?sub=0&keep=1"
    async with connect(url, max_size=None) as ws:
        start = time.monotonic()
        sent = 0
        waiting = 0

        async def settle(expected: int) -> None:
            acked = 0
            while acked < expected:
                if cbor2.loads(await asyncio.wait_for(ws.recv(), 10))["t"] == "sent":
                    acked += 1

        while sent < count and time.monotonic() - start < limit:
            batch = min(WINDOW, count - sent)
            for _ in range(batch):
                body = encode({"t": "text", "text": text, "ts": int(time.time())})
                envelope = out.seal(body, epoch)
                cid = os.urandom(16)
                await ws.send(
                    encode(
                        {
                            "v": 1,
                            "t": "send",
                            "room": room,
                            "from": bytes(32),
                            "cid": cid,
                            "data": envelope,
                        }
                    )
                )
            if waiting:
                await settle(waiting)
            waiting = batch
            sent += batch
        if waiting:
            await settle(waiting)
        took = time.monotonic() - start
    return {"messages": sent, "seconds": took, "dist": dist}


async def _base_receiver(port: int, room: bytes, dist: bytes, count: int, limit: float) -> Any:
    from backchannel.protocol.senderkey import InboundSenderKey, SenderKeyDistribution

    inbound = InboundSenderKey.from_distribution(SenderKeyDistribution.from_bytes(dist))
    url = f"ws://127.0.0.1:{port}/r/{room.hex()}?sub=1&after=0"
    got = 0
    start = time.monotonic()
    async with connect(url, max_size=None) as ws:
        while got < count and time.monotonic() - start < limit:
            frame = cbor2.loads(await asyncio.wait_for(ws.recv(), limit))
            if frame["t"] != "send":
                continue
            body = inbound.open(frame["data"])
            cbor2.loads(body)
            got += 1
        took = time.monotonic() - start
    return {"messages": got, "decrypted": got, "seconds": took}


# --- process entry points -------------------------------------------------------------------


def process(pipe: Pipe, role: str, kwargs: dict[str, Any]) -> None:
    """Run one role and send its result (or error) back."""
    coro: Any
    if role == "relay-sender":
        coro = _relay_sender(**kwargs)
    elif role == "relay-receiver":
        coro = _relay_receiver(**kwargs)
    elif role == "base-sender":
        coro = _base_sender(**kwargs)
    else:
        coro = _base_receiver(**kwargs)
    try:
        pipe.send(("ok", asyncio.run(coro)))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
