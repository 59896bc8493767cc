"""Fixtures for scale-out tests: several relay instances on 127.0.0.1 sharing one
PostgreSQL database and one Redis, and a private ``redis-server`` that a test may
kill and restart (the shared Redis is never touched: each test uses its own
channel on it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from backchannel.server import logging as relay_logging
from backchannel.server.config import CONFIG_ENV, Settings
from tests.server.conftest import LOG_STREAM, empty_postgres
from tests.server.helpers import POSTGRES_ENV, FakeClock, RelayServer, wait_until

REDIS_ENV = "BACKCHANNEL_TEST_REDIS_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _relay_logging() -> None:
    """Relay logs go to the same in-memory stream as in tests/server (checked for leaks)."""
    for name in list(os.environ):
        if name.startswith("BACKCHANNEL_RELAY_") or name == CONFIG_ENV:
            del os.environ[name]
    relay_logging.configure("info", LOG_STREAM)


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_ENV} to run the scale-out tests")
    return url


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get(REDIS_ENV)
    if not url:
        pytest.skip(f"set {REDIS_ENV} to run the scale-out tests")
    return url


class PrivateRedis:
    """A throw-away ``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None:
        server.kill()


Cluster = Callable[..., RelayServer]


@pytest.fixture
async def cluster(postgres_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """``cluster(**overrides)`` starts one more relay instance on the shared database."""
    await empty_postgres(postgres_url)
    channel = f"backchannel:test:{uuid.uuid4().hex}"
    started: list[RelayServer] = []

    def start(clock: FakeClock | None = None, **overrides: Any) -> RelayServer:
        values: dict[str, Any] = {
            "data_dir": tmp_path,
            "database_url": postgres_url,
            "redis_url": redis_url,
            "redis_channel": channel,
            "catch_up_interval_seconds": 30.0,
            "rate_burst": 1000,
            "key_burst": 1000,
            "frame_burst": 1000,
            "max_inflight_writes": 1000,
            "frame_rate_per_second": 1000,
            "key_messages_per_second": 1000,
            "rate_messages_per_second": 1000.0,
        }
        values.update(overrides)
        relay = RelayServer(Settings(**values), clock).start()
        started.append(relay)
        wait_until(lambda: relay.app.state.fanout.available, timeout=10)
        return relay

    yield start
    for relay in started:
        if relay.thread.is_alive():
            await relay.astop()
    for relay in started:
        assert relay.app.state.internal_errors == 0, "a relay answered a 500 / crashed"
