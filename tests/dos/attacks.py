"""Attacks the DoS suite runs in a process of their own: ``python -m tests.dos.attacks NAME JSON``.

Each attack runs for ``seconds`` and prints, as its last line, a JSON object
counting what the relay answered (error codes, closes), so the test can check
that the attacker got a typed error or a close rather than service.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import websockets

from backchannel.protocol.encoding import decode, encode

Counts = collections.Counter[str]
ATTACKS: dict[str, Callable[..., Awaitable[None]]] = {}


def attack(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    ATTACKS[fn.__name__] = fn
    return fn


def frame(t: str, **fields: Any) -> bytes:
    return encode({"v": 1, "t": t, **fields})


def note(counts: Counts, raw: Any) -> None:
    """Count a frame the relay sent: its error code, or its type."""
    if not isinstance(raw, bytes):
        counts["text"] += 1
        return
    try:
        value = decode(raw, max_size=1 << 24)
    except Exception:
        counts["undecodable"] += 1
        return
    if isinstance(value, dict):
        kind = value.get("t")
        counts[f"error:{value.get('code')}" if kind == "error" else str(kind)] += 1


async def drain(ws: Any, counts: Counts) -> None:
    try:
        async for raw in ws:
            note(counts, raw)
    except websockets.ConnectionClosed as exc:
        counts[f"close:{exc.rcvd.code if exc.rcvd else 'none'}"] += 1
    except Exception as exc:
        counts[f"exc:{type(exc).__name__}"] += 1


@attack
async def ack_flood(counts: Counts, ws_url: str, origin: str, **_: Any) -> None:
    """A throwaway key, no room: ``ack`` frames as fast as the socket takes them."""
    from backchannel.protocol import relayauth
    from backchannel.protocol.keys import MemberKeyPair

    async def one() -> None:
        key = MemberKeyPair.generate()
        async with websockets.connect(ws_url, max_size=None) as ws:
            challenge = decode(await ws.recv(), max_size=1 << 20)
            sig = relayauth.sign_challenge(key.sign_seed, origin, challenge["nonce"])
            await ws.send(frame("auth", keys=[{"key": key.public.sign, "sig": sig}]))
            reader = asyncio.create_task(drain(ws, counts))
            ids = list(range(1, 1025))
            try:
                while not reader.done():
                    await ws.send(frame("ack", ids=ids))
                    counts["sent"] += 1
                    await asyncio.sleep(0)  # let the reader see the answers
            except websockets.ConnectionClosed:
                pass
            await reader

    await asyncio.gather(*(one() for _ in range(4)), return_exceptions=True)


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port.rstrip("/"))


async def _status_line(reader: asyncio.StreamReader, counts: Counts) -> None:
    """Count what the relay answered on a raw HTTP connection: a status, or a close."""
    try:
        line = await reader.readline()
    except OSError as exc:
        counts[f"exc:{type(exc).__name__}"] += 1
        return
    parts = line.split()
    counts[f"status:{parts[1].decode()}" if len(parts) > 1 else "close:none"] += 1


@attack
async def big_header(
    counts: Counts,
    url: str,
    header_mib: int = 64,
    chunk: int = 64 * 1024,
    parallel: int = 1,
    repeat: bool = False,
    **_: Any,
) -> None:
    """Requests whose header block is ``header_mib`` MiB, written in chunks while the
    relay's answer (a status or a close) is read: ``parallel`` connections, each trying
    once or (``repeat``) again and again until the time is up. ``sent_kib`` is the most one
    connection wrote before it saw the answer; ``answer_ms`` the slowest answer."""
    host, port = _host_port(url)
    block = b"a" * chunk

    async def once() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        # A small send buffer, so that what this side counts as sent is close to what
        # reached the relay's side.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, chunk)
        answered = asyncio.create_task(_status_line(reader, counts))
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Filler: ")
        sent, total = 0, header_mib << 20
        try:
            while sent < total and not answered.done():
                writer.write(block)
                await writer.drain()
                sent += chunk
            if not answered.done():
                writer.write(b"\r\n\r\n")
                await writer.drain()
                counts["sent_whole_header"] += 1
        except OSError as exc:
            counts[f"write:{type(exc).__name__}"] += 1
        await asyncio.wait_for(answered, 30)
        counts["attempts"] += 1
        counts["sent_kib"] = max(counts["sent_kib"], sent >> 10)
        counts["answer_ms"] = max(counts["answer_ms"], int((time.monotonic() - started) * 1000))
        writer.close()

    async def worker() -> None:
        await once()
        while repeat:
            await once()

    await asyncio.gather(*(worker() for _ in range(parallel)))


@attack
async def slowloris(
    counts: Counts, url: str, connections: int = 1100, trickle: float = 1.0, **_: Any
) -> None:
    """``connections`` requests that never finish their headers: each sends its request
    line and then one more header line every ``trickle`` seconds. Counts connections that
    opened, that failed to open, and that the relay closed (with the time of the first and
    last close)."""
    host, port = _host_port(url)
    started = time.monotonic()
    closes: list[float] = []

    async def one(i: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            writer.write(b"GET /v1/limits HTTP/1.1\r\nHost: relay\r\n")
            await writer.drain()
        except (OSError, TimeoutError) as exc:
            counts[f"connect:{type(exc).__name__}"] += 1
            return
        counts["opened"] += 1
        closed = asyncio.create_task(reader.read(65536))
        try:
            while not closed.done():
                await asyncio.wait({closed}, timeout=trickle)
                if not closed.done():
                    writer.write(b"X-%d: %d\r\n" % (i, int(time.monotonic())))
                    await writer.drain()
        except OSError:
            pass
        closes.append(time.monotonic() - started)
        counts["closed_by_relay"] += 1
        writer.close()

    tasks = []
    for i in range(connections):
        tasks.append(asyncio.create_task(one(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)  # no SYN burst: the backlog is not what is tested
    try:
        await asyncio.gather(*tasks)
    finally:
        if closes:
            counts["first_close_ms"] = int(min(closes) * 1000)
            counts["last_close_ms"] = int(max(closes) * 1000)


# --- storage: quotas, log appends, a locked database (issue 12, points 5-7) ----------------


def _b64e(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _member_socket(ws_url: str, origin: str, key: Any, room: bytes) -> Any:
    """A connection authenticated by ``key`` and subscribed to ``room`` (so it is settled)."""
    from backchannel.protocol import relayauth

    ws = await websockets.connect(ws_url, max_size=None)
    challenge = decode(await ws.recv(), max_size=1 << 20)
    sig = relayauth.sign_challenge(key.sign_seed, origin, challenge["nonce"])
    await ws.send(frame("auth", keys=[{"key": key.public.sign, "sig": sig}]))
    await ws.send(frame("sub", room=room, after=0))
    return ws


async def _answer(ws: Any, cid: bytes) -> str:
    """The code of the relay's answer to the send with ``cid`` ("sent"/"psent" or an error
    code); other frames (the connection's own messages coming back) are skipped."""
    while True:
        value = decode(await ws.recv(), max_size=1 << 24)
        if not isinstance(value, dict):
            continue
        if value.get("t") in ("sent", "psent") and value.get("cid") == cid:
            return str(value["t"])
        if value.get("t") == "error" and value.get("ref") == cid:
            return str(value.get("code"))


async def _send_until_refused(
    ws: Any, counts: Counts, make: Callable[[bytes], bytes], size: int, give_up: bool
) -> None:
    """Send one frame at a time; a refusal other than a rate limit ends it (``give_up``)
    or is retried after a pause, as an attacker holding a quota full would."""
    while True:
        cid = os.urandom(16)
        await ws.send(make(cid))
        code = await _answer(ws, cid)
        counts[f"answer:{code}"] += 1
        if code in ("sent", "psent"):
            counts["stored_kib"] += size >> 10
        elif code in ("rate_limited", "busy"):
            await asyncio.sleep(0.05)
        elif give_up:
            return
        else:
            await asyncio.sleep(0.05)


@attack
async def room_spam(
    counts: Counts,
    url: str,
    ws_url: str,
    origin: str,
    writers: int = 16,
    size: int = 128 * 1024,
    **_: Any,
) -> None:
    """Under the open creation policy, one address creates rooms with the longest
    retention as fast as the relay takes them, and fills each with ``size``-byte
    messages from its facilitator key (``writers`` rooms at a time) until refused."""
    from backchannel.protocol import roomlog
    from backchannel.protocol.keys import MemberKeyPair

    gate = asyncio.Semaphore(writers)
    tasks: set[asyncio.Task[None]] = set()

    async def fill(key: MemberKeyPair, room: bytes) -> None:
        async with gate:
            try:
                ws = await _member_socket(ws_url, origin, key, room)
                async with ws:
                    await _send_until_refused(
                        ws,
                        counts,
                        lambda cid: frame(
                            "send",
                            room=room,
                            cid=cid,
                            data=os.urandom(size),
                            **{"from": key.public.sign},
                        ),
                        size,
                        give_up=True,
                    )
            except websockets.ConnectionClosed as exc:
                counts[f"close:{exc.rcvd.code if exc.rcvd else 'none'}"] += 1

    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while True:
                key = MemberKeyPair.generate()
                event = roomlog.make_create(
                    key, roomlog.Rules(retention=roomlog.MAX_RETENTION), int(time.time())
                )
                r = await http.post("/v1/rooms", json={"event": _b64e(event)})
                if r.status_code == 201:
                    counts["rooms"] += 1
                    task = asyncio.create_task(fill(key, bytes.fromhex(r.json()["room_id"])))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    code = r.json().get("error", {}).get("code") if r.content else None
                    counts[f"create:{r.status_code}:{code}"] += 1
                    await asyncio.sleep(0.01)
    finally:
        for task in tasks:
            task.cancel()


@attack
async def mailbox_fill(
    counts: Counts,
    ws_url: str,
    origin: str,
    seed: str,
    dh: str,
    room: str,
    victim: str,
    size: int = 128 * 1024,
    **_: Any,
) -> None:
    """A co-member fills an offline member's mailbox with ``size``-byte pairwise items,
    and keeps it full (retrying every refusal)."""
    from backchannel.protocol.keys import MemberKeyPair

    key = MemberKeyPair.from_private(bytes.fromhex(seed), bytes.fromhex(dh))
    room_id, to = bytes.fromhex(room), bytes.fromhex(victim)
    ws = await _member_socket(ws_url, origin, key, room_id)
    async with ws:
        await _send_until_refused(
            ws,
            counts,
            lambda cid: frame(
                "psend",
                room=room_id,
                to=to,
                cid=cid,
                data=os.urandom(size),
                **{"from": key.public.sign},
            ),
            size,
            give_up=False,
        )


@attack
async def log_spam(counts: Counts, url: str, rooms: int = 2, **_: Any) -> None:
    """A facilitator appends invite events to its own ``rooms`` as fast as the relay
    answers (each invite grows the state every later append is checked against)."""
    from backchannel.protocol import roomlog
    from backchannel.protocol.keys import MemberKeyPair

    async def one(http: httpx.AsyncClient) -> None:
        key = MemberKeyPair.generate()
        log = roomlog.RoomLog()
        create = roomlog.make_create(key, roomlog.Rules(retention=86_400), int(time.time()))
        r = await http.post("/v1/rooms", json={"event": _b64e(create)})
        if r.status_code != 201:
            counts[f"create:{r.status_code}"] += 1
            return
        log.append(create)
        while True:
            now = int(time.time())
            event, _seed = roomlog.make_invite(key, log.state, "participant", now + 3600, 1, now)
            started = time.monotonic()
            r = await http.post(
                f"/v1/rooms/{log.room_id.hex()}/events", json={"event": _b64e(event)}
            )
            took = int((time.monotonic() - started) * 1000)
            counts["max_append_ms"] = max(counts["max_append_ms"], took)
            if r.status_code == 201:
                log.append(event)
                counts["appended"] += 1
                counts["longest_log"] = max(counts["longest_log"], len(log))
            else:
                code = r.json().get("error", {}).get("code") if r.content else None
                counts[f"append:{r.status_code}:{code}"] += 1
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(one(http) for _ in range(rooms)))


@attack
async def hold_lock(counts: Counts, db: str, marker: str, hold: float = 5.0, **_: Any) -> None:
    """Another local process takes SQLite's write lock on the relay's database
    (``BEGIN IMMEDIATE``, as a stuck admin shell or backup script would) and holds it for
    ``hold`` seconds. ``marker`` gets ``locked`` then ``released`` written to it."""
    import sqlite3
    from pathlib import Path

    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        Path(marker).write_text("locked")
        counts["locked"] += 1
        await asyncio.sleep(hold)
        conn.execute("ROLLBACK")
        Path(marker).write_text("released")
        counts["released"] += 1
    finally:
        conn.close()


async def _authed(ws_url: str, origin: str, counts: Counts, key: Any = None, **kw: Any) -> Any:
    """A connection authenticated by ``key`` (a fresh throwaway one by default)."""
    from backchannel.protocol import relayauth
    from backchannel.protocol.keys import MemberKeyPair

    key = key or MemberKeyPair.generate()
    ws = await websockets.connect(ws_url, max_size=None, **kw)
    challenge = decode(await ws.recv(), max_size=1 << 20)
    if challenge.get("t") != "challenge":
        note(counts, encode(challenge))
        await ws.close()
        raise ConnectionError("no challenge")
    sig = relayauth.sign_challenge(key.sign_seed, origin, challenge["nonce"])
    await ws.send(frame("auth", keys=[{"key": key.public.sign, "sig": sig}]))
    return ws


@attack
async def auth_amplification(counts: Counts, ws_url: str, origin: str, **_: Any) -> None:
    """One signature repeated 1,024 times per ``auth`` frame, on four connections,
    reconnecting whenever the relay closes one."""
    from backchannel.protocol import relayauth
    from backchannel.protocol.keys import MemberKeyPair

    async def one() -> None:
        key = MemberKeyPair.generate()
        while True:
            try:
                async with websockets.connect(ws_url, max_size=None) as ws:
                    challenge = decode(await ws.recv(), max_size=1 << 20)
                    sig = relayauth.sign_challenge(key.sign_seed, origin, challenge["nonce"])
                    item = {"key": key.public.sign, "sig": sig}
                    reader = asyncio.create_task(drain(ws, counts))
                    while not reader.done():
                        await ws.send(frame("auth", keys=[item] * 1024))
                        counts["sent"] += 1
                        await asyncio.sleep(0)
                    await reader
            except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake):
                counts["reconnect"] += 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one() for _ in range(4)))


@attack
async def connection_fill(
    counts: Counts,
    ws_url: str,
    origin: str,
    connections: int = 1200,
    addresses: int = 100,
    **_: Any,
) -> None:
    """Throwaway keys on as many connections as the relay takes, from ``addresses``
    loopback source addresses (127.0.1.x: a stranger with many addresses), each
    held open and re-opened when the relay closes it."""
    import socket

    where = urllib.parse.urlsplit(ws_url)

    async def one(i: int) -> None:
        while True:
            sock = socket.socket()
            try:
                sock.bind((f"127.0.1.{1 + i % addresses}", 0))
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, (where.hostname, where.port))
                ws = await _authed(ws_url, origin, counts, sock=sock)
                counts["opened"] += 1
                await drain(ws, counts)
            except (OSError, ConnectionError, websockets.ConnectionClosed) as exc:
                counts[f"refused:{type(exc).__name__}"] += 1
                sock.close()
            except websockets.InvalidHandshake:
                counts["refused:handshake"] += 1
                sock.close()
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one(i) for i in range(connections)))


@attack
async def slow_readers(
    counts: Counts, ws_url: str, origin: str, room: str, seeds: list[list[str]], **_: Any
) -> None:
    """Members who subscribe from the start of a long room and never read a byte."""
    import socket

    from backchannel.protocol.keys import MemberKeyPair

    held = []  # kept referenced, so nothing closes them from this side
    for sign_seed, dh in seeds:
        key = MemberKeyPair.from_private(bytes.fromhex(sign_seed), bytes.fromhex(dh))
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            where = urllib.parse.urlsplit(ws_url)
            sock.connect((where.hostname, where.port))
            ws = await _authed(ws_url, origin, counts, key, sock=sock, max_queue=1)
            await ws.send(frame("sub", room=bytes.fromhex(room), after=0))
            held.append((ws, sock))
            counts["subscribed"] += 1
    # Read nothing. Whether the relay drops them is judged from its side
    # (its open sockets), since these sockets' own buffers hide a close.
    await asyncio.sleep(3600)
    assert held


@attack
async def fragments(
    counts: Counts, ws_url: str, origin: str, empty: bool = False, **_: Any
) -> None:
    """Messages made of tiny (or empty) continuation frames, never finished, on
    four connections, reconnecting when closed."""
    from websockets.frames import Frame, Opcode

    async def one() -> None:
        while True:
            try:
                ws = await _authed(ws_url, origin, counts)
                reader = asyncio.create_task(drain(ws, counts))
                # The protocol object writes raw frames: the first fragment, then
                # continuations that never end the message.
                proto = ws.protocol
                proto.send_frame(Frame(Opcode.BINARY, b"\xa0", fin=False))
                chunk = b"" if empty else b"x"
                while not reader.done():
                    for _ in range(1000):
                        proto.send_frame(Frame(Opcode.CONT, chunk, fin=False))
                    ws.send_data()
                    counts["sent"] += 1000
                    await asyncio.sleep(0)
                await reader
            except (OSError, ConnectionError, websockets.ConnectionClosed):
                counts["reconnect"] += 1
            await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(4)))


def main() -> None:
    name, raw = sys.argv[1], sys.argv[2]
    params = json.loads(raw)
    counts: Counts = collections.Counter()
    started = time.monotonic()

    def finish() -> None:
        counts["elapsed_ms"] = int((time.monotonic() - started) * 1000)
        print(json.dumps(dict(counts)), flush=True)
        # No polite closing of a thousand sockets (a throttled one would wait out
        # its close timeout): the attack is over.
        os._exit(0)

    async def run() -> None:
        task = asyncio.create_task(ATTACKS[name](counts=counts, **params))
        done, _ = await asyncio.wait({task}, timeout=params["seconds"])
        if task in done and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        finish()

    asyncio.run(run())
    finish()


if __name__ == "__main__":
    main()
