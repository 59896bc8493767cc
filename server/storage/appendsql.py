"""The statements of a batch of room messages, for each kind of database connection.

:meth:`.messages.MessageStore._append_sync` decides what happens to each
message; the few statements it needs are here, twice: once as SQLAlchemy Core
(PostgreSQL, and SQLite through the async driver) and once as plain SQL on the
``sqlite3`` connection itself, which is how the batcher's own thread runs them
(:func:`.engine.make_direct_writer`). On that thread the Python work of a batch
holds the GIL against the event loop, so it is kept to the driver's own calls.

Every lookup goes through an index, whatever the size of the table: a batch
costs the same with ten messages stored or ten million. On SQLite the keys are
a ``VALUES`` list joined (as the outer loop) to the table's unique index;
SQLite answers ``(a, b) IN (VALUES …)`` with a scan of the whole table.
``tests/server/test_append_plan.py`` checks the plans on both databases.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy import BigInteger, Connection, bindparam, insert, select, tuple_, update

from .models import Room, RoomMember, RoomMessage

#: Rows per lookup: far below SQLite's and PostgreSQL's limits on bound parameters.
CHUNK = 200

#: (room_id, sender, client_id, seq, created_at) of a message already stored.
Original = tuple[bytes, bytes, bytes, int, int]
#: (room_id, seq, sender, client_id, data, created_at) of a message to store.
NewRow = tuple[bytes, int, bytes, bytes, bytes, int]


class AppendRows(Protocol):
    def originals(self, keys: Sequence[tuple[bytes, bytes, bytes]]) -> Iterable[Original]: ...

    def roles(self, pairs: Sequence[tuple[bytes, bytes]]) -> Iterable[tuple[bytes, bytes, str]]:
        """(room_id, member, role) of each pair that is a current member."""
        ...

    def number(self, room: bytes, count: int, total: int, limit: int | None) -> int | None:
        """Take ``count`` sequence numbers and ``total`` bytes of quota; the new
        ``last_seq``, or ``None`` if that would pass ``limit`` (or no such room)."""
        ...

    def stored_bytes(self, room: bytes) -> int | None: ...

    def insert(self, rows: list[NewRow]) -> None: ...


def rows_for(conn: Connection) -> AppendRows:
    """The statements for ``conn``: plain SQL where its driver is ``sqlite3``."""
    driver = conn.connection.driver_connection
    if isinstance(driver, sqlite3.Connection):
        return SqliteRows(driver)
    return CoreRows(conn)


def _placeholders(width: int, count: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return ", ".join([one] * count)


class SqliteRows:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def originals(self, keys: Sequence[tuple[bytes, bytes, bytes]]) -> Iterable[Original]:
        # Only placeholders are formatted in; the values are bound.
        sql = (
            "SELECT m.room_id, m.sender, m.client_id, m.seq, m.created_at "  # noqa: S608
            f"FROM (VALUES {_placeholders(3, len(keys))}) AS k "
            "CROSS JOIN room_messages AS m "
            "ON m.room_id = k.column1 AND m.sender = k.column2 AND m.client_id = k.column3"
        )
        return self.db.execute(sql, [v for key in keys for v in key]).fetchall()

    def roles(self, pairs: Sequence[tuple[bytes, bytes]]) -> Iterable[tuple[bytes, bytes, str]]:
        sql = (
            "SELECT m.room_id, m.member, m.role "  # noqa: S608
            f"FROM (VALUES {_placeholders(2, len(pairs))}) AS k "
            "CROSS JOIN room_members AS m "
            "ON m.room_id = k.column1 AND m.member = k.column2 "
            "WHERE m.left_pos IS NULL"
        )
        return self.db.execute(sql, [v for pair in pairs for v in pair]).fetchall()

    def number(self, room: bytes, count: int, total: int, limit: int | None) -> int | None:
        if limit is None:
            row = self.db.execute(
                "UPDATE rooms SET last_seq = last_seq + ?, stored_bytes = stored_bytes + ? "
                "WHERE id = ? RETURNING last_seq",
                (count, total, room),
            ).fetchone()
        else:
            row = self.db.execute(
                "UPDATE rooms SET last_seq = last_seq + ?, stored_bytes = stored_bytes + ? "
                "WHERE id = ? AND stored_bytes + ? <= ? RETURNING last_seq",
                (count, total, room, total, limit),
            ).fetchone()
        return None if row is None else int(row[0])

    def stored_bytes(self, room: bytes) -> int | None:
        row = self.db.execute("SELECT stored_bytes FROM rooms WHERE id = ?", (room,)).fetchone()
        return None if row is None else int(row[0])

    def insert(self, rows: list[NewRow]) -> None:
        self.db.executemany(
            "INSERT INTO room_messages (room_id, seq, sender, client_id, data, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )


# Built once: building a statement costs more than running it (SQLAlchemy then
# finds it compiled in its cache by structure).
_ORIGINALS = select(
    RoomMessage.room_id,
    RoomMessage.sender,
    RoomMessage.client_id,
    RoomMessage.seq,
    RoomMessage.created_at,
).where(
    tuple_(RoomMessage.room_id, RoomMessage.sender, RoomMessage.client_id).in_(
        bindparam("keys", expanding=True)
    )
)
_ROLES = select(RoomMember.room_id, RoomMember.member, RoomMember.role).where(
    tuple_(RoomMember.room_id, RoomMember.member).in_(bindparam("pairs", expanding=True)),
    RoomMember.left_pos.is_(None),
)
_TOTAL = bindparam("total", type_=BigInteger)
_TAKE = update(Room).values(
    last_seq=Room.last_seq + bindparam("count"), stored_bytes=Room.stored_bytes + _TOTAL
)
_NUMBER = _TAKE.where(
    Room.id == bindparam("room"), Room.stored_bytes + _TOTAL <= bindparam("limit")
).returning(Room.last_seq)
_NUMBER_ANY = _TAKE.where(Room.id == bindparam("room")).returning(Room.last_seq)
_USED = select(Room.stored_bytes).where(Room.id == bindparam("room")).with_for_update()
_INSERT = insert(RoomMessage)
_COLUMNS = ("room_id", "seq", "sender", "client_id", "data", "created_at")


class CoreRows:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def originals(self, keys: Sequence[tuple[bytes, bytes, bytes]]) -> Iterable[Original]:
        rows = self.conn.execute(_ORIGINALS, {"keys": list(keys)})
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def roles(self, pairs: Sequence[tuple[bytes, bytes]]) -> Iterable[tuple[bytes, bytes, str]]:
        rows = self.conn.execute(_ROLES, {"pairs": list(pairs)})
        return [(r[0], r[1], r[2]) for r in rows]

    def number(self, room: bytes, count: int, total: int, limit: int | None) -> int | None:
        params: dict[str, Any] = {"room": room, "count": count, "total": total}
        if limit is None:
            found = self.conn.execute(_NUMBER_ANY, params).scalar()
        else:
            found = self.conn.execute(_NUMBER, {**params, "limit": limit}).scalar()
        return None if found is None else int(found)

    def stored_bytes(self, room: bytes) -> int | None:
        found = self.conn.execute(_USED, {"room": room}).scalar()
        return None if found is None else int(found)

    def insert(self, rows: list[NewRow]) -> None:
        self.conn.execute(_INSERT, [dict(zip(_COLUMNS, row, strict=True)) for row in rows])
