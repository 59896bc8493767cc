"""Schema migrations (Alembic) and the start-up schema check.

The scripts live in ``server/migrations`` and ship inside the package. The
relay never calls ``create_all``: every database, SQLite or PostgreSQL, is
built and upgraded by the same revisions, and ``alembic_version`` says where
it stands.

Start-up policy (``serve`` and :func:`backchannel.server.app.create_app`):

- ``current``: the database is at this code's head revision: start.
- ``empty``: no tables at all (a brand-new SQLite file, a new PostgreSQL
  database): there is nothing to lose, so it is initialised to head
  automatically. This keeps ``backchannel-relay serve`` a one-command start.
- ``behind``: tables exist at an older revision (or from before migrations,
  issue #3's ``create_all``): refuse to start and name ``backchannel-relay
  migrate``, unless ``auto_migrate`` (``serve --migrate``) is set.
- ``ahead``: the database was migrated by a newer relay: refuse to start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).with_name("migrations")
#: The revision that equals issue #3's ``create_all`` schema; a database with
#: tables but no ``alembic_version`` is stamped with it before upgrading.
BASELINE = "0001"

Status = Literal["current", "empty", "behind", "ahead"]


def alembic_config(url: str = "") -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


@dataclass(frozen=True, slots=True)
class SchemaState:
    status: Status
    revision: str | None
    head: str

    def describe(self) -> str:
        at = self.revision or "unversioned"
        return {
            "current": f"schema is current ({self.head})",
            "empty": "the database is empty",
            "behind": f"the database schema ({at}) is behind this relay ({self.head})",
            "ahead": f"the database schema ({at}) is newer than this relay ({self.head})",
        }[self.status]


def _inspect(conn: Any) -> tuple[str | None, bool]:
    revision = MigrationContext.configure(conn).get_current_revision()
    tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
    return revision, bool(tables)


async def schema_state(engine: AsyncEngine) -> SchemaState:
    head = head_revision()
    async with engine.connect() as conn:
        revision, has_tables = await conn.run_sync(_inspect)
    if revision == head:
        status: Status = "current"
    elif revision is None and not has_tables:
        status = "empty"
    elif revision is None or revision in known_revisions():
        status = "behind"
    else:
        status = "ahead"
    return SchemaState(status, revision, head)


async def upgrade(engine: AsyncEngine, target: str = "head") -> None:
    """Bring the database to ``target`` (head by default).

    Several *processes* may migrate one PostgreSQL database at once (env.py takes an
    advisory lock); within one process, Alembic's module-level context allows only
    one migration at a time, which start-up and the CLI respect.
    """

    def run(conn: Any) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        revision, has_tables = _inspect(conn)
        if revision is None and has_tables:
            command.stamp(cfg, BASELINE)  # created by issue #3's create_all
        command.upgrade(cfg, target)

    async with engine.begin() as conn:
        await conn.run_sync(run)


class SchemaNotCurrent(Exception):
    """The database is behind (or ahead of) this relay; the message says what to run."""

    def __init__(self, state: SchemaState) -> None:
        hint = (
            "run `backchannel-relay migrate` (or start with `serve --migrate`)"
            if state.status == "behind"
            else "run a relay at least as new as the one that migrated this database"
        )
        super().__init__(f"{state.describe()}; {hint}")
        self.state = state


async def ensure_schema(engine: AsyncEngine, *, auto_migrate: bool) -> SchemaState:
    """Apply the start-up policy above; raise :class:`SchemaNotCurrent` to refuse."""
    state = await schema_state(engine)
    if state.status == "empty" or (state.status == "behind" and auto_migrate):
        await upgrade(engine)
        state = await schema_state(engine)
    if state.status != "current":
        raise SchemaNotCurrent(state)
    return state
