"""The client's sealed local store."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from backchannel.client.store import (
    NoProfile,
    Store,
    StoreCorrupt,
    StoreError,
    WrongPassphrase,
    purge_without_unlocking,
    wipe,
)
from backchannel.protocol import primitives as P

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
SECRET_NAME = b"Dr. Leila Haddad, Institute for Regional Studies"
ROOM = b"\x42" * 32


def make(tmp_path: Path) -> Store:
    return Store.create(tmp_path, "correct horse", **FAST)


def test_values_round_trip_and_nothing_readable_is_on_disk(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.put("profile", b"me", SECRET_NAME)
    store.add_message(ROOM, b"we could accept a phased withdrawal", 2**40)
    assert store.get("profile", b"me") == SECRET_NAME
    store.close()
    again = Store.open(tmp_path, "correct horse")
    assert again.get("profile", b"me") == SECRET_NAME
    assert [v for _, v in again.messages(ROOM)] == [b"we could accept a phased withdrawal"]
    again.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for needle in (SECRET_NAME, b"Haddad", b"phased", ROOM, ROOM.hex().encode()):
        assert needle not in raw


def test_file_is_private(tmp_path: Path) -> None:
    make(tmp_path).close()
    mode = stat.S_IMODE(Store.path(tmp_path).stat().st_mode)
    assert mode == 0o600


def test_wrong_passphrase_is_clear_and_changes_nothing(tmp_path: Path) -> None:
    make(tmp_path).close()
    before = Store.path(tmp_path).read_bytes()
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        Store.open(tmp_path, "incorrect horse")
    assert Store.path(tmp_path).read_bytes() == before


def test_missing_profile_and_double_create(tmp_path: Path) -> None:
    with pytest.raises(NoProfile):
        Store.open(tmp_path / "nothing", "x")
    make(tmp_path).close()
    with pytest.raises(StoreError, match="already exists"):
        make(tmp_path)
    with pytest.raises(StoreError):
        Store.create(tmp_path / "other", "", **FAST)


def test_a_value_moved_to_another_row_does_not_open(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.put("keys", b"a", b"alpha")
    store.put("keys", b"b", b"beta")
    conn = sqlite3.connect(Store.path(tmp_path))
    rows = dict(conn.execute("SELECT v, k FROM items").fetchall())
    by_value = {store.get("keys", b"a"): b"a", store.get("keys", b"b"): b"b"}
    assert set(by_value) == {b"alpha", b"beta"}
    (v1, _k1), (_v2, k2) = rows.items()
    conn.execute("UPDATE items SET v = ? WHERE k = ?", (v1, k2))
    conn.commit()
    conn.close()
    results = []
    for key in (b"a", b"b"):
        try:
            results.append(store.get("keys", key))
        except StoreCorrupt:
            results.append("corrupt")
    # Exactly the overwritten row refuses to open; the other is intact.
    assert sorted(map(str, results)).count("corrupt") == 1
    assert b"alpha" in results or b"beta" in results


def test_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.put("ratchet", b"peer", b"state-1")

    class Crash(Exception):
        pass

    def step() -> None:
        with store.transaction():
            store.put("ratchet", b"peer", b"state-2")
            store.add_message(ROOM, b"produced by state-2", 2**40)
            raise Crash

    with pytest.raises(Crash):
        step()
    assert store.get("ratchet", b"peer") == b"state-1"
    assert store.messages(ROOM) == []


def test_writes_held_for_the_commit_join_it_and_a_rollback_lets_them_go(
    tmp_path: Path,
) -> None:
    """``Store.at_end``: what the receive path holds back (inbound keys, cursors)."""
    store = make(tmp_path)
    calls: list[bool] = []

    def hold(committing: bool) -> None:
        calls.append(committing)
        if committing:
            store.put("ratchet", b"held", b"written at the commit")

    with store.transaction():
        store.at_end(hold)
        store.at_end(hold)  # once per transaction, however often asked
        with store.transaction():
            store.at_end(hold)  # nested: still the outer one's
        assert calls == []
    assert calls == [True]
    store.close()
    store = Store.open(tmp_path, "correct horse")
    assert store.get("ratchet", b"held") == b"written at the commit"

    class Crash(Exception):
        pass

    def crash() -> None:
        with store.transaction():
            store.at_end(hold)
            raise Crash

    calls.clear()
    with pytest.raises(Crash):
        crash()
    assert calls == [False]
    store.at_end(hold)  # outside a transaction: nothing to wait for
    with store.transaction():
        pass
    assert calls == [False]


def test_retention_purge_with_and_without_the_passphrase(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.add_message(ROOM, b"old", 1000)
    store.add_message(ROOM, b"new", 5000)
    assert store.purge_expired(now=2000) == 1
    assert [v for _, v in store.messages(ROOM)] == [b"new"]
    store.close()
    assert purge_without_unlocking(tmp_path, now=6000) == 1
    assert Store.open(tmp_path, "correct horse").messages(ROOM) == []


def test_wipe_removes_everything(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.put("profile", b"me", SECRET_NAME)
    store.close()
    assert wipe(tmp_path)
    assert not any(p.name.startswith("state.db") for p in tmp_path.iterdir())
    with pytest.raises(NoProfile):
        Store.open(tmp_path, "correct horse")
    assert not wipe(tmp_path)
