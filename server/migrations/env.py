"""Alembic environment for the relay (async engines: aiosqlite, asyncpg).

Normally run through :mod:`backchannel.server.migrate`, which hands over an open
connection in ``config.attributes["connection"]``. Run by the ``alembic``
command itself, it opens the relay's own engine for ``sqlalchemy.url``.
SQLite gets batch mode (it cannot ALTER most things in place); PostgreSQL
takes a transaction-scoped advisory lock first, so two instances migrating at
once run one after the other instead of colliding.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import text

from backchannel.server.storage import make_engine
from backchannel.server.storage.models import Base

#: Arbitrary constant: the advisory-lock key for "a relay is migrating".
MIGRATION_LOCK = 0x6263_7265_6C61_79  # "bcrelay"

config = context.config
target_metadata = Base.metadata


def run_on(connection: Any) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        context.run_migrations()


async def run_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        async with engine.connect() as conn:
            await conn.run_sync(run_on)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    run_on(connection)
else:
    asyncio.run(run_online())
