"""The backup and restore recipes of docs/operators.md §6, run for real."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from backchannel.server.config import Settings

from .conftest import BACKENDS, RelayFactory, empty_postgres
from .helpers import RelayServer, TestRoom, WSClient


async def conversation(relay: RelayServer, count: int) -> tuple[TestRoom, dict[int, bytes]]:
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    client = await WSClient.connect(relay, [room.facilitator])
    sent = {}
    for i in range(count):
        data = b"%d" % i + os.urandom(32)
        sent[(await client.send_msg(room.id, room.facilitator, data))["seq"]] = data
    await client.close()
    return room, sent


async def history(relay: RelayServer, room: TestRoom, count: int) -> dict[int, bytes]:
    client = await WSClient.connect(relay, [room.facilitator])
    await client.send_frame("sub", room=room.id, after=0)
    got = {}
    for _ in range(count):
        msg = await client.expect("msg")
        got[msg["seq"]] = msg["data"]
    await client.expect("synced")
    await client.close()
    return got


@pytest.mark.parametrize("tool", ["sqlite3", "python"])
async def test_sqlite_online_backup_and_restore(tmp_path: Path, tool: str) -> None:
    live = tmp_path / "live"
    relay = RelayServer(Settings(data_dir=live)).start()
    backup = tmp_path / "backup.db"
    try:
        room, sent = await conversation(relay, 12)
        # Online: the relay keeps running (and its WAL holds the newest commits).
        if tool == "sqlite3":
            if shutil.which("sqlite3") is None:
                pytest.skip("the sqlite3 tool is not installed")
            subprocess.run(["sqlite3", str(live / "relay.db"), f".backup '{backup}'"], check=True)
        else:
            with sqlite3.connect(live / "relay.db") as src, sqlite3.connect(backup) as dst:
                src.backup(dst)
    finally:
        await relay.astop()
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(backup, restored / "relay.db")
    relay = RelayServer(Settings(data_dir=restored)).start()
    try:
        assert await history(relay, room, 12) == sent
    finally:
        await relay.astop()


@pytest.fixture(params=[BACKENDS[1]])  # the PostgreSQL recipe (the SQLite one is above)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_postgres_dump_and_restore(
    relay_factory: RelayFactory, database_url: str, tmp_path: Path
) -> None:
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.skip("pg_dump / pg_restore are not installed")
    relay = relay_factory()
    room, sent = await conversation(relay, 8)
    url = make_url(database_url)
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    dump = tmp_path / "relay.dump"
    subprocess.run(
        ["pg_dump", "--format=custom", f"--dbname={libpq}", f"--file={dump}"],
        check=True,
        capture_output=True,
    )
    await relay.astop()
    # Disaster: everything is gone. Restore into the (emptied) database.
    await empty_postgres(database_url)
    subprocess.run(
        ["pg_restore", "--clean", "--if-exists", "--no-owner", f"--dbname={libpq}", str(dump)],
        check=True,
        capture_output=True,
    )
    again = relay_factory()
    assert await history(again, room, 8) == sent
