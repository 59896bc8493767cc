"""Shared pieces for the fault tests: a ``backchannel-relay serve`` process that can be
SIGKILLed and restarted on the same port and data directory, client profiles made
through the real client library, and a look into the relay's SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import httpx

from backchannel.client.core import Client, Room
from backchannel.client.store import Store
from backchannel.protocol import primitives as P
from backchannel.protocol.envelope import RoomEnvelope

RELAY = str(Path(sys.executable).with_name("backchannel-relay"))
FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
SOAK = os.environ.get("BACKCHANNEL_SOAK") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess:
    """``backchannel-relay serve`` on 127.0.0.1:port over ``data_dir``; kill -9 and restart."""

    def __init__(self, tmp_path: Path, **settings: str) -> None:
        self.port = free_port()
        self.data_dir = tmp_path / "relay-data"
        self.logs = tmp_path / "relay-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_RELAY_")}
        self.env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
        self.env["BACKCHANNEL_RELAY_ADMIN_PORT"] = "0"  # relays run side by side
        self.env.update({f"BACKCHANNEL_RELAY_{k.upper()}": v for k, v in settings.items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "relay.db"

    def start(self, timeout: float = 20) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        # Logs go to a file: a pipe nobody reads would fill and stall the relay.
        with open(self.logs / f"stderr-{self.starts}.log", "wb") as err:
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
                stderr=err,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited: {self.stderr(self.starts)}")
            assert time.monotonic() < deadline, "relay did not become ready"
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stderr(self, n: int) -> str:
        return (self.logs / f"stderr-{n}.log").read_text(errors="replace")[-4000:]

    def all_stderr(self) -> str:
        return "".join(self.stderr(n) for n in range(1, self.starts + 1))


def new_client(home: Path, relay_url: str, name: str) -> Client:
    store = Store.create(home, "pw", **FAST)
    Client.init_profile(store, relay_url, name)
    return Client(store)


def my_sent(client: Client, room: Room) -> list[str]:
    """What this client sealed into the room, in sealing order (its own transcript)."""
    return [line.text for line in client.lines(room) if line.kind == "message" and line.mine]


def heard_from(client: Client, room: Room, sender: bytes) -> list[str]:
    return [
        line.text
        for line in client.lines(room)
        if line.kind == "message" and line.sender == sender and not line.mine
    ]


def warnings(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "warning"]


def stored_envelopes(db: Path) -> list[tuple[int, bytes, bytes, bytes]]:
    """(seq, sender, client_id, data) of every stored room message, read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT seq, sender, client_id, data FROM room_messages ORDER BY room_id, seq"
        ).fetchall()
    finally:
        conn.close()
    return [(int(s), bytes(a), bytes(c), bytes(d)) for s, a, c, d in rows]


def key_reuse(datas: Iterable[bytes]) -> dict[tuple[bytes, int, int], int]:
    """(sender, generation, index) slots used by more than one distinct ciphertext."""
    seen: dict[tuple[bytes, int, int], set[bytes]] = defaultdict(set)
    for data in datas:
        env = RoomEnvelope.from_bytes(data)
        seen[(env.sender, env.generation, env.index)].add(env.ciphertext)
    return {slot: len(cts) for slot, cts in seen.items() if len(cts) > 1}
