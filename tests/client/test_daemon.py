"""The daemon, as a real ``backchannel daemon`` process on a real relay: JSON-RPC on a
private Unix socket, pipelined sends, a stream of lines, hostile requests refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backchannel.client.core import Client
from backchannel.client.rpc import DaemonClient
from backchannel.client.rpcwire import socket_path
from backchannel.client.store import Store
from backchannel.protocol import roomlog as L
from backchannel.server.config import Settings
from tests.client.helpers import FAST
from tests.server.helpers import RelayServer

PASS = "pw"


@pytest.fixture
def relay(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RelayServer]:
    # One script sending hundreds at once: past the defaults meant for people,
    # except where a test keeps the defaults (`@pytest.mark.default_limits`).
    fast = {
        "rate_messages_per_second": 10_000,
        "rate_burst": 10_000,
        "key_messages_per_second": 10_000,
        "key_burst": 10_000,
        "frame_rate_per_second": 10_000,
        "frame_burst": 10_000,
    }
    defaults = request.node.get_closest_marker("default_limits") is not None
    server = RelayServer(
        Settings(
            data_dir=tmp_path / "relay",
            database_url=f"sqlite+aiosqlite:///{tmp_path}/r.db",
            **({} if defaults else fast),
        )
    ).start()
    yield server
    server.stop()


def _open(home: Path) -> Client:
    return Client(Store.open(home, PASS))


async def _close(*clients: Client) -> None:
    for c in clients:
        await c.aclose()
        c.store.close()


async def _online(c: Client) -> None:
    rooms = [r for r in c.rooms() if r.status == "active"]
    async with c.connect(rooms) as sock:
        await c.pump(sock, rooms, idle=0.05)
        for r in rooms:
            await c.retry_stash(r)


@dataclass
class Dialogue:
    fac: Path
    ann: Path
    room: str  # the facilitator's local name of the room


@pytest.fixture
async def dialogue(tmp_path: Path, relay: RelayServer) -> Dialogue:
    homes = {}
    clients = {}
    for name in ("fac", "ann"):
        homes[name] = tmp_path / name
        store = Store.create(homes[name], PASS, **FAST)
        Client.init_profile(store, relay.url, name.title())
        clients[name] = Client(store)
    fac, ann = clients["fac"], clients["ann"]
    room = await fac.create_room("Water talks", L.Rules(mode="chatham"))
    code = await fac.invite(room, "participant", 3600, 1)
    await ann.join(code, accept_rules=lambda rules: True)
    for c in (fac, ann, fac, ann):
        await _online(c)
    await _close(fac, ann)
    return Dialogue(homes["fac"], homes["ann"], room.name)


class DaemonProcess:
    def __init__(self, home: Path) -> None:
        self.home = home
        env = {**os.environ, "BACKCHANNEL_HOME": str(home), "BACKCHANNEL_PASSPHRASE": PASS}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backchannel.client", "daemon"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            found = DaemonClient.connect(home, timeout=30)
            if found is not None:
                found.close()
                return
            time.sleep(0.05)
        raise AssertionError("the daemon did not start")

    def client(self) -> DaemonClient:
        found = DaemonClient.connect(self.home, timeout=30)
        assert found is not None
        return found

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        _out, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.stop()


def start(daemons: list[DaemonProcess], home: Path) -> DaemonProcess:
    d = DaemonProcess(home)
    daemons.append(d)
    return d


def raw(home: Path, data: bytes) -> list[dict[str, object]]:
    """Send raw bytes on the daemon's socket; the answers that came back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(socket_path(home)))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading: what it answered is still there
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return [json.loads(line) for line in b"".join(chunks).splitlines() if line.strip()]


# --- tests ---------------------------------------------------------------------------------


async def test_sends_through_the_daemon_reach_the_other_member_in_order(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    d = start(daemons, dialogue.fac)
    with d.client() as rpc:
        sent = [rpc.call("send", room=dialogue.room, text=f"point {i}") for i in range(40)]
        mine = rpc.call("read", room=dialogue.room)
    ids = [s["id"] for s in sent]
    assert len(set(ids)) == 40
    assert all(len(i) == 32 for i in ids)
    # What the daemon shows as ours carries the ids it answered with.
    assert [e["id"] for e in mine if e["kind"] == "message"] == ids
    d.stop()
    ann = _open(dialogue.ann)
    try:
        await _online(ann)
        room = ann.rooms()[0]
        heard = [line.text for line in ann.lines(room) if line.kind == "message"]
    finally:
        await _close(ann)
    assert heard == [f"point {i}" for i in range(40)]


async def test_many_sends_in_flight_at_once_are_all_stored_once(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    start(daemons, dialogue.fac)

    async def pipelined() -> list[dict[str, object]]:
        reader, writer = await asyncio.open_unix_connection(str(socket_path(dialogue.fac)))
        for i in range(300):
            req = {"jsonrpc": "2.0", "id": i, "method": "send",
                   "params": {"room": dialogue.room, "text": f"m{i}"}}
            writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        answers = [json.loads(await reader.readline()) for _ in range(300)]
        writer.close()
        return answers

    answers = await pipelined()
    assert sorted(a["id"] for a in answers) == list(range(300))
    assert all("result" in a for a in answers), [a for a in answers if "error" in a][:3]
    daemons[0].stop()
    ann = _open(dialogue.ann)
    try:
        await _online(ann)
        room = ann.rooms()[0]
        heard = [line.text for line in ann.lines(room) if line.kind == "message"]
    finally:
        await _close(ann)
    # Sealed in the order they were asked for; none lost, none twice.
    assert heard == [f"m{i}" for i in range(300)]


async def test_subscribe_streams_lines_with_the_documented_schema(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    d = start(daemons, dialogue.ann)
    rpc = d.client()
    try:
        assert rpc.call("subscribe") == {"subscribed": True}
        fac = _open(dialogue.fac)
        try:
            room = fac.rooms()[0]
            async with fac.connect([room]) as sock:
                await fac.pump(sock, [room], idle=0.05)
                await fac.send_text(sock, room, "the dam figures")
            me = room.state.members[room.me].key.fingerprint().hex()
        finally:
            await _close(fac)
        stream = rpc.notifications()
        event = next(e for e in stream if e["kind"] == "message")
    finally:
        rpc.close()
    assert event["text"] == "the dam figures"
    assert event["fingerprint"] == me
    assert event["room"] == room.room_id.hex()
    assert event["mine"] is False
    assert event["from"] == "Fac"
    assert isinstance(event["ts"], int)
    assert isinstance(event["n"], int)
    assert set(event) >= {"schema", "id", "kind", "room", "fingerprint", "ts", "text"}


def test_the_socket_is_private(dialogue: Dialogue, daemons: list[DaemonProcess]) -> None:
    start(daemons, dialogue.fac)
    path = socket_path(dialogue.fac)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_hostile_requests_get_errors_and_the_daemon_stays_up(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    d = start(daemons, dialogue.fac)
    garbage = b"".join(
        [
            b"not json\n",
            b"[" * 100_000 + b"\n",  # deeper than any parser should follow
            b'{"jsonrpc": "2.0", "id": 1, "method": "nope"}\n',
            b'{"jsonrpc": "2.0", "id": 2, "method": "send", "params": {"room": 5}}\n',
            b'{"jsonrpc": "2.0", "id": 3, "method": "send", "params": []}\n',
            b'{"jsonrpc": "2.0", "id": [1], "method": "rooms"}\n',
            b'{"jsonrpc": "2.0", "id": 4, "method": "read", "params": {"room": "no such"}}\n',
            b'{"jsonrpc": "2.0", "id": 5, "method": "read", "params": {"room": null}}\n',
            # Valid JSON, but not text that can be encoded: refused, not a hung batch.
            f'{{"jsonrpc": "2.0", "id": 6, "method": "send", "params": {{"room": "{dialogue.room}",'
            f' "text": "a\\ud800"}}}}\n'.encode(),
            f'{{"jsonrpc": "2.0", "id": 7, "method": "read", "params": {{"room": "{dialogue.room}",'
            f' "limit": null}}}}\n'.encode(),
        ]
    )
    answers = raw(dialogue.fac, garbage)
    codes = [a["error"]["code"] for a in answers]  # type: ignore[index]
    assert codes == [-32700, -32700, -32601, -32602, -32602, -32600, 1, -32602, -32602, -32602]
    # A line past the bound ends that connection, not the daemon.
    answers = raw(dialogue.fac, b"x" * (2 << 20) + b"\n")
    assert answers
    assert answers[0]["error"]["code"] == -32600
    with d.client() as rpc:
        assert rpc.call("version")["schema"] == 1
        assert rpc.call("rooms")[0]["name"] == dialogue.room


def test_stop_command_ends_the_daemon_and_removes_its_socket(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    d = start(daemons, dialogue.fac)
    env = {**os.environ, "BACKCHANNEL_HOME": str(dialogue.fac)}
    env.pop("BACKCHANNEL_PASSPHRASE", None)
    done = subprocess.run(
        [sys.executable, "-m", "backchannel.client", "daemon", "--stop"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert d.proc.wait(timeout=30) == 0
    assert not socket_path(dialogue.fac).exists()


def cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command with no passphrase anywhere: only a daemon can answer it."""
    env = {k: v for k, v in os.environ.items() if k != "BACKCHANNEL_PASSPHRASE"}
    env["BACKCHANNEL_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "backchannel.client", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL,
    )


async def test_commands_use_the_daemon_without_a_passphrase(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    start(daemons, dialogue.fac)
    sent = cli(dialogue.fac, "send", dialogue.room, "through the daemon")
    assert sent.returncode == 0, sent.stderr
    mid = sent.stdout.strip()
    assert len(mid) == 32
    members = cli(dialogue.fac, "members", dialogue.room, "--json")
    assert members.returncode == 0, members.stderr
    assert {m["name"] for m in json.loads(members.stdout)} == {"Fac", "Ann"}
    rooms = cli(dialogue.fac, "rooms")
    assert rooms.returncode == 0
    assert rooms.stdout.startswith(dialogue.room)
    read = cli(dialogue.fac, "read", dialogue.room, "--json")
    assert read.returncode == 0, read.stderr
    ours = [json.loads(x) for x in read.stdout.splitlines()]
    assert [e["id"] for e in ours if e["kind"] == "message"] == [mid]
    # What the daemon does not serve says who holds the profile and how to stop it.
    held = subprocess.run(
        [sys.executable, "-m", "backchannel.client", "invite", dialogue.room],
        env={**os.environ, "BACKCHANNEL_HOME": str(dialogue.fac), "BACKCHANNEL_PASSPHRASE": PASS},
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )
    assert held.returncode != 0
    assert "held by `backchannel daemon`" in held.stderr
    assert "daemon --stop" in held.stderr
    # Without the daemon the same command needs the passphrase: it really was the daemon.
    daemons.pop().stop()
    assert cli(dialogue.fac, "members", dialogue.room).returncode != 0
    # The receiver's copy carries the same id as the sender's answer.
    ann = _open(dialogue.ann)
    try:
        await _online(ann)
        room = ann.rooms()[0]
        got = [line for line in ann.lines(room) if line.kind == "message"]
    finally:
        await _close(ann)
    assert [line.mid.hex() for line in got if line.mid] == [mid]


async def test_read_follow_streams_every_room_through_the_daemon(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    start(daemons, dialogue.ann)
    env = {k: v for k, v in os.environ.items() if k != "BACKCHANNEL_PASSPHRASE"}
    env["BACKCHANNEL_HOME"] = str(dialogue.ann)
    follower = subprocess.Popen(
        [sys.executable, "-m", "backchannel.client", "read", "--follow", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)  # subscribed (no room: nothing is read back first)
        fac = _open(dialogue.fac)
        try:
            room = fac.rooms()[0]
            async with fac.connect([room]) as sock:
                await fac.pump(sock, [room], idle=0.05)
                mid = await fac.send_text(sock, room, "seen by the follower")
        finally:
            await _close(fac)
        assert follower.stdout is not None
        deadline = time.monotonic() + 30
        event: dict[str, object] = {}
        while time.monotonic() < deadline:
            event = json.loads(follower.stdout.readline())
            if event["kind"] == "message":
                break
        assert event["text"] == "seen by the follower"
        assert event["id"] == mid.hex()
        assert event["room"] == room.room_id.hex()
    finally:
        follower.terminate()
        follower.wait(timeout=30)


async def test_read_follow_every_room_without_a_daemon(dialogue: Dialogue) -> None:
    """The same stream from the command alone (no daemon): one connection per relay."""
    env = {**os.environ, "BACKCHANNEL_HOME": str(dialogue.ann), "BACKCHANNEL_PASSPHRASE": PASS}
    follower = subprocess.Popen(
        [sys.executable, "-m", "backchannel.client", "read", "--follow"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(2.0)  # connected and caught up
        fac = _open(dialogue.fac)
        try:
            room = fac.rooms()[0]
            async with fac.connect([room]) as sock:
                await fac.pump(sock, [room], idle=0.05)
                await fac.send_text(sock, room, "heard without a daemon")
        finally:
            await _close(fac)
        assert follower.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "heard without a daemon" not in line:
            line = follower.stdout.readline()
        # Plain output names the room, since lines of every room interleave.
        assert line.startswith("[")
        assert "heard without a daemon" in line
    finally:
        follower.terminate()
        follower.wait(timeout=30)


@pytest.mark.default_limits
async def test_a_script_faster_than_the_relay_allows_is_paced_not_refused(
    dialogue: Dialogue, daemons: list[DaemonProcess]
) -> None:
    """At the relay's defaults (20 sends a second, a burst of 40) 120 pipelined sends
    all succeed, none queued for later, and arrive in the order they were asked for:
    the daemon keeps to the rate `/v1/limits` publishes instead of being refused."""
    start(daemons, dialogue.fac)

    async def pipelined() -> list[dict[str, object]]:
        reader, writer = await asyncio.open_unix_connection(str(socket_path(dialogue.fac)))
        for i in range(120):
            req = {"jsonrpc": "2.0", "id": i, "method": "send",
                   "params": {"room": dialogue.room, "text": f"p{i}"}}
            writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        answers = [json.loads(await reader.readline()) for _ in range(120)]
        writer.close()
        return answers

    answers = await asyncio.wait_for(pipelined(), 120)
    assert all("result" in a for a in answers), [a for a in answers if "error" in a][:3]
    assert not [a for a in answers if a["result"].get("queued")]  # type: ignore[union-attr]
    daemons[0].stop()
    ann = _open(dialogue.ann)
    try:
        await _online(ann)
        room = ann.rooms()[0]
        heard = [line.text for line in ann.lines(room) if line.kind == "message"]
        warned = [line.text for line in ann.lines(room) if line.kind == "warning"]
    finally:
        await _close(ann)
    assert heard == [f"p{i}" for i in range(120)]
    assert warned == []
