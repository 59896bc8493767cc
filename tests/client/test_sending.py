"""The send path: room messages to everyone, sidebars to one member, nothing from observers."""

from __future__ import annotations

import pytest

from backchannel.client.errors import ClientError
from backchannel.protocol import roomlog as L
from backchannel.protocol.envelope import RoomEnvelope
from tests.client.helpers import People, heard, online, room_with, say
from tests.server.helpers import RelayServer


async def test_a_room_message_is_sealed_stored_and_acknowledged(
    people: People, relay: RelayServer
) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    await say(fac, room, "for the record")
    assert fac.outbox.pending() == []  # acknowledged, so no longer queued
    (stored,) = relay.call(relay.store.room_messages_after(room.room_id, 0, 10))
    assert b"for the record" not in stored.data
    envelope = RoomEnvelope.from_bytes(stored.data)
    assert (envelope.sender, envelope.generation, envelope.index) == (room.me, 0, 0)
    (line,) = fac.lines(room)
    assert (line.kind, line.text, line.sender) == ("message", "for the record", room.me)
    assert line.mine


async def test_an_observer_cannot_post(people: People, relay: RelayServer) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    obs = people.new("obs")
    obs_room = await obs.join(
        await fac.invite(room, "observer", 3600, 1), accept_rules=lambda r: True
    )
    await online(fac, room)
    await online(obs, obs_room)
    with pytest.raises(ClientError, match="observers cannot post"):
        await say(obs, obs_room, "may I add something?")
    assert relay.call(relay.store.room_messages_after(room.room_id, 0, 10)) == []
    assert obs.outbox.pending() == []
    assert heard(obs, obs_room) == []
    # Observers still read what is said.
    await say(fac, room, "welcome, observers")
    await online(obs, obs_room)
    assert heard(obs, obs_room) == ["welcome, observers"]


async def test_a_sidebar_reaches_only_its_recipient(people: People, relay: RelayServer) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]
    async with fac.connect([room]) as sock:
        await fac.send_text(sock, room, "can you live with 2027?", to=ann_room.me)
        with pytest.raises(ClientError, match="not in the room"):
            await fac.send_text(sock, room, "lost", to=b"\x00" * 32)
    # Nothing went to the room.
    assert relay.call(relay.store.room_messages_after(room.room_id, 0, 10)) == []
    await online(ann, ann_room)
    await online(bob, bob_room)
    got = [(x.kind, x.text, x.sender, x.to) for x in ann.lines(ann_room) if x.kind == "sidebar"]
    assert got == [("sidebar", "can you live with 2027?", room.me, ann_room.me)]
    assert not [x for x in bob.lines(bob_room) if "2027" in x.text]
    mine = [(x.text, x.to, x.mine) for x in fac.lines(room) if x.kind == "sidebar"]
    assert mine == [("can you live with 2027?", ann_room.me, True)]
    assert heard(ann, ann_room) == []
