"""The denial-of-service suite's parts: a relay process, an honest participant, an attacker.

Each attack test measures an honest participant's latency (send → ``sent``, one
message at a time) with no attack, then again while an attacker runs, on the
same relay in the same test, and asserts that the second is within
:data:`SLOWDOWN` of the first (or under :data:`FLOOR` seconds, whichever is
larger), and that the relay's resident memory grew by less than
:data:`RSS_BOUND`. The relay runs as its own process (``backchannel-relay
serve``), so its memory is its own and the attacker cannot starve it of the
interpreter; the attacker runs in a third process (``python -m
tests.dos.attacks NAME``) so that it does not slow the honest client either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from backchannel.protocol.keys import MemberKeyPair
from tests.faults.procs import RelayProcess
from tests.server.helpers import TestRoom, WSClient, signed_headers

#: The honest p99 during an attack may be this many times its no-attack p99 ...
SLOWDOWN = 10.0
#: ... or this many seconds, whichever is larger.
FLOOR = 0.5
#: The relay's RSS may grow by this much during an attack.
RSS_BOUND = 100 * 1024 * 1024

ROOT = Path(__file__).resolve().parents[2]


class DosRelay(RelayProcess):
    """A relay process with what the DoS tests need to see of it."""

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def origin(self) -> str:
        return self.url

    def rss(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def open_sockets(self) -> int:
        """Sockets the relay process holds open (listening ones included)."""
        assert self.proc is not None
        fds = Path(f"/proc/{self.proc.pid}/fd")
        count = 0
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(fd).startswith("socket:")
        return count


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass
class Honest:
    """A facilitator in a room of their own, sending one message at a time."""

    relay: DosRelay
    http: httpx.AsyncClient
    room: TestRoom
    key: MemberKeyPair
    ws: WSClient | None = None
    errors: list[str] = field(default_factory=list)

    @classmethod
    async def open(cls, relay: DosRelay) -> Honest:
        http = httpx.AsyncClient(base_url=relay.url, timeout=30)
        room = await TestRoom.create(http)
        honest = cls(relay, http, room, room.facilitator)
        await honest.connect()
        return honest

    async def connect(self, after: int = 0) -> None:
        self.ws = await WSClient.connect(self.relay, [self.key])  # type: ignore[arg-type]
        await self.ws.send_frame("sub", room=self.room.id, after=after)
        await self.ws.expect("synced", timeout=30)

    async def probe(self, n: int = 40, gap: float = 0.06, timeout: float = 30.0) -> list[float]:
        """Latencies of ``n`` sends, each waited for, paced under the relay's default
        send rate (20/s); a refusal or a timeout counts as ``timeout`` seconds (so it
        fails the bound rather than hiding)."""
        assert self.ws is not None
        out: list[float] = []
        for _ in range(n):
            cid = os.urandom(16)
            started = time.monotonic()
            try:
                await self.ws.send_frame(
                    "send",
                    room=self.room.id,
                    from_=self.key.public.sign,
                    cid=cid,
                    data=os.urandom(512),
                )
                reply = await self.ws.expect_reply("sent", cid, timeout=timeout)
                if reply["t"] != "sent":
                    self.errors.append(str(reply.get("code")))
                    out.append(timeout)
                else:
                    out.append(time.monotonic() - started)
            except TimeoutError:
                self.errors.append("timeout")
                out.append(timeout)
            await asyncio.sleep(gap)
        return out

    async def rest_probe(self, n: int = 20, timeout: float = 30.0) -> list[float]:
        """Latencies of reading the room's log over REST (the HTTP side)."""
        out: list[float] = []
        path = f"/v1/rooms/{self.room.id.hex()}/events"
        for _ in range(n):
            started = time.monotonic()
            try:
                # Reading the log is for members only: unsigned, every probe would be a 401.
                headers = signed_headers(self.key, self.relay.origin, "GET", path)
                r = await self.http.get(path, headers=headers, timeout=timeout)
                out.append(time.monotonic() - started if r.status_code == 200 else timeout)
            except httpx.HTTPError:
                out.append(timeout)
        return out

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        await self.http.aclose()


def assert_holds(base: list[float], during: list[float], what: str = "send") -> None:
    bound = max(SLOWDOWN * p99(base), FLOOR)
    # Shown with -s: the figures for the closing note of each attack.
    print(f"honest {what} p99 {p99(base) * 1000:.0f} -> {p99(during) * 1000:.0f} ms")
    assert p99(during) <= bound, (
        f"honest {what} p99 {p99(during) * 1000:.0f} ms during the attack, "
        f"bound {bound * 1000:.0f} ms (no-attack p99 {p99(base) * 1000:.1f} ms)"
    )


class Attacker:
    """``python -m tests.dos.attacks NAME`` against the relay, for ``seconds``.

    The attack prints one JSON object on its last line (what the relay answered);
    :meth:`report` waits for it."""

    def __init__(self, name: str, relay: DosRelay, seconds: float, **params: Any) -> None:
        args = {
            "url": relay.url,
            "ws_url": relay.ws_url,
            "origin": relay.origin,
            "seconds": seconds,
            **params,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.dos.attacks", name, json.dumps(args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.seconds = seconds

    async def report(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            out, err = await loop.run_in_executor(
                None, lambda: self.proc.communicate(timeout=self.seconds + 60)
            )
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        assert self.proc.returncode == 0, err.decode(errors="replace")[-3000:]
        return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def attack(
    name: str, relay: DosRelay, seconds: float, **params: Any
) -> AsyncIterator[Attacker]:
    attacker = Attacker(name, relay, seconds, **params)
    try:
        yield attacker
    finally:
        attacker.stop()
