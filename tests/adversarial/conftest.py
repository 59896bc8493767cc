"""Fixtures: a malicious relay (the real one behind a tampering layer) and people
running the real client library against it, all sharing one fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backchannel.server.config import Settings
from tests.adversarial.malicious import MaliciousRelay, Tamper
from tests.client.helpers import People
from tests.server.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tamper() -> Tamper:
    return Tamper()


@pytest.fixture
def relay(tmp_path: Path, clock: FakeClock, tamper: Tamper) -> Iterator[MaliciousRelay]:
    server = MaliciousRelay(
        Settings(data_dir=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db"),
        tamper,
        clock,
    ).start()
    yield server
    server.stop()


@pytest.fixture
async def people(tmp_path: Path, relay: MaliciousRelay, clock: FakeClock) -> AsyncIterator[People]:
    out = People(tmp_path, relay, clock)
    yield out
    await out.close()
