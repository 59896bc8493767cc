"""Issue 12, point 7: the relay's disk full.

The relay runs as its own process; the test lowers that process's ``RLIMIT_FSIZE`` to 0
(``prlimit``), after which the kernel refuses every write that would put a byte into a
regular file, as a full file system refuses to allocate one, and raises it again to
"free space". That is the whole effect: no mount, no file actually filled, nothing
outside the one process touched, and it undoes exactly. (A tiny file system needs a
mount; SQLite's ``PRAGMA max_page_count`` only stops the database growing, so writes that
fit in free pages still succeed and whether a given write fails depends on the page
layout.) Python ignores ``SIGXFSZ``, so the relay sees the writes fail (``EFBIG``) rather
than being killed; its log goes to a pipe, which the limit does not cover, so nothing the
relay logs meanwhile is lost.

While the "disk" is full: every send is answered ``storage_unavailable`` within a second,
REST writes ``503 storage_unavailable``, ``/readyz`` 503 (reads still work); nothing is
logged as a traceback. After: ready again, writes go through, and every acknowledged
message is still there.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from backchannel.protocol import roomlog
from tests.dos.harness import DosRelay
from tests.server.helpers import TestRoom, WSClient, b64e, now

from .procs import RELAY

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="prlimit on another process is Linux-only"
)


class PipedRelay(DosRelay):
    """A relay process whose log goes to a pipe (regular files are what the limit stops)."""

    def start(self, timeout: float = 20) -> None:
        self.starts += 1
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                RELAY,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        stream = self.proc.stderr
        assert stream is not None
        threading.Thread(
            target=lambda: self.lines.extend(line.decode(errors="replace") for line in stream),
            daemon=True,
        ).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, "relay did not become ready"
            time.sleep(0.05)

    def all_stderr(self) -> str:
        return "".join(self.lines)

    def file_size_limit(self, soft: int) -> None:
        assert self.proc is not None
        _, hard = resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))


async def test_full_disk_answers_at_once_and_recovers(tmp_path: Path) -> None:
    relay = PipedRelay(tmp_path)
    relay.start()
    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=20) as http:
            room = await TestRoom.create(http)
            client = await WSClient.connect(relay, [room.facilitator])  # type: ignore[arg-type]
            await client.send_frame("sub", room=room.id, after=0)
            await client.expect("synced", timeout=10)
            acked: dict[int, bytes] = {}

            async def send(data: bytes) -> tuple[dict[str, object], float]:
                started = time.monotonic()
                reply = await client.send_msg(room.id, room.facilitator, data)
                if reply["t"] == "sent":
                    acked[int(reply["seq"])] = data  # type: ignore[call-overload]
                return reply, time.monotonic() - started

            for i in range(5):
                assert (await send(b"before %d" % i))[0]["t"] == "sent"
            event, _ = roomlog.make_invite(
                room.facilitator, room.state, "participant", now() + 3600, 1, now()
            )
            relay.file_size_limit(0)
            try:
                answers = [await send(os.urandom(16 * 1024)) for _ in range(6)]
                started = time.monotonic()
                rest = await http.post(
                    f"/v1/rooms/{room.id.hex()}/events", json={"event": b64e(event)}
                )
                rest_took = time.monotonic() - started
                ready = await http.get("/readyz")
            finally:
                relay.file_size_limit(resource.RLIM_INFINITY)
            print(
                [(a.get("code", a["t"]), round(t * 1000)) for a, t in answers],
                "rest",
                rest.status_code,
                round(rest_took * 1000),
                "readyz",
                ready.status_code,
                ready.json().get("checks"),
            )
            for reply, took in answers:
                assert reply.get("code") == "storage_unavailable", reply
                assert took < 1.0, f"answered after {took:.1f} s"
            assert rest.status_code == 503, rest.text
            assert rest.json()["error"]["code"] == "storage_unavailable"
            assert rest_took < 1.0
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["database"] == "writes_failing"
            # Space again: ready within the probe interval, and writes go through.
            deadline = time.monotonic() + 5
            while (await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "not ready again after space came back"
                await asyncio.sleep(0.1)
            for i in range(5):
                assert (await send(b"after %d" % i))[0]["t"] == "sent"
            assert (await room.post(event)).status_code == 201
            await client.close()
            reader = await WSClient.connect(relay, [room.facilitator])  # type: ignore[arg-type]
            await reader.send_frame("sub", room=room.id, after=0)
            synced = await reader.expect("synced", room=room.id, timeout=10)
            got: dict[int, bytes] = {}
            while len(got) < synced["seq"]:
                msg = await reader.expect("msg", room=room.id, timeout=10)
                got[msg["seq"]] = msg["data"]
            await reader.close()
            assert {seq: got.get(seq) for seq in acked} == acked
    finally:
        relay.stop()
    log = relay.all_stderr()
    assert "Traceback" not in log, log[-3000:]
    assert "storage.writes_failing" in log
    assert "storage.writes_recovered" in log
