"""The room log from a client's side: invite, join, remove, leave, each validated."""

from __future__ import annotations

import pytest

from backchannel.client.errors import ClientError
from backchannel.protocol import roomlog as L
from tests.client.helpers import People, online, room_with


async def test_invite_then_join_gives_both_sides_the_same_validated_log(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("Border talks", L.Rules(mode="attributed", retention=3600))
    code = await fac.invite(room, "observer", 3600, 1)
    assert len(room.log) == 2  # create, invite
    ann = people.new("ann")
    seen: list[L.Rules] = []
    ann_room = await ann.join(code, accept_rules=lambda rules: seen.append(rules) or True)
    assert seen == [L.Rules(mode="attributed", retention=3600)]
    assert ann_room.room_id == room.room_id
    new = await fac.sync_log(room)
    assert [type(e) for e in new] == [L.JoinEvent]
    assert room.log.events == ann_room.log.events
    assert room.state.head == ann_room.state.head
    assert room.state.role_of(ann_room.me) == "observer"
    assert ann_room.state.role_of(room.me) == "facilitator"
    # Both stored what they validated, and it validates again when read back.
    assert fac.room(room.name).log.events == ann.room(ann_room.name).log.events
    assert any(line.kind == "notice" and "joined" in line.text for line in fac.lines(room))
    # The code was for one use.
    with pytest.raises(ClientError, match="used up"):
        await people.new("bob").join(code, accept_rules=lambda rules: True)


async def test_refusing_the_rules_joins_nothing(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    code = await fac.invite(room, "participant", 3600, 1)
    ann = people.new("ann")
    with pytest.raises(ClientError, match="did not accept"):
        await ann.join(code, accept_rules=lambda rules: False)
    assert ann.rooms() == []
    assert await fac.sync_log(room) == []
    # The invite is still unused.
    await ann.join(code, accept_rules=lambda rules: True)
    assert len(await fac.sync_log(room)) == 1


async def test_only_a_facilitator_can_invite_or_remove(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob_room = joined["bob"][1]
    length = len(room.log)
    with pytest.raises(ClientError, match="only a facilitator can invite"):
        await ann.invite(ann_room, "participant", 3600, 1)
    with pytest.raises(ClientError, match="only a facilitator can remove"):
        await ann.remove(ann_room, bob_room.me)
    assert await fac.sync_log(room) == []
    assert len(room.log) == length
    await fac.remove(room, bob_room.me)
    assert bob_room.me not in room.state.members
    await ann.sync_log(ann_room)
    assert bob_room.me not in ann_room.state.members
    assert ann_room.log.events == room.log.events


async def test_removal_and_leaving_are_seen_by_the_one_who_goes(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]
    await fac.remove(room, bob_room.me)
    await online(bob, bob_room)
    assert bob.room(bob_room.name).status == "removed"
    await ann.leave(ann_room)
    assert ann.room(ann_room.name).status == "left"
    with pytest.raises(ClientError, match="no longer a member"):
        await ann.invite(ann_room, "participant", 3600, 1)
    await fac.sync_log(room)
    assert set(room.state.members) == {room.me}
    notices = [line.text for line in fac.lines(room) if line.kind == "notice"]
    assert any("was removed; keys rotated" in text for text in notices)
    assert any(text.endswith("left; keys rotated") for text in notices)
