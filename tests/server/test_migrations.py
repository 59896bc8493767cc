"""Alembic migrations on SQLite and PostgreSQL, and the start-up schema policy."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from backchannel.server.config import Settings
from backchannel.server.migrate import (
    BASELINE,
    SchemaNotCurrent,
    ensure_schema,
    head_revision,
    schema_state,
    upgrade,
)
from backchannel.server.storage import make_engine
from backchannel.server.storage.models import Base

from .conftest import BACKENDS, RelayFactory
from .helpers import RelayServer, TestRoom


def _diff(conn: Any) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


async def test_migrations_build_exactly_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert (await schema_state(engine)).status == "empty"
        await upgrade(engine)  # the real revisions, from nothing
        state = await schema_state(engine)
        assert (state.status, state.revision) == ("current", head_revision())
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        await upgrade(engine)  # idempotent
        assert (await schema_state(engine)).status == "current"
    finally:
        await engine.dispose()


async def test_behind_is_refused_unless_opted_in(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await upgrade(engine, BASELINE)
        state = await schema_state(engine)
        assert (state.status, state.revision) == ("behind", BASELINE)
        with pytest.raises(SchemaNotCurrent, match="backchannel-relay migrate"):
            await ensure_schema(engine, auto_migrate=False)
        assert (await ensure_schema(engine, auto_migrate=True)).status == "current"
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert "schema_info" not in tables  # revision 0002 ran
    finally:
        await engine.dispose()


async def test_database_from_before_migrations_is_upgraded(database_url: str) -> None:
    """Issue #3 made tables with create_all and no alembic_version: stamped, then upgraded."""
    engine = make_engine(database_url)
    try:
        await upgrade(engine, BASELINE)
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE alembic_version"))
        state = await schema_state(engine)
        assert (state.status, state.revision) == ("behind", None)
        await upgrade(engine)
        assert (await schema_state(engine)).status == "current"
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_relay_refuses_a_database_behind_it(database_url: str, tmp_path: Path) -> None:
    engine = make_engine(database_url)
    await upgrade(engine, BASELINE)
    await engine.dispose()
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    with pytest.raises(RuntimeError, match="did not start"):
        RelayServer(settings).start()
    relay = RelayServer(settings.model_copy(update={"auto_migrate": True})).start()
    try:
        async with httpx.AsyncClient(base_url=relay.url) as http:
            assert (await http.get("/readyz")).json()["checks"]["schema"] == "ok"
            await TestRoom.create(http)
    finally:
        await relay.astop()


async def test_readyz_reports_a_schema_that_moved_on(relay_factory: RelayFactory) -> None:
    relay = relay_factory()
    async with httpx.AsyncClient(base_url=relay.url) as http:
        r = await http.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {
            "status": "ok",
            "checks": {"database": "ok", "schema": "ok", "fanout": "off"},
        }

        async def set_revision(value: str) -> None:
            async with relay.store.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE alembic_version SET version_num = :v"), {"v": value}
                )

        # A newer relay migrated the shared database: this one is no longer ready.
        relay.call(set_revision("9999"))
        r = await http.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["schema"] == "ahead"
        assert "schema ahead" in r.json()["error"]["detail"]
        relay.call(set_revision(BASELINE))
        r = await http.get("/readyz")
        assert (r.status_code, r.json()["checks"]["schema"]) == (503, "behind")
        relay.call(set_revision(head_revision()))
        assert (await http.get("/readyz")).status_code == 200


@pytest.mark.parametrize("backend", [BACKENDS[1]])  # SQLite is one process by design
async def test_concurrent_migrators_on_postgres_serialise(database_url: str) -> None:
    """Three `backchannel-relay migrate` processes at once on an empty PostgreSQL database
    (as when instances start together): the advisory lock makes them take turns."""
    relay = str(Path(sys.executable).with_name("backchannel-relay"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKCHANNEL_RELAY_")}
    procs = [
        await asyncio.create_subprocess_exec(
            relay,
            "migrate",
            "--database-url",
            database_url,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    said = sorted(out.decode().strip() for out, _ in outs)
    head = head_revision()
    assert (
        said.count(f"schema migrated: none -> {head}")
        + said.count(f"schema already current ({head})")
        == 3
    )
    engine = make_engine(database_url)
    try:
        assert (await schema_state(engine)).status == "current"
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()
