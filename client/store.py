"""The client's local state: one SQLite file, every sensitive value sealed.

Layout (docs/client.md, "Local state"):

* ``meta``: the format version, the Argon2id salt and limits, and the *master
  key* wrapped (XChaCha20-Poly1305) under ``Argon2id(passphrase)``. The master
  key is random, so changing the passphrase re-wraps 32 bytes, not the file.
* ``items``: ``(ns, k) -> v``, one row per independent item (a peer, an
  inbound sender key, a stashed message). ``k`` is a keyed BLAKE2b of the
  natural key (a room id, a member key, ...) under a key derived from the
  master key, so the file does not show which rooms or members it holds; ``v``
  is sealed with the master key and the associated data ``ns || k``, so a value
  moved to another row does not open. ``scope`` (a keyed hash too, or empty)
  groups the rows that belong together, usually one room's, so that they can
  be listed or dropped without reading every row of the namespace. What each
  namespace holds, and its encoding, is declared in :mod:`.records`.
* ``messages``: a room's transcript, one sealed row per message, with a
  coarse ``expires`` time in the clear so the retention purge can delete
  without the passphrase.

Every write goes through :meth:`Store.transaction`; a ratchet step and the
message it produced are committed together (DESIGN.md §1.9). SQLite runs in
WAL mode with ``synchronous=FULL``.

One process at a time: an open store holds an exclusive ``flock`` on
``state.lock`` next to the file. SQLite alone would serialise the writes but
not the read-modify-write of a ratchet or sender key around them, so two
processes on one profile could encrypt twice under the same key and nonce, or
each take the other's progress for a replay.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import Reader, decode, encode
from backchannel.protocol.errors import DecryptionFailed, ProtocolError

#: 2: the ``scope`` column, and one row per item where version 1 kept whole
#: records per room.
STORE_VERSION: Final = 2
DB_NAME: Final = "state.db"
LOCK_NAME: Final = "state.lock"
_LABEL_INDEX: Final = b"bc-store-index"
#: Row keys kept derived in memory (see Store._k); cleared whole past this.
_DERIVED_MAX: Final = 4096
_LABEL_WRAP: Final = b"bc-store-wrap"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    ns TEXT NOT NULL, k BLOB NOT NULL, scope BLOB NOT NULL, v BLOB NOT NULL,
    PRIMARY KEY (ns, k)
);
CREATE INDEX IF NOT EXISTS items_scope ON items (ns, scope);
CREATE TABLE IF NOT EXISTS messages (
    room BLOB NOT NULL, n INTEGER NOT NULL, expires INTEGER NOT NULL, v BLOB NOT NULL,
    PRIMARY KEY (room, n)
);
CREATE INDEX IF NOT EXISTS messages_expires ON messages (expires);
"""


class StoreError(Exception):
    """A local-state problem the user can act on; ``str()`` is one clear line."""


class WrongPassphrase(StoreError):
    pass


class NoProfile(StoreError):
    pass


class StoreCorrupt(StoreError):
    pass


class ProfileInUse(StoreError):
    """Another process (or another :class:`Store` in this one) has the profile open."""


class Store:
    """An open, unlocked store. Create with :meth:`create` or :meth:`open`."""

    def __init__(
        self, conn: sqlite3.Connection, master: bytes, lock: io.FileIO | None = None
    ) -> None:
        self._conn = conn
        self._lock = lock
        self._master = master
        self._index_key = P.kdf(master, _LABEL_INDEX, b"", 32)
        self._depth = 0
        #: Bumped by every write to a namespace and by every rollback: what a cache
        #: of decoded rows compares to know it still holds what the store holds.
        self._versions: dict[str, int] = {}
        self._rollbacks = 0
        self._derived: dict[tuple[str, bytes], bytes] = {}
        #: Run at the end of the outermost transaction (see at_end).
        self._hooks: list[Callable[[bool], None]] = []

    # --- lifecycle --------------------------------------------------------------------

    @staticmethod
    def path(home: Path) -> Path:
        return home / DB_NAME

    @classmethod
    def exists(cls, home: Path) -> bool:
        return cls.path(home).exists()

    @classmethod
    def create(
        cls,
        home: Path,
        passphrase: str,
        *,
        opslimit: int = P.ARGON2_OPSLIMIT_DEFAULT,
        memlimit: int = P.ARGON2_MEMLIMIT_DEFAULT,
    ) -> Store:
        if not passphrase:
            raise StoreError("the passphrase must not be empty")
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = cls.path(home)
        if path.exists():
            raise StoreError(f"a profile already exists in {home}")
        lock = _lock(home)
        try:
            return cls._create_locked(path, passphrase, opslimit, memlimit, lock)
        except BaseException:
            lock.close()
            raise

    @classmethod
    def _create_locked(
        cls, path: Path, passphrase: str, opslimit: int, memlimit: int, lock: io.FileIO
    ) -> Store:
        master = P.random_bytes(32)
        salt = P.random_bytes(P.ARGON2_SALT_SIZE)
        kek = P.argon2id(passphrase.encode(), salt, opslimit=opslimit, memlimit=memlimit)
        nonce = P.random_bytes(P.AEAD_NONCE_SIZE)
        wrapped = P.aead_encrypt(kek, nonce, master, _LABEL_WRAP)
        # Create the file private before anything is written to it.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        conn = _connect(path)
        conn.executescript(_SCHEMA)
        header = encode(
            {
                "mem": memlimit,
                "nonce": nonce,
                "ops": opslimit,
                "salt": salt,
                "v": STORE_VERSION,
                "wrapped": wrapped,
            }
        )
        with conn:
            conn.execute("INSERT INTO meta (name, value) VALUES ('header', ?)", (header,))
        return cls(conn, master, lock)

    @classmethod
    def open(cls, home: Path, passphrase: str) -> Store:
        path = cls.path(home)
        if not path.exists():
            raise NoProfile(f"no profile in {home}")
        # Before reading the header or running the KDF, so a second process
        # fails at once rather than after seconds of Argon2id.
        lock = _lock(home)
        try:
            return cls._open_locked(home, path, passphrase, lock)
        except BaseException:
            lock.close()
            raise

    @classmethod
    def _open_locked(cls, home: Path, path: Path, passphrase: str, lock: io.FileIO) -> Store:
        conn = _connect(path)
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'header'").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is None:
            conn.close()
            raise StoreCorrupt(f"{path} has no header; it is not a backchannel profile")
        try:
            r = Reader.of(decode(bytes(row[0])), "store header")
            if r.integer("v", 0, 255) < STORE_VERSION:
                conn.close()
                raise StoreError(
                    f"the profile in {home} was made by an earlier release of backchannel; "
                    "rejoin your rooms with a new profile (or use that release)"
                )
            r.version(STORE_VERSION)
            memlimit = r.integer("mem", P.ARGON2_MEMLIMIT_MIN)
            nonce = r.blob("nonce", P.AEAD_NONCE_SIZE)
            opslimit = r.integer("ops", P.ARGON2_OPSLIMIT_MIN)
            salt = r.blob("salt", P.ARGON2_SALT_SIZE)
            wrapped = r.blob("wrapped", 32 + P.AEAD_TAG_SIZE)
            r.done()
        except ProtocolError as exc:
            conn.close()
            raise StoreCorrupt(f"{path} has an unreadable header ({exc.code})") from exc
        # Only after the version check: an older file's tables are not this schema.
        conn.executescript(_SCHEMA)
        kek = P.argon2id(passphrase.encode(), salt, opslimit=opslimit, memlimit=memlimit)
        try:
            master = P.aead_decrypt(kek, nonce, wrapped, _LABEL_WRAP)
        except DecryptionFailed:
            conn.close()
            raise WrongPassphrase("wrong passphrase") from None
        return cls(conn, master, lock)

    def close(self) -> None:
        """Close the database, then give up the profile lock."""
        self._derived.clear()
        try:
            self._conn.close()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    # --- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all; nesting joins the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        committed = False
        try:
            yield
            # Writes held back for the commit join it; one that fails rolls it all back.
            for hook in self._hooks:
                hook(True)
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._rollbacks += 1
            raise
        else:
            self._conn.execute("COMMIT")
            committed = True
        finally:
            self._depth = 0
            hooks, self._hooks = self._hooks, []
            if not committed:
                # Also when ROLLBACK or COMMIT itself failed: what the hooks hold
                # in memory may be ahead of the table, so they let it go.
                for hook in hooks:
                    hook(False)

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    def at_end(self, hook: Callable[[bool], None]) -> None:
        """Within a transaction: call ``hook(True)`` just before it commits (what it
        writes then commits with the rest) or ``hook(False)`` once it rolled back."""
        if self._depth and hook not in self._hooks:
            self._hooks.append(hook)

    # --- sealed items ---------------------------------------------------------------------

    def _k(self, ns: str, key: bytes) -> bytes:
        # The same few keys are looked up for every message (its room's cursor, its
        # sender's key, the room's scope): derived once each, from a bounded memo
        # that holds no more than the index key they all come from.
        found = self._derived.get((ns, key))
        if found is None:
            found = P.kdf(self._index_key, _LABEL_INDEX, encode([ns, key]), 32)
            if len(self._derived) >= _DERIVED_MAX:
                self._derived.clear()
            self._derived[ns, key] = found
        return found

    def _seal(self, ad: bytes, value: bytes) -> bytes:
        nonce = P.random_bytes(P.AEAD_NONCE_SIZE)
        return nonce + P.aead_encrypt(self._master, nonce, value, ad)

    def _open(self, ad: bytes, sealed: bytes) -> bytes:
        try:
            return P.aead_decrypt(
                self._master, sealed[: P.AEAD_NONCE_SIZE], sealed[P.AEAD_NONCE_SIZE :], ad
            )
        except DecryptionFailed:
            raise StoreCorrupt("a stored value does not authenticate") from None

    def version(self, ns: str) -> tuple[int, int]:
        """Changes whenever what ``ns`` holds may have changed (a write or a rollback)."""
        return self._rollbacks, self._versions.get(ns, 0)

    def _wrote(self, ns: str) -> None:
        self._versions[ns] = self._versions.get(ns, 0) + 1

    def put(self, ns: str, key: bytes, value: bytes, *, scope: bytes = b"") -> None:
        self._wrote(ns)
        k = self._k(ns, key)
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO items (ns, k, scope, v) VALUES (?, ?, ?, ?)",
                (ns, k, self._scope(ns, scope), self._seal(ns.encode() + k, value)),
            )

    def get(self, ns: str, key: bytes) -> bytes | None:
        k = self._k(ns, key)
        row = self._conn.execute("SELECT v FROM items WHERE ns = ? AND k = ?", (ns, k)).fetchone()
        return None if row is None else self._open(ns.encode() + k, bytes(row[0]))

    def delete(self, ns: str, key: bytes) -> None:
        self._wrote(ns)
        with self.transaction():
            self._conn.execute("DELETE FROM items WHERE ns = ? AND k = ?", (ns, self._k(ns, key)))

    def values(self, ns: str) -> list[bytes]:
        """Every value in ``ns`` (values carry their own natural keys where needed)."""
        rows = self._conn.execute("SELECT k, v FROM items WHERE ns = ?", (ns,)).fetchall()
        return [self._open(ns.encode() + bytes(k), bytes(v)) for k, v in rows]

    def scan(self, ns: str, scope: bytes) -> list[bytes]:
        """The values put in ``ns`` under ``scope``, in no particular order."""
        rows = self._conn.execute(
            "SELECT k, v FROM items WHERE ns = ? AND scope = ?", (ns, self._scope(ns, scope))
        ).fetchall()
        return [self._open(ns.encode() + bytes(k), bytes(v)) for k, v in rows]

    def delete_scope(self, ns: str, scope: bytes) -> None:
        self._wrote(ns)
        with self.transaction():
            self._conn.execute(
                "DELETE FROM items WHERE ns = ? AND scope = ?", (ns, self._scope(ns, scope))
            )

    def _scope(self, ns: str, scope: bytes) -> bytes:
        # Keyed like the row keys, so grouping shows only how many rows belong together.
        return b"" if not scope else self._k(ns + "/scope", scope)

    # --- transcripts ---------------------------------------------------------------------------

    def add_message(self, room: bytes, value: bytes, expires: int) -> int:
        room_k = self._k("messages", room)
        with self.transaction():
            row = self._conn.execute(
                "SELECT COALESCE(MAX(n), -1) + 1 FROM messages WHERE room = ?", (room_k,)
            ).fetchone()
            n = int(row[0])
            ad = encode(["messages", room_k, n])
            self._conn.execute(
                "INSERT INTO messages (room, n, expires, v) VALUES (?, ?, ?, ?)",
                (room_k, n, expires, self._seal(ad, value)),
            )
        return n

    def messages(self, room: bytes, *, after: int = -1) -> list[tuple[int, bytes]]:
        room_k = self._k("messages", room)
        rows = self._conn.execute(
            "SELECT n, v FROM messages WHERE room = ? AND n > ? ORDER BY n", (room_k, after)
        ).fetchall()
        return [(n, self._open(encode(["messages", room_k, n]), bytes(v))) for n, v in rows]

    def cap_expiry(self, room: bytes, n: int, expires: int) -> None:
        """Bring a transcript row's deletion forward to ``expires`` (never back)."""
        with self.transaction():
            self._conn.execute(
                "UPDATE messages SET expires = MIN(expires, ?) WHERE room = ? AND n = ?",
                (expires, self._k("messages", room), n),
            )

    def delete_messages(self, room: bytes) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM messages WHERE room = ?", (self._k("messages", room),))

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self.transaction():
            cur = self._conn.execute("DELETE FROM messages WHERE expires <= ?", (int(now),))
        return cur.rowcount


def purge_without_unlocking(home: Path, now: float | None = None) -> int:
    """Delete expired transcript rows without the passphrase (retention runs even
    when nobody unlocks the profile).

    Takes no profile lock, so it also runs while a chat is open: it only
    deletes lapsed rows, in one SQLite transaction that SQLite serialises with
    the holder's, and reads or advances no key."""
    path = Store.path(home)
    if not path.exists():
        return 0
    conn = _connect(path)
    try:
        with conn:
            limit = int(time.time() if now is None else now)
            cur = conn.execute("DELETE FROM messages WHERE expires <= ?", (limit,))
        return cur.rowcount
    finally:
        conn.close()


def wipe(home: Path) -> bool:
    """Overwrite and delete the state file and its WAL side files. The
    overwrite is best effort (SSDs and copy-on-write file systems may keep old
    blocks); losing the wrapped master key is what makes the rest unreadable.

    Does not take or respect the profile lock: a panic button must not wait
    for a chat window. Wiping an open profile proceeds; the process holding it
    is left with overwritten files and fails on its next read or write."""
    found = False
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(str(Store.path(home)) + suffix)
        if path.exists():
            found = True
            left = path.stat().st_size
            with open(path, "r+b") as fh:
                while left > 0:
                    chunk = min(left, 1 << 20)
                    fh.write(os.urandom(chunk))
                    left -= chunk
                fh.flush()
                os.fsync(fh.fileno())
            path.unlink()
    # Not counted as found: it holds only a PID, never state.
    (home / LOCK_NAME).unlink(missing_ok=True)
    return found


def hold(home: Path) -> io.FileIO:
    """Take the profile lock without opening the store (``wipe`` holds it, so that
    no process opens the profile while it is destroyed); :class:`ProfileInUse` if
    another process has it. Close the result to let go."""
    return _lock(home)


def _lock(home: Path) -> io.FileIO:
    """Take the profile lock, or raise :class:`ProfileInUse` naming the holder.

    ``flock`` belongs to the open file, so the kernel drops it when the
    process dies, however it dies: a killed process never leaves the profile
    locked, and there is no stale lock to clean up.
    """
    path = home / LOCK_NAME
    try:
        # No O_TRUNC: the holder's PID must survive until we know we are not it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror}") from None
    lock = io.FileIO(fd, "r+")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BlockingIOError:
            pid = _holder(fd)
            who = f" (pid {pid})" if pid is not None else ""
            raise ProfileInUse(
                f"this profile is open in another backchannel process{who}"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot lock {path}: {exc.strerror}") from None
    except BaseException:
        lock.close()
        raise
    return lock


def _holder(fd: int) -> int | None:
    # Empty if the holder has not written its PID yet; then the message names none.
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn
