"""Attacks on a facilitator's levers (roles, rules, invites), each made by a real
client with its own checks removed: it builds the event the honest client would
refuse to build and sends it to the relay itself."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from backchannel.client.core import ClientError, pseudonym
from backchannel.client.relay import RelayError
from backchannel.client.views import render_export
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import MemberKeyPair
from backchannel.protocol.shortcode import read_invite
from tests.adversarial.spoiler import new_spoiler, seat
from tests.client.helpers import People, online, room_with, say


def store_event_unchecked(db: Path, room_id: bytes, data: bytes) -> None:
    """Play a relay that appends a log event it should have refused."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            query = "SELECT log_len FROM rooms WHERE id = ?"
            (length,) = conn.execute(query, (room_id,)).fetchone()
            digest = L.event_hash(data)
            conn.execute(
                "INSERT INTO log_events (room_id, pos, hash, data) VALUES (?, ?, ?, ?)",
                (room_id, length, digest, data),
            )
            conn.execute(
                "UPDATE rooms SET log_len = ?, head = ? WHERE id = ?", (length + 1, digest, room_id)
            )
    finally:
        conn.close()


async def test_a_participant_cannot_promote_itself_change_the_rules_or_revoke(
    people: People,
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    code = await fac.invite(room, "participant", 3600, 1)
    sam = new_spoiler(people, "sam")
    sam_room = await seat(people, fac, room, sam)
    for client, r in ((sam, sam_room), (fac, room), (ann, ann_room)):
        await client.sync_log(r)
    invite = read_invite(code).invite_seed
    s, now = sam_room.state, sam.now()
    forged = [
        L.make_set_role(sam_room.key, s, sam_room.me, "facilitator", now, check=False),
        L.make_set_rules(sam_room.key, s, L.Rules("attributed"), now, check=False),
        L.make_revoke(sam_room.key, s, P.ed25519_public(invite), now, check=False),
    ]
    for data in forged:
        with pytest.raises(RelayError) as refused:
            await sam.http(sam_room.relay).append(room.room_id, data)
        assert refused.value.code == "not_authorized"
    assert await fac.sync_log(room) == []
    assert await ann.sync_log(ann_room) == []
    assert room.state.rules == L.Rules()
    assert room.state.role_of(sam_room.me) == "participant"
    await people.new("bob").join(code, accept_rules=lambda r: True)  # the invite still works


async def test_a_forged_rule_change_a_relay_serves_locks_the_room_without_a_crash(
    people: People, tmp_path: Path
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    sam = new_spoiler(people, "sam")
    sam_room = await seat(people, fac, room, sam)
    await ann.sync_log(ann_room)
    forged = L.make_set_rules(
        sam_room.key, ann_room.state, L.Rules("attributed"), sam.now(), check=False
    )
    store_event_unchecked(tmp_path / "relay.db", room.room_id, forged)
    assert await ann.sync_log(ann_room) == []  # refused, and nothing raised
    assert ann_room.status == "compromised"
    assert "not_authorized" in (ann_room.problem or "")
    assert ann_room.state.rules == L.Rules()


async def test_a_revoked_code_cannot_join_even_skipping_the_clients_checks(
    people: People,
) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    code = await fac.invite(room, "participant", 3600, 1)
    sam = new_spoiler(people, "sam")
    code_log = await sam.preview(code)  # seen while the code was good
    await fac.revoke_invite(room, (await fac.invites(room))[0].id)
    with pytest.raises(ClientError, match="expired, used up or unknown"):
        await sam.join(code, accept_rules=lambda r: True)
    # A join built from the log as it stood, sent straight to the relay.
    seed = read_invite(code).invite_seed
    stale = code_log[1]
    for state in (stale.state, room.state):
        join = L.make_join(MemberKeyPair.generate(), seed, state, sam.now(), check=False)
        with pytest.raises(RelayError) as refused:
            await sam.http(room.relay).append(room.room_id, join)
        assert refused.value.code in ("invalid_invite", "chain_broken")
    assert [type(e) for e in await fac.sync_log(room)] == []
    assert list(room.state.members) == [room.me]


async def test_a_hostile_facilitator_cannot_unmask_an_anonymous_room(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", rules=L.Rules("anonymous"))
    ann, ann_room = joined["ann"]
    sam = new_spoiler(people, "sam")
    sam_room = await seat(people, fac, room, sam)
    await fac.set_role(room, sam_room.me, "facilitator")
    for client, r in ((sam, sam_room), (ann, ann_room), (fac, room), (sam, sam_room)):
        await online(client, r)
    await say(ann, ann_room, "said anonymously")
    await sam.sync_log(sam_room)
    # The honest client refuses to build this; the spoiler builds it anyway.
    with pytest.raises(ClientError, match="cannot be made named"):
        await sam.set_rules(sam_room, L.Rules("attributed"))
    unmask = L.make_set_rules(sam_room.key, sam_room.state, L.Rules("attributed"), sam.now())
    await sam.http(sam_room.relay).append(room.room_id, unmask)
    await online(ann, ann_room)  # nothing raises out of the receive path
    warned = [line.text for line in ann.lines(ann_room) if line.kind == "warning"]
    assert any("your name stays hidden" in w for w in warned)
    # Ann's client hands out her name nowhere, even after she changes it.
    ann.update_profile(name="Ann Realname")
    await online(ann, ann_room)
    await sam.sync_log(sam_room)
    await online(sam, sam_room)
    assert sam.display_name(sam_room, ann_room.me) == pseudonym(room.room_id, ann_room.me)
    exported = render_export(sam, sam_room, "md")
    assert "said anonymously" in exported
    assert "Ann" not in exported
    assert "**" not in exported  # what was said anonymously is attributed to nobody
