"""The HTTP layer (issue 12, points 4 and 8): header size and time, the connection ceiling,
who may set X-Forwarded-For, the operator listener, and the file-descriptor limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import subprocess
import time
from pathlib import Path

import httpx
import websockets

from backchannel.protocol.encoding import decode

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, WSClient
from .test_cli import RELAY, env_for, free_port

OPERATOR_PATHS = ("/metrics", "/docs", "/redoc", "/openapi.json")


async def raw_request(relay: RelayServer, data: bytes, timeout: float = 5) -> bytes:
    """Send ``data`` on a new connection; what the relay answered before it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


async def test_header_block_and_request_line_are_bounded(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_header_bytes=4096)
    fits = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n"
    assert status(await raw_request(relay, fits)) == 200
    big_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 5000 + b"\r\n\r\n"
    assert status(await raw_request(relay, big_header)) == 400
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 1000 + b"\r\n"
    assert status(await raw_request(relay, many)) == 400
    long_line = b"GET /healthz?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert status(await raw_request(relay, long_line)) == 400
    # Without an end: refused once the bound is passed, not after the whole of it.
    endless = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 8192
    assert status(await raw_request(relay, endless)) == 400


async def test_a_half_sent_request_is_closed_after_the_header_timeout(
    relay_factory: RelayFactory,
) -> None:
    relay = relay_factory(header_timeout_seconds=0.5)
    started = time.monotonic()
    assert await raw_request(relay, b"GET /healthz HTTP/1.1\r\nHost:") == b""
    assert 0.4 < time.monotonic() - started < 3
    # Trickling header lines does not keep it open.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    with contextlib.suppress(OSError):
        while not reader.at_eof() and time.monotonic() - started < 3:
            writer.write(b"X-A: b\r\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(65536), 0.1)
    assert reader.at_eof()
    assert time.monotonic() - started < 2
    writer.close()
    # After a response the next request's head has the same deadline.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), 3):
        pass
    assert time.monotonic() - started < 2
    writer.close()


async def test_websockets_outlive_the_header_timeout(
    relay_factory: RelayFactory,
) -> None:
    relay = relay_factory(header_timeout_seconds=0.3)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    client = await WSClient.connect(relay, [room.facilitator])
    await client.send_frame("sub", room=room.id, after=0)
    await client.expect("synced")
    await asyncio.sleep(1.0)
    await client.send_msg(room.id, room.facilitator, b"still here")
    await client.close()


async def test_connections_past_the_ceiling_are_closed(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_tcp_connections=3, header_timeout_seconds=30)
    held = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(2)]
    await asyncio.sleep(0.1)
    # The third is at the ceiling: admitted, but its request is turned away (503).
    assert status(await raw_request(relay, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")) == 503
    for _ in range(2):
        held.append(await asyncio.open_connection("127.0.0.1", relay.port))
    await asyncio.sleep(0.1)
    # The fourth: closed as it arrives, without reading anything.
    assert await asyncio.wait_for(held[-1][0].read(1), 2) == b""
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.2)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        assert (await http.get("/healthz")).status_code == 200


async def first_frame(ws: websockets.ClientConnection) -> str:
    frame = decode(await asyncio.wait_for(ws.recv(), 5))
    assert isinstance(frame, dict)
    return str(frame["code"] if frame["t"] == "error" else frame["t"])


async def per_address_answers(relay: RelayServer, forwarded: list[str]) -> list[str]:
    """What each of several simultaneous connections, claiming these addresses, is told."""
    answers = []
    async with contextlib.AsyncExitStack() as stack:
        for address in forwarded:
            ws = await stack.enter_async_context(
                websockets.connect(relay.ws_url, additional_headers={"X-Forwarded-For": address})
            )
            answers.append(await first_frame(ws))
    return answers


async def test_forwarded_for_is_believed_from_trusted_proxies_only(
    relay_factory: RelayFactory,
) -> None:
    """The per-address connection cap counts the peer, whatever X-Forwarded-For says,
    unless the peer is a configured proxy (loopback here stands for one)."""
    claims = ["203.0.113.1", "203.0.113.2", "203.0.113.1"]
    default = relay_factory(max_connections_per_address=1)
    assert default.settings.trusted_proxies == []
    assert await per_address_answers(default, claims) == [
        "challenge",
        "too_many_connections",
        "too_many_connections",
    ]
    behind_proxy = relay_factory(max_connections_per_address=1, trusted_proxies=["127.0.0.1"])
    assert await per_address_answers(behind_proxy, claims) == [
        "challenge",
        "challenge",
        "too_many_connections",
    ]


async def test_operator_routes_are_on_the_operator_listener_only(
    relay_factory: RelayFactory,
) -> None:
    relay = relay_factory()
    async with (
        httpx.AsyncClient(base_url=relay.url) as public,
        httpx.AsyncClient(base_url=relay.admin_url) as operator,
    ):
        for path in OPERATOR_PATHS:
            assert (await public.get(path)).status_code == 404, path
            assert (await operator.get(path)).status_code == 200, path
        assert (await public.get("/healthz")).status_code == 200
        schema = (await operator.get("/openapi.json")).json()
        assert "/v1/rooms" in schema["paths"]
        assert "/metrics" not in schema["paths"]
        # The operator listener serves nothing of the relay itself.
        assert (await operator.get("/v1/limits")).status_code == 404
    exposed = relay_factory(admin_on_public=True)
    async with httpx.AsyncClient(base_url=exposed.url) as public:
        for path in OPERATOR_PATHS:
            assert (await public.get(path)).status_code == 200, path


def test_serve_raises_its_file_limit_and_runs_the_operator_listener(tmp_path: Path) -> None:
    """Started as systemd starts a service (soft RLIMIT_NOFILE 1024), ``serve`` raises its
    soft limit to the hard one, says so once, and serves /metrics on its operator port
    only; SIGINT stops both listeners."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(1024, hard)
    admin_port = free_port()
    proc = subprocess.Popen(
        [RELAY, "serve", "--port", "0", "--admin-port", str(admin_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for(tmp_path),
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        assert url.startswith("http://127.0.0.1:")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
        assert int(line.split()[3]) == hard
        deadline = time.monotonic() + 10
        while not (public := _get(f"{url}/healthz")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert public == 200
        assert _get(f"{url}/metrics") == 404
        assert _get(f"http://127.0.0.1:{admin_port}/metrics") == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    records = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    limit_records = [r for r in records if r.get("event") == "relay.file_limit"]
    assert len(limit_records) == 1
    assert limit_records[0]["open_files"] == hard
    (operator,) = [r for r in records if r.get("event") == "relay.operator_listener"]
    assert operator["port"] == admin_port
    assert "Traceback" not in err


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0
