"""The client library against a real relay on 127.0.0.1: retention, verification,
leaving, removal, and an interrupted send that is delivered exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from backchannel.client import relay as transport
from backchannel.client.core import ClientError
from backchannel.protocol import roomlog as L
from backchannel.protocol.envelope import RoomEnvelope
from backchannel.protocol.errors import ProtocolError
from backchannel.protocol.keys import PreKeyUpload
from tests.client.helpers import People, heard, online, room_with, say
from tests.server.helpers import FakeClock, RelayServer


async def test_retention_deletes_on_the_relay_and_on_clients(
    people: People, relay: RelayServer, clock: FakeClock
) -> None:
    fac, room, joined = await room_with(people, "ann", rules=L.Rules(retention=60))
    ann, ann_room = joined["ann"]
    await say(fac, room, "this should not outlive the hour")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["this should not outlive the hour"]
    clock.advance(120)
    purged = relay.call(relay.store.purge())
    assert purged["room_messages"] == 1
    assert heard(ann, ann_room) == []
    assert heard(fac, room) == []
    # Nothing comes back from the relay either: a fresh subscription from 0 is empty.
    ann_room.cursor = 0
    await online(ann, ann_room)
    assert heard(ann, ann_room) == []


async def test_safety_numbers_match_and_verification_is_recorded(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    fac_view_of_ann = fac.member(room, "ann")
    ann_view_of_fac = ann.member(ann_room, "fac")
    assert fac.safety(room, fac_view_of_ann) == ann.safety(ann_room, ann_view_of_fac)
    assert not fac_view_of_ann.verified
    fac.mark_verified(room, fac_view_of_ann)
    assert fac.member(room, "ann").verified


async def test_removed_member_cannot_open_what_is_sent_afterwards(
    people: People, relay: RelayServer
) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]
    await say(fac, room, "before")
    await online(bob, bob_room)
    assert heard(bob, bob_room) == ["before"]

    await fac.remove(room, bob_room.me)
    await say(fac, room, "after the removal")
    await online(ann, ann_room)
    assert "after the removal" in heard(ann, ann_room)

    # Even if a relay handed Bob the new ciphertext, he holds no key for it.
    stored = relay.call(relay.store.room_messages_after(room.room_id, 0, 100))
    latest = RoomEnvelope.from_bytes(stored[-1].data)
    assert latest.generation == 1  # the facilitator rotated
    bob_keys = {(k.owner, k.generation): k for k in bob.senderkeys.inbound_keys(bob_room)}
    assert (latest.sender, latest.generation) not in bob_keys
    for key in bob_keys.values():
        with pytest.raises(ProtocolError):
            key.open(latest)
    await online(bob, bob_room)
    assert bob_room.status == "removed"
    assert "after the removal" not in heard(bob, bob_room)
    with pytest.raises(ClientError, match="no longer a member"):
        await say(bob, bob_room, "hello?")


async def test_leaving_rotates_everyone_elses_keys(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    await ann.leave(ann_room)
    assert ann_room.status == "left"
    await online(fac, room)
    notices = [line.text for line in fac.lines(room) if line.kind == "notice"]
    assert any("left" in text and "rotated" in text for text in notices)


async def test_interrupted_send_is_delivered_exactly_once(
    people: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    real_request = transport.RelaySocket.request

    async def cut(self: transport.RelaySocket, kind: str, **fields: object) -> object:
        if kind == "send":
            await self.close()  # the connection drops after the message was sealed and stored
            raise transport.RelayError("disconnected", "the connection to the relay closed")
        return await real_request(self, kind, **fields)  # type: ignore[arg-type]

    monkeypatch.setattr(transport.RelaySocket, "request", cut)
    with pytest.raises(transport.RelayError):
        await say(fac, room, "sealed before the cut")
    assert len(fac.outbox.pending()) == 1
    monkeypatch.setattr(transport.RelaySocket, "request", real_request)
    await online(fac, room)  # reconnecting sends the outbox
    assert fac.outbox.pending() == []
    await online(fac, room)  # a second flush finds nothing to resend
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["sealed before the cut"]


async def test_queued_send_goes_before_a_newer_one(
    people: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    real_request = transport.RelaySocket.request

    async def cut(self: transport.RelaySocket, kind: str, **fields: object) -> object:
        if kind == "send":
            raise transport.RelayError("timeout", "the relay did not acknowledge in time")
        return await real_request(self, kind, **fields)  # type: ignore[arg-type]

    async with fac.connect([room]) as sock:
        monkeypatch.setattr(transport.RelaySocket, "request", cut)
        with pytest.raises(transport.RelayError):
            await fac.send_text(sock, room, "first, but stuck")
        monkeypatch.setattr(transport.RelaySocket, "request", real_request)
        # On the same connection (as in the chat screen before a reconnect):
        # the stuck one must go first, or receivers would see a reordering.
        await fac.send_text(sock, room, "second")
    assert fac.outbox.pending() == []
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["first, but stuck", "second"]
    assert not [w for w in ann.lines(ann_room) if w.kind == "warning"]


async def test_one_time_prekeys_are_replenished(people: People, relay: RelayServer) -> None:
    # One claimer stands in for many peers below; on its own it would meet the relay's
    # per-target claim budget (rate_prekey_claims_per_target) first.
    relay.app.state.limits.define("prekey_claims_per_target", "1000/minute")
    fac, room, joined = await room_with(people, "ann")
    http = fac.http(room.relay)
    member = room.key.public

    async def available() -> dict[str, int]:
        empty = PreKeyUpload(member=member, prekeys=[]).to_bytes()
        counts: dict[str, int] = (await http.upload_prekeys(empty))["counts"]
        return counts

    before = await available()
    assert before["opk"] > 0
    # Others claim every one-time prekey (as many peers, or a hostile relay, would).
    signer = joined["ann"][1].key.sign_seed
    for _ in range(before["opk"]):
        await http.claim(member.sign, signer)
    assert (await available())["opk"] == 0
    await online(fac, room)
    assert (await available())["opk"] >= 5


async def test_anonymous_rooms_share_no_names(people: People) -> None:
    from backchannel.client.core import pseudonym
    from backchannel.client.views import render_export

    fac, room, joined = await room_with(people, "ann", rules=L.Rules(mode="anonymous"))
    ann, ann_room = joined["ann"]
    await say(ann, ann_room, "speaking freely")
    await online(fac, room)
    view = fac.member(room, pseudonym(room.room_id, ann_room.me))
    assert view.name == pseudonym(room.room_id, ann_room.me)
    assert view.affiliation is None
    # The name never travelled: the facilitator's store has no trace of it.
    assert fac.peers.get(room, ann_room.me).name is None
    lines = [line for line in fac.lines(room) if line.kind == "message"]
    assert fac.display_name(room, lines[0].sender or b"") == view.name
    # Every client derives the same pseudonym.
    assert ann.display_name(ann_room, ann_room.me) == "you"
    assert pseudonym(ann_room.room_id, ann_room.me) == view.name
    exported = render_export(fac, room, "json")
    assert "speaking freely" in exported
    assert view.name not in exported
    assert "ann" not in exported


async def test_attributed_export_keeps_names(people: People) -> None:
    from backchannel.client.views import render_export

    fac, room, joined = await room_with(people, "ann", rules=L.Rules(mode="attributed"))
    ann, ann_room = joined["ann"]
    await say(ann, ann_room, "on the record")
    await online(fac, room)
    exported = render_export(fac, room, "md")
    assert "**ann**: on the record" in exported


async def test_a_log_that_does_not_validate_locks_the_room(people: People, tmp_path: Path) -> None:
    """A relay that serves a forged log event: the client reports it, marks the room
    compromised and refuses to encrypt to it (issue #6 covers the full attack set)."""
    import sqlite3

    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    await fac.invite(room, "participant", 3600, 1)  # a new event Ann has not seen yet
    pos = room.state.pos
    db = sqlite3.connect(tmp_path / "relay.db")
    (data,) = db.execute(
        "SELECT data FROM log_events WHERE room_id = ? AND pos = ?", (room.room_id, pos)
    ).fetchone()
    forged = bytearray(data)
    forged[-1] ^= 1  # inside the signature
    db.execute(
        "UPDATE log_events SET data = ? WHERE room_id = ? AND pos = ?",
        (bytes(forged), room.room_id, pos),
    )
    db.commit()
    db.close()
    await ann.sync_log(ann_room)
    assert ann_room.status == "compromised"
    assert "does not validate" in (ann_room.problem or "")
    assert any(line.kind == "warning" for line in ann.lines(ann_room))
    with pytest.raises(ClientError, match="failed validation"):
        await say(ann, ann_room, "should never be encrypted")
    # The state survives a restart: the lock is persistent.
    assert ann.room(ann_room.name).status == "compromised"


async def test_signed_prekey_is_rotated_weekly(people: People, clock: FakeClock) -> None:
    from backchannel.protocol.keys import PreKeyBundle

    fac, room, joined = await room_with(people, "ann")
    ann_room = joined["ann"][1]
    http = fac.http(room.relay)
    first = PreKeyBundle.from_bytes(await http.claim(room.me, ann_room.key.sign_seed)).spk
    clock.advance(8 * 86_400)
    await online(fac, room)
    second = PreKeyBundle.from_bytes(await http.claim(room.me, ann_room.key.sign_seed)).spk
    assert second.id > first.id
    assert second.ts >= first.ts + 8 * 86_400
    # The previous one is kept for handshakes already on their way; older ones go.
    spk_ids = [p.id for p in fac.prekeys.stored(room) if p.kind == "spk"]
    assert sorted(spk_ids) == [first.id, second.id]
