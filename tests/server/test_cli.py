"""``backchannel-relay`` as a process: serve, SIGKILL and restart, purge, stats, tokens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backchannel.protocol import roomlog
from backchannel.protocol.keys import MemberKeyPair
from backchannel.server.config import Settings

from .helpers import RelayServer, TestRoom, WSClient, b64e, now

RELAY = str(Path(sys.executable).with_name("backchannel-relay"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_RELAY_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env["BACKCHANNEL_RELAY_ADMIN_PORT"] = "0"  # tests run side by side
    env.update(extra)
    return env


class Served:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [RELAY, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"no URL printed: {line!r} {self.proc.stderr.read()!r}")
        self.url = match.group(1)
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "relay did not answer"
            time.sleep(0.05)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    running: list[Served] = []
    yield running
    for s in running:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


class _Relay:
    """Enough of RelayServer for WSClient: a URL and an origin."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws_url = url.replace("http://", "ws://") + "/v1/ws"
        self.origin = url


async def test_sigkill_loses_nothing_acknowledged(tmp_path: Path, served: list[Served]) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    args = ["--port", str(port), "--data-dir", str(data_dir)]
    first = Served(args, env_for(tmp_path))
    served.append(first)
    assert first.url == f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=first.url) as http:
        room = await TestRoom.create(http)
    client = await WSClient.connect(_Relay(first.url), [room.facilitator])  # type: ignore[arg-type]
    sent: dict[bytes, bytes] = {}
    for i in range(30):
        cid = os.urandom(16)
        sent[cid] = b"msg %d " % i + os.urandom(32)
        await client.send_frame(
            "send", room=room.id, from_=room.facilitator.public.sign, cid=cid, data=sent[cid]
        )
    acked: dict[int, bytes] = {}
    for cid, data in sent.items():
        ack = await client.expect_reply("sent", cid)
        acked[ack["seq"]] = data
    first.kill9()  # no chance to flush anything
    second = Served(args, env_for(tmp_path))
    served.append(second)
    client = await WSClient.connect(_Relay(second.url), [room.facilitator])  # type: ignore[arg-type]
    await client.send_frame("sub", room=room.id, after=0)
    got = {}
    for _ in range(len(acked)):
        msg = await client.expect("msg")
        got[msg["seq"]] = msg["data"]
    assert got == acked
    assert sorted(got) == list(range(1, 31))
    await client.close()
    err = second.stop()
    assert "127.0.0.1" not in err


def test_serve_defaults_to_loopback_and_data_dir(tmp_path: Path, served: list[Served]) -> None:
    s = Served(["--port", "0"], env_for(tmp_path))
    served.append(s)
    assert s.url.startswith("http://127.0.0.1:")
    assert (tmp_path / "xdg" / "backchannel-relay" / "relay.db").exists()
    s.stop()


def test_serve_with_config_file(tmp_path: Path, served: list[Served]) -> None:
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'port = {port}\ndata_dir = "{tmp_path / "cfg"}"\nmax_message_bytes = 4096\n')
    s = Served(["--config", str(config)], env_for(tmp_path))
    served.append(s)
    assert s.url == f"http://127.0.0.1:{port}"
    assert (tmp_path / "cfg" / "relay.db").exists()
    s.stop()


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RELAY, *args], capture_output=True, text=True, env=env_for(tmp_path, **env), timeout=60
    )


def test_bad_option_is_one_clear_line(tmp_path: Path) -> None:
    r = run_cli(tmp_path, "serve", "--port", "99999")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path, "serve", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode != 0
    assert "error:" in r.stderr
    assert "Traceback" not in r.stderr


async def test_token_purge_and_stats(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    r = run_cli(tmp_path, "admin", "token", "create", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("bct_")
    assert "hint:" in r.stderr

    settings = Settings(data_dir=data_dir, creation_policy="token", purge_interval_seconds=3600)
    relay = RelayServer(settings).start()
    try:
        async with httpx.AsyncClient(base_url=relay.url) as http:
            # Retention well above the minute that coarse times may cut it short by
            # (docs/relay-api.md, Retention), so the first purge never deletes.
            room = await TestRoom.create(http, token=token, retention=600)
            other = roomlog.make_create(MemberKeyPair.generate(), roomlog.Rules(), now())
            r2 = await http.post("/v1/rooms", json={"event": b64e(other), "token": token})
            assert r2.status_code == 403
        client = await WSClient.connect(relay, [room.facilitator])
        for i in range(4):
            await client.send_msg(room.id, room.facilitator, b"%d" % i)
        await client.close()
    finally:
        await relay.astop()

    r = run_cli(tmp_path, "admin", "stats", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    stats = dict(line.split(": ") for line in r.stdout.strip().splitlines())
    assert stats["rooms"] == "1"
    assert stats["room_messages"] == "4"
    assert int(stats["bytes"]) > 0
    assert room.id.hex() not in r.stdout + r.stderr
    assert not re.search(r"[0-9a-f]{16}", r.stdout)

    r = run_cli(tmp_path, "purge", "--data-dir", str(data_dir))
    assert r.returncode == 0
    assert "room_messages: 0" in r.stdout

    # Age the messages by hand, as if twenty minutes had passed.
    import sqlite3

    with sqlite3.connect(data_dir / "relay.db") as db:
        db.execute("UPDATE room_messages SET created_at = created_at - 1200")
    r = run_cli(tmp_path, "purge", "--data-dir", str(data_dir))
    assert r.returncode == 0
    assert "room_messages: 4" in r.stdout


def _at_baseline(db: Path) -> None:
    """A database left at revision 0001 (as an older relay would leave it)."""
    import asyncio

    from backchannel.server.migrate import BASELINE, upgrade
    from backchannel.server.storage import make_engine

    async def run() -> None:
        engine = make_engine(f"sqlite+aiosqlite:///{db}")
        await upgrade(engine, BASELINE)
        await engine.dispose()

    asyncio.run(run())


def test_serve_refuses_schema_behind_then_migrate_fixes_it(
    tmp_path: Path, served: list[Served]
) -> None:
    from backchannel.server.migrate import BASELINE, head_revision

    data_dir = tmp_path / "data"
    _at_baseline(data_dir / "relay.db")
    r = run_cli(tmp_path, "serve", "--port", "0", "--data-dir", str(data_dir))
    assert r.returncode != 0
    assert r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "behind" in errors[0]
    assert "backchannel-relay migrate" in errors[0]
    assert "Traceback" not in r.stderr
    # admin commands refuse too, rather than touching an old schema
    assert run_cli(tmp_path, "admin", "stats", "--data-dir", str(data_dir)).returncode != 0

    r = run_cli(tmp_path, "migrate", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"schema migrated: {BASELINE} -> {head_revision()}"
    r = run_cli(tmp_path, "migrate", "--data-dir", str(data_dir))
    assert r.stdout.strip() == f"schema already current ({head_revision()})"
    s = Served(["--port", "0", "--data-dir", str(data_dir)], env_for(tmp_path))
    served.append(s)
    assert httpx.get(f"{s.url}/readyz").status_code == 200
    s.stop()


def test_serve_migrate_flag_and_setting(tmp_path: Path, served: list[Served]) -> None:
    for i, (args, env) in enumerate(
        [(["--migrate"], {}), ([], {"BACKCHANNEL_RELAY_AUTO_MIGRATE": "true"})]
    ):
        data_dir = tmp_path / f"data{i}"
        _at_baseline(data_dir / "relay.db")
        s = Served(["--port", "0", "--data-dir", str(data_dir), *args], env_for(tmp_path, **env))
        served.append(s)
        assert httpx.get(f"{s.url}/readyz").json()["checks"]["schema"] == "ok"
        s.stop()


def test_migrate_cannot_reach_database_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+asyncpg://relay:s3cret@127.0.0.1:{port}/relay"
    r = run_cli(tmp_path, "migrate", "--database-url", url)
    assert r.returncode != 0
    assert "cannot reach the database" in r.stderr
    assert "s3cret" not in r.stderr
    assert "Traceback" not in r.stderr
