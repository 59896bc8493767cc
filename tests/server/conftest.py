"""Fixtures for relay tests: a real uvicorn on 127.0.0.1 over SQLite, and over
PostgreSQL when BACKCHANNEL_TEST_POSTGRES_URL is set. Each test gets an empty
database (a new SQLite file; PostgreSQL's ``public`` schema dropped and made
again), which the relay initialises at start-up by running the real Alembic
migrations, exactly as on a fresh install."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from backchannel.server import logging as relay_logging
from backchannel.server.config import CONFIG_ENV, Settings
from backchannel.server.migrate import upgrade
from backchannel.server.storage import Store, make_engine

from .helpers import POSTGRES_ENV, FakeClock, RelayServer

LOG_STREAM = io.StringIO()

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=pytest.mark.skipif(
            not os.environ.get(POSTGRES_ENV),
            reason=f"set {POSTGRES_ENV} to run the relay tests on PostgreSQL too",
        ),
    ),
]


@pytest.fixture(scope="session", autouse=True)
def _relay_logging() -> None:
    for name in list(os.environ):
        if name.startswith("BACKCHANNEL_RELAY_") or name == CONFIG_ENV:
            del os.environ[name]
    relay_logging.configure("info", LOG_STREAM)


async def fresh_database(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    url = os.environ[POSTGRES_ENV]
    await empty_postgres(url)
    return url


async def empty_postgres(url: str) -> None:
    """Drop everything in the test database (tables, alembic_version, sequences)."""
    engine = make_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


RelayFactory = Callable[..., RelayServer]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, tmp_path: Path) -> str:
    return await fresh_database(backend, tmp_path)


@pytest.fixture
async def relay_factory(database_url: str, tmp_path: Path) -> AsyncIterator[RelayFactory]:
    started: list[RelayServer] = []

    def make(clock: FakeClock | None = None, **overrides: Any) -> RelayServer:
        settings = Settings(data_dir=tmp_path, database_url=database_url, **overrides)
        relay = RelayServer(settings, clock).start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        await relay.astop()
    for relay in started:
        assert relay.app.state.internal_errors == 0, "the relay answered a 500 / crashed"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """The relay's storage alone, migrated, on an empty database."""
    engine = make_engine(database_url)
    await upgrade(engine)
    store = Store(engine, batch_window=0, batch_max=256)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
def relay(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory()


@pytest.fixture
async def http(relay: RelayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
        yield client
