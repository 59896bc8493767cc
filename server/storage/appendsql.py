"""The statements of a batch of room messages, for each kind of database connection.

:meth:`.messages.MessageStore._append_sync` decides what happens to each
message; the few statements it needs are here, three times: as SQLAlchemy Core
(through the async drivers, where no direct writer is available), as plain SQL
on the ``sqlite3`` connection itself, and as two whole-batch statements on
psycopg, which is how the batcher's own thread runs them
(:func:`.engine.make_direct_writer`). On that thread the Python work of a batch
holds the GIL against the event loop, so it is kept to the driver's own calls.

Every lookup goes through an index, whatever the size of the table: a batch
costs the same with ten messages stored or ten million. On SQLite the keys are
a ``VALUES`` list joined (as the outer loop) to the table's unique index;
SQLite answers ``(a, b) IN (VALUES …)`` with a scan of the whole table.
On PostgreSQL the keys are arrays, unnested and joined the same way.
``tests/server/test_append_plan.py`` checks the plans on both databases.
"""

from __future__ import annotations

import abc
import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import psycopg
from sqlalchemy import BigInteger, Connection, bindparam, insert, select, tuple_, update

from .models import Room, RoomMember, RoomMessage

#: Rows per lookup: far below SQLite's and PostgreSQL's limits on bound parameters.
CHUNK = 200

#: (room_id, sender, client_id, seq, created_at) of a message already stored.
Original = tuple[bytes, bytes, bytes, int, int]
#: (room_id, seq, sender, client_id, data, created_at) of a message to store.
NewRow = tuple[bytes, int, bytes, bytes, bytes, int]
#: (room_id, sender, client_id, data) of a message of the batch.
Item = tuple[bytes, bytes, bytes, bytes]
Role = tuple[bytes, bytes, str]

#: What became of an item: (kind, seq, created_at), the last two for OLD and NEW.
Verdict = tuple[int, int, int]
OLD = 0  #: stored before, under this key: the original's seq and time
NEW = 1  #: numbered and stored now
NOT_MEMBER = 2
OBSERVER = 3
FULL = 4  #: its room's quota cannot take the room's whole batch: to be taken one by one


class AppendRows(Protocol):
    def judge(self, items: Sequence[Item], limit: int, ts: int) -> list[Verdict]:
        """What becomes of each of ``items`` (no two with the same key): stored
        before, refused, or numbered and stored now at ``ts``, room by room in
        id order, where the room's quota (``limit``) takes all of its items."""
        ...

    def atomic(self) -> contextlib.AbstractContextManager[object]:
        """A transaction for the statements in it, where each does not already run in one."""
        ...

    def number(self, room: bytes, count: int, total: int, limit: int | None) -> int | None:
        """Take ``count`` sequence numbers and ``total`` bytes of quota; the new
        ``last_seq``, or ``None`` if that would pass ``limit`` (or no such room)."""
        ...

    def stored_bytes(self, room: bytes) -> int | None:
        """The room's stored bytes, its row locked until the transaction ends."""
        ...

    def insert(self, rows: list[NewRow]) -> None: ...


def rows_for(conn: Connection) -> AppendRows:
    """The statements for ``conn``: plain SQL where its driver is ``sqlite3``."""
    driver = conn.connection.driver_connection
    if isinstance(driver, sqlite3.Connection):
        return SqliteRows(driver)
    if isinstance(driver, psycopg.Connection):
        return PgRows(conn)
    return CoreRows(conn)


def _placeholders(width: int, count: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return ", ".join([one] * count)


class _Composed(abc.ABC):
    """:meth:`AppendRows.judge` from a few statements, for a connection already in
    the batch's transaction."""

    @abc.abstractmethod
    def originals(self, keys: Sequence[tuple[bytes, bytes, bytes]]) -> Iterable[Original]: ...

    @abc.abstractmethod
    def roles(self, pairs: Sequence[tuple[bytes, bytes]]) -> Iterable[Role]:
        """(room_id, member, role) of each pair that is a current member."""

    @abc.abstractmethod
    def number(self, room: bytes, count: int, total: int, limit: int | None) -> int | None: ...

    @abc.abstractmethod
    def insert(self, rows: list[NewRow]) -> None: ...

    def judge(self, items: Sequence[Item], limit: int, ts: int) -> list[Verdict]:
        keys = sorted({item[:3] for item in items})
        pairs = sorted({item[:2] for item in items})
        original: dict[tuple[bytes, bytes, bytes], tuple[int, int]] = {}
        for i in range(0, len(keys), CHUNK):
            for room, sender, cid, seq, created in self.originals(keys[i : i + CHUNK]):
                original[room, sender, cid] = (seq, created)
        roles: dict[tuple[bytes, bytes], str] = {}
        for i in range(0, len(pairs), CHUNK):
            roles.update({(r, m): role for r, m, role in self.roles(pairs[i : i + CHUNK])})
        out: list[Verdict] = [(FULL, 0, 0)] * len(items)
        by_room: dict[bytes, list[int]] = {}
        for i, (room, sender, cid, _data) in enumerate(items):
            if (found := original.get((room, sender, cid))) is not None:
                out[i] = (OLD, *found)
            elif (role := roles.get((room, sender))) is None:
                out[i] = (NOT_MEMBER, 0, 0)
            elif role == "observer":
                out[i] = (OBSERVER, 0, 0)
            else:
                by_room.setdefault(room, []).append(i)
        rows: list[NewRow] = []
        for room in sorted(by_room):
            mine = by_room[room]
            last = self.number(room, len(mine), sum(len(items[i][3]) for i in mine), limit)
            if last is None:
                continue  # FULL, as preset
            for seq, i in enumerate(mine, last - len(mine) + 1):
                out[i] = (NEW, seq, ts)
                _room, sender, cid, data = items[i]
                rows.append((room, seq, sender, cid, data, ts))
        if rows:
            self.insert(rows)
        return out

    def atomic(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()


class SqliteRows(_Composed):
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


class CoreRows(_Composed):
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


# PostgreSQL, on psycopg in autocommit (the batcher's own thread): the whole
# batch is one statement, so one round trip to the server (each is a wait for
# another process's turn on a busy machine) and one transaction, on disk before
# the server answers. Arrays are bound whole (unnest), so the text is the same
# for every batch and needs no chunking. The decisions are those of
# _Composed.judge: ``locked`` takes the rooms' row locks in id order (two
# instances' batches cannot deadlock), and a room whose quota cannot take its
# whole batch is left untouched (no ``numbered`` row: FULL).
PG_JUDGE = """
WITH k AS (
    SELECT * FROM unnest(%(rooms)s::bytea[], %(senders)s::bytea[], %(cids)s::bytea[],
        %(datas)s::bytea[]) WITH ORDINALITY AS k(room_id, sender, client_id, data, ord)
), judged AS (
    SELECT k.ord, k.room_id, m.seq AS old_seq, m.created_at AS old_ts, r.role
    FROM k
    LEFT JOIN room_messages AS m
        ON m.room_id = k.room_id AND m.sender = k.sender AND m.client_id = k.client_id
    LEFT JOIN room_members AS r
        ON r.room_id = k.room_id AND r.member = k.sender AND r.left_pos IS NULL
), eligible AS (
    SELECT k.*, row_number() OVER (PARTITION BY k.room_id ORDER BY k.ord) AS rank
    FROM k JOIN judged AS j ON j.ord = k.ord
    WHERE j.old_seq IS NULL AND j.role IS NOT NULL AND j.role <> 'observer'
), wanted AS (
    SELECT room_id AS id, count(*) AS n, sum(length(data)) AS total
    FROM eligible GROUP BY room_id
), locked AS (
    SELECT id FROM rooms WHERE id IN (SELECT id FROM wanted) ORDER BY id FOR UPDATE
), numbered AS (
    UPDATE rooms SET last_seq = rooms.last_seq + wanted.n,
        stored_bytes = rooms.stored_bytes + wanted.total
    FROM wanted JOIN locked ON locked.id = wanted.id
    WHERE rooms.id = wanted.id AND rooms.stored_bytes + wanted.total <= %(limit)s::bigint
    RETURNING rooms.id, rooms.last_seq - wanted.n AS base
), stored AS (
    INSERT INTO room_messages (room_id, seq, sender, client_id, data, created_at)
    SELECT e.room_id, n.base + e.rank, e.sender, e.client_id, e.data, %(ts)s
    FROM eligible AS e JOIN numbered AS n ON n.id = e.room_id
)
SELECT j.old_seq, j.old_ts, j.role, n.base + e.rank
FROM judged AS j
LEFT JOIN eligible AS e ON e.ord = j.ord
LEFT JOIN numbered AS n ON n.id = e.room_id
ORDER BY j.ord
"""


class PgRows:
    """The batch on psycopg in autocommit (see make_direct_writer): :meth:`judge`
    is one statement, and the rare room near its quota gets the message-by-message
    path in a transaction of its own. The statements
    go through SQLAlchemy's connection as they are, so that a lost connection is
    noticed by its pool."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _run(self, sql: str, params: Any) -> list[Any]:
        return list(self.conn.exec_driver_sql(sql, params))

    def judge(self, items: Sequence[Item], limit: int, ts: int) -> list[Verdict]:
        params = {
            "rooms": [item[0] for item in items],
            "senders": [item[1] for item in items],
            "cids": [item[2] for item in items],
            "datas": [item[3] for item in items],
            "limit": limit,
            "ts": ts,
        }
        out: list[Verdict] = []
        for old_seq, old_ts, role, seq in self._run(PG_JUDGE, params):
            if old_seq is not None:
                out.append((OLD, old_seq, old_ts))
            elif role is None:
                out.append((NOT_MEMBER, 0, 0))
            elif role == "observer":
                out.append((OBSERVER, 0, 0))
            elif seq is not None:
                out.append((NEW, int(seq), ts))
            else:
                out.append((FULL, 0, 0))
        return out

    @contextlib.contextmanager
    def atomic(self) -> Iterator[object]:
        self.conn.exec_driver_sql("BEGIN")
        try:
            yield self
        except BaseException:
            self.conn.exec_driver_sql("ROLLBACK")
            raise
        self.conn.exec_driver_sql("COMMIT")

    def number(self, room: bytes, count: int, total: int, limit: int | None) -> int | None:
        rows = self._run(
            "UPDATE rooms SET last_seq = last_seq + %(count)s, "
            "stored_bytes = stored_bytes + %(total)s "
            "WHERE id = %(room)s AND (%(limit)s::bigint IS NULL "
            "OR stored_bytes + %(total)s <= %(limit)s::bigint) RETURNING last_seq",
            {"room": room, "count": count, "total": total, "limit": limit},
        )
        return int(rows[0][0]) if rows else None

    def stored_bytes(self, room: bytes) -> int | None:
        rows = self._run("SELECT stored_bytes FROM rooms WHERE id = %s FOR UPDATE", (room,))
        return int(rows[0][0]) if rows else None

    def insert(self, rows: list[NewRow]) -> None:
        self.conn.exec_driver_sql(
            "INSERT INTO room_messages (room_id, seq, sender, client_id, data, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            rows,
        )
