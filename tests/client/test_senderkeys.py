"""Sender keys: ours handed to every member, others' kept per (owner, generation),
retired and rotated on a departure, and only accepted from their owner for their room."""

from __future__ import annotations

import pytest

from backchannel.protocol import roomlog as L
from backchannel.protocol.errors import StaleSenderKey, UnknownSenderKey
from tests.client.helpers import People, heard, online, room_with, say


async def test_after_going_online_each_side_holds_the_others_key(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    assert fac.senderkeys.outbound(room).generation == 0
    assert ann.senderkeys.outbound(ann_room).generation == 0
    from_ann = fac.senderkeys.inbound(room, ann_room.me, 0)
    from_fac = ann.senderkeys.inbound(ann_room, room.me, 0)
    assert from_ann is not None
    assert from_fac is not None
    assert (from_ann.owner, from_ann.generation) == (ann_room.me, 0)
    assert (from_fac.owner, from_fac.generation) == (room.me, 0)
    # Nobody keeps an inbound copy of their own key, and no generation 1 exists yet.
    assert fac.senderkeys.inbound(room, room.me, 0) is None
    assert fac.senderkeys.inbound(room, ann_room.me, 1) is None
    assert [k.owner for k in fac.senderkeys.inbound_keys(room)] == [ann_room.me]


async def test_a_removal_retires_keys_and_rotates_ours(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]
    await online(ann, ann_room)  # Ann now holds Bob's key too
    assert ann.senderkeys.inbound(ann_room, bob_room.me, 0) is not None
    await fac.remove(room, bob_room.me)
    removal = room.state.pos
    assert isinstance(room.log.decoded(removal), L.RemoveEvent)
    assert fac.senderkeys.outbound(room).generation == 1
    assert fac.senderkeys.outbound(room).since == removal
    # The remaining members' keys stop at the removal; the removed member's are forgotten.
    assert {k.owner: k.retired_at for k in fac.senderkeys.inbound_keys(room)} == {
        ann_room.me: removal,
    }
    await ann.sync_log(ann_room)  # Ann sees the removal: the same on her side
    assert ann.senderkeys.outbound(ann_room).generation == 1
    assert {k.owner: k.retired_at for k in ann.senderkeys.inbound_keys(ann_room)} == {
        room.me: removal,
    }
    await online(fac, room)  # the new key goes out the next time we are online
    await online(ann, ann_room)
    new = ann.senderkeys.inbound(ann_room, room.me, 1)
    assert new is not None
    assert new.retired_at is None
    # Bob, removed, never receives generation 1 of anyone's key.
    await online(bob, bob_room)
    assert bob.senderkeys.inbound(bob_room, room.me, 1) is None
    assert bob.senderkeys.inbound(bob_room, ann_room.me, 1) is None
    await say(fac, room, "after bob left")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["after bob left"]


async def test_accept_refuses_a_key_for_another_room_or_owner(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    other = await fac.create_room("another", L.Rules())
    theirs = fac.senderkeys.outbound(room).distribution()
    elsewhere = fac.senderkeys.outbound(other).distribution()
    before = ann.senderkeys.inbound_keys(ann_room)
    with pytest.raises(UnknownSenderKey):
        ann.senderkeys.accept(ann_room, ann_room.me, theirs)  # not the sender's own key
    with pytest.raises(UnknownSenderKey):
        ann.senderkeys.accept(ann_room, other.me, elsewhere)  # the owner's key, wrong room
    after = ann.senderkeys.inbound_keys(ann_room)
    assert [k.to_bytes() for k in after] == [k.to_bytes() for k in before]
    assert ann.senderkeys.inbound(ann_room, other.me, 0) is None


async def test_generations_only_go_up(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    first = fac.senderkeys.outbound(room).distribution()
    with fac.store.transaction():
        fac.senderkeys.rotate(room, since=room.state.pos)
    await online(fac, room)  # hands out generation 1
    await online(ann, ann_room)
    assert ann.senderkeys.inbound(ann_room, room.me, 1) is not None
    # Nothing was sent under generation 0, so it is no longer kept ...
    assert ann.senderkeys.inbound(ann_room, room.me, 0) is None
    # ... and a relay or peer replaying it cannot bring it back.
    with pytest.raises(StaleSenderKey):
        ann.senderkeys.accept(ann_room, room.me, first)
    assert ann.senderkeys.inbound(ann_room, room.me, 0) is None


async def test_accepting_a_key_again_keeps_its_progress(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    first = fac.senderkeys.outbound(room).distribution()
    await say(fac, room, "one")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["one"]
    key = ann.senderkeys.inbound(ann_room, room.me, 0)
    assert key is not None
    assert key.index == 1
    # A redelivered distribution must not rewind the chain (or "one" would open twice).
    assert ann.senderkeys.accept(ann_room, room.me, first) is False
    again = ann.senderkeys.inbound(ann_room, room.me, 0)
    assert again is not None
    assert again.index == 1
