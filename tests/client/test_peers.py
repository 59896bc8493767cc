"""Peers: what members told us about themselves, display names, pseudonyms, verification."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from backchannel.client.peers import MAX_AFFILIATION, MAX_NAME, Peers, pseudonym
from backchannel.client.room import Room
from backchannel.client.store import Store
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import MemberKeyPair

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
NOW = 1_800_000_000


def shared_room(mode: L.Mode, n: int = 2) -> tuple[Room, list[MemberKeyPair]]:
    """A room validated locally with a facilitator and ``n`` joined members; the
    Room is the facilitator's view (replace ``key`` for another member's)."""
    fac = MemberKeyPair.generate()
    create = L.make_create(fac, L.Rules(mode=mode), NOW)
    log = L.validate_log([create])
    members = []
    for _ in range(n):
        member = MemberKeyPair.generate()
        invite, seed = L.make_invite(fac, log.state, "participant", NOW + 3600, 1, NOW)
        log.append(invite)
        log.append(L.make_join(member, seed, log.state, NOW))
        members.append(member)
    room = Room(
        room_id=L.event_hash(create), name="r", title="R", relay="http://127.0.0.1:1",
        key=fac, log=log,
    )
    return room, members


def peers_in(tmp_path: Path, who: str) -> Peers:
    return Peers(Store.create(tmp_path / who, "pw", **FAST))


def test_learn_keeps_clipped_names_in_open_rooms(tmp_path: Path) -> None:
    peers = peers_in(tmp_path, "fac")
    room, (ann, _bob) = shared_room("chatham")
    sign = ann.public.sign
    peers.learn(room, sign, "A" * 100, "I" * 300)
    record = peers.get(room, sign)
    assert record.name == "A" * MAX_NAME
    assert record.affiliation == "I" * MAX_AFFILIATION
    # Non-text values change nothing; a later profile replaces only what it names.
    peers.learn(room, sign, 7, None)
    assert peers.get(room, sign) == record
    peers.learn(room, sign, "Ann", None)
    assert peers.get(room, sign).name == "Ann"
    assert peers.get(room, sign).affiliation == "I" * MAX_AFFILIATION
    # Rows are per room: the same key in another room knows nothing.
    other, _ = shared_room("chatham")
    assert peers.get(other, sign).name is None


def test_learn_keeps_nothing_in_anonymous_rooms(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "fac", "pw", **FAST)
    peers = Peers(store)
    room, (ann, _bob) = shared_room("anonymous")
    peers.learn(room, ann.public.sign, "Ann Aldridge", "Ministry of Foreign Affairs")
    assert peers.get(room, ann.public.sign).name is None
    assert peers.get(room, ann.public.sign).affiliation is None
    assert store.values("peer") == []  # not even an empty row was stored
    view = next(m for m in peers.members(room) if m.key.sign == ann.public.sign)
    assert view.name == pseudonym(room.room_id, ann.public.sign)
    assert view.affiliation is None


def test_display_name_is_you_then_learned_name_then_pseudonym(tmp_path: Path) -> None:
    peers = peers_in(tmp_path, "fac")
    room, (ann, bob) = shared_room("attributed")
    peers.learn(room, ann.public.sign, "Ann", "Institute")
    assert peers.display_name(room, room.me) == "you"
    assert peers.display_name(room, ann.public.sign) == "Ann"
    assert peers.display_name(room, bob.public.sign) == pseudonym(room.room_id, bob.public.sign)
    peers.learn(room, bob.public.sign, "", None)  # an empty name is no name
    assert peers.display_name(room, bob.public.sign) == pseudonym(room.room_id, bob.public.sign)
    views = peers.members(room)
    assert views[0].me
    assert views[0].name == pseudonym(room.room_id, room.me)  # no profile name here
    assert views[0].role == "facilitator"
    ann_view = next(m for m in views if m.key.sign == ann.public.sign)
    assert (ann_view.name, ann_view.affiliation) == ("Ann", "Institute")
    assert ann_view.role == "participant"


def test_pseudonyms_are_the_same_on_every_client_and_differ_per_room(tmp_path: Path) -> None:
    room, (ann, bob) = shared_room("anonymous")
    fac_peers = peers_in(tmp_path, "fac")
    ann_peers = peers_in(tmp_path, "ann")
    ann_room = replace(room, key=ann)
    bob_sign = bob.public.sign
    assert fac_peers.display_name(room, bob_sign) == ann_peers.display_name(ann_room, bob_sign)
    assert fac_peers.display_name(room, room.me) == "you"
    assert ann_peers.display_name(ann_room, room.me) == pseudonym(room.room_id, room.me)
    assert ann_peers.display_name(ann_room, ann.public.sign) == "you"
    assert pseudonym(room.room_id, bob_sign) != pseudonym(b"\x01" * 32, bob_sign)
    assert pseudonym(room.room_id, bob_sign) != pseudonym(room.room_id, ann.public.sign)


def test_mark_verified_shows_in_members_and_survives_a_restart(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "fac", "pw", **FAST)
    peers = Peers(store)
    room, (ann, bob) = shared_room("chatham")
    peers.learn(room, ann.public.sign, "Ann", None)
    ann_view = next(m for m in peers.members(room) if m.key.sign == ann.public.sign)
    assert not ann_view.verified
    peers.mark_verified(room, ann_view)
    store.close()
    peers = Peers(Store.open(tmp_path / "fac", "pw"))
    verified = {m.key.sign: m.verified for m in peers.members(room)}
    assert verified == {room.me: False, ann.public.sign: True, bob.public.sign: False}
    # Verifying keeps what the member told us.
    assert peers.get(room, ann.public.sign).name == "Ann"
    assert peers.find(room, "Ann").verified


def test_the_name_table_follows_rollbacks_and_other_writers_without_reading_per_line(
    tmp_path: Path,
) -> None:
    """Issue 14: a name is shown from the table in memory, read again from the store
    only when the store may have changed (a write to the peer rows, or a rollback)."""
    store = Store.create(tmp_path / "fac", "pw", **FAST)
    peers = Peers(store)
    room, (ann, _bob) = shared_room("chatham")
    sign = ann.public.sign
    peers.learn(room, sign, "Ann", None)
    assert peers.display_name(room, sign) == "Ann"

    reads: list[str] = []
    real_get = store.get

    def counting_get(ns: str, key: bytes) -> bytes | None:
        reads.append(ns)
        return real_get(ns, key)

    store.get = counting_get  # type: ignore[method-assign]
    for _ in range(50):
        assert peers.display_name(room, sign) == "Ann"
    assert reads.count("peer") == 0  # nothing changed: no row decrypted per line

    # A name learned inside a transaction that is then rolled back is not shown.
    try:
        with store.transaction():
            peers.learn(room, sign, "Mallory", None)
            assert peers.display_name(room, sign) == "Mallory"
            raise RuntimeError("abandoned")
    except RuntimeError:
        pass
    assert peers.display_name(room, sign) == "Ann"

    # A row written past this Peers (another instance on the same store) is seen.
    other = Peers(store)
    other.learn(room, sign, "Ann Aldridge", None)
    assert peers.display_name(room, sign) == "Ann Aldridge"
