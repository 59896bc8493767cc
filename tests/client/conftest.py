"""Fixtures for client-library tests: a real relay on 127.0.0.1 sharing a fake
clock with the clients, and a factory of people (profiles)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backchannel.server.config import Settings
from tests.client.helpers import People
from tests.server.helpers import FakeClock, RelayServer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def relay(tmp_path: Path, clock: FakeClock) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(data_dir=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db"),
        clock,
    ).start()
    yield server
    server.stop()


@pytest.fixture
async def people(tmp_path: Path, relay: RelayServer, clock: FakeClock) -> AsyncIterator[People]:
    out = People(tmp_path, relay, clock)
    yield out
    await out.close()
