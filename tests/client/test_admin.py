"""A facilitator's levers through a real relay: roles, rule changes, invites and their
revocation, and what every member's client makes of them."""

from __future__ import annotations

import pytest

from backchannel.client.core import Client, ClientError, Room
from backchannel.client.views import render_export
from backchannel.protocol import roomlog as L
from tests.client.helpers import People, heard, online, room_with, say
from tests.server.helpers import FakeClock, RelayServer


def notices(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "notice"]


def generations(client: Client, room: Room) -> list[int]:
    return sorted(k.generation for k in client.senderkeys.inbound_keys(room))


async def test_roles_promote_observe_and_back_without_rotating_keys(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]

    await fac.set_role(room, ann_room.me, "facilitator")
    await ann.sync_log(ann_room)
    assert ann_room.state.role_of(ann_room.me) == "facilitator"
    assert any(n.startswith("you are now a facilitator") for n in notices(ann, ann_room))
    await ann.invite(ann_room, "participant", 3600, 1)  # a co-facilitator can invite

    await fac.set_role(room, bob_room.me, "observer")
    await online(bob, bob_room)
    assert any(n.startswith("you are now an observer") for n in notices(bob, bob_room))
    with pytest.raises(ClientError, match="observers cannot post"):
        await say(bob, bob_room, "may I?")
    await fac.set_role(room, bob_room.me, "participant")
    await say(bob, bob_room, "back in")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["back in"]
    # Nobody left: a role change rotates no key (docs/client.md, "Roles and rule changes").
    assert generations(ann, ann_room) == [0, 0]  # fac's and bob's first keys
    assert ann.senderkeys.outbound(ann_room).generation == 0
    assert any("is now an observer" in n for n in notices(ann, ann_room))


async def test_the_last_facilitator_cannot_step_down(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann_room = joined["ann"][1]
    length = len(room.log)
    with pytest.raises(ClientError, match="only facilitator and cannot step down"):
        await fac.set_role(room, room.me, "participant")
    assert len(room.log) == length
    await fac.set_role(room, ann_room.me, "facilitator")
    await fac.set_role(room, room.me, "participant")  # now someone is left to facilitate
    assert room.state.facilitators() == [ann_room.me]


async def test_only_a_facilitator_may_change_roles_rules_or_invites(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    await fac.invite(room, "participant", 3600, 1)
    await ann.sync_log(ann_room)
    length = len(room.log)
    with pytest.raises(ClientError, match="only a facilitator can change roles"):
        await ann.set_role(ann_room, ann_room.me, "facilitator")
    with pytest.raises(ClientError, match="only a facilitator can change the rules"):
        await ann.set_rules(ann_room, L.Rules("attributed"))
    with pytest.raises(ClientError, match="only a facilitator can revoke"):
        await ann.revoke_invite(ann_room, (await ann.invites(ann_room))[0].key)
    with pytest.raises(ClientError, match="no such member"):
        await fac.set_role(room, bytes(32), "observer")
    assert await fac.sync_log(room) == []
    assert len(room.log) == length


async def test_a_mode_change_is_noticed_and_never_attributes_what_was_said_before(
    people: People,
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    await say(fac, room, "said under chatham")
    await fac.set_rules(room, L.Rules("attributed", room.state.rules.retention))
    await say(fac, room, "said on the record")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["said under chatham", "said on the record"]
    assert any(
        "from now on this room is on the record" in n and "stays chatham" in n
        for n in notices(ann, ann_room)
    )
    md = render_export(ann, ann_room, "md")
    assert "**fac**: said on the record" in md
    assert "— said under chatham" in md
    assert "**fac**: said under chatham" not in md
    assert "before the room went on the record are not attributed" in md
    # Back to chatham: from then on nothing is attributed, earlier lines included.
    await fac.set_rules(room, L.Rules("chatham", room.state.rules.retention))
    await ann.sync_log(ann_room)
    assert "**fac**" not in render_export(ann, ann_room, "md")


async def test_an_anonymous_room_cannot_be_made_named(people: People) -> None:
    fac, room, _ = await room_with(people, "ann", rules=L.Rules("anonymous"))
    with pytest.raises(ClientError, match="cannot be made named"):
        await fac.set_rules(room, L.Rules("attributed"))
    with pytest.raises(ClientError, match="already has these rules"):
        await fac.set_rules(room, L.Rules("anonymous"))
    await fac.set_rules(room, L.Rules("anonymous", 3600))  # retention may change


async def test_a_shorter_retention_applies_on_the_relay_and_to_copies_held(
    people: People, relay: RelayServer, clock: FakeClock
) -> None:
    fac, room, joined = await room_with(people, "ann", rules=L.Rules(retention=7 * 86400))
    ann, ann_room = joined["ann"]
    await say(fac, room, "kept a week, then an hour")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["kept a week, then an hour"]
    await fac.set_rules(room, L.Rules("chatham", 3600))
    await ann.sync_log(ann_room)
    assert any("messages are kept 1 hour" in n for n in notices(ann, ann_room))
    clock.advance(2 * 3600)
    assert relay.call(relay.store.purge())["room_messages"] == 1
    assert heard(ann, ann_room) == []
    assert heard(fac, room) == []


async def test_invites_are_listed_and_a_revoked_one_admits_nobody(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    keep = await fac.invite(room, "observer", 3600, 2)
    drop = await fac.invite(room, "participant", 3600, 1)
    bob = people.new("bob")
    bob_room = await bob.join(keep, accept_rules=lambda r: True)
    found = await fac.invites(room)
    assert [(i.role, i.uses_left) for i in found] == [("observer", 1), ("participant", 1)]
    assert all(len(i.id) == 8 and i.key.hex().startswith(i.id) for i in found)
    revoked = await fac.revoke_invite(room, found[1].id)
    assert revoked.key == found[1].key
    assert [i.key for i in await fac.invites(room)] == [found[0].key]
    with pytest.raises(ClientError, match="no open invite"):
        await fac.revoke_invite(room, found[1].id)
    with pytest.raises(ClientError, match="expired, used up or unknown"):
        await people.new("eve").join(drop, accept_rules=lambda r: True)
    await bob.sync_log(bob_room)
    assert any(f"invite {found[1].id} was revoked" in n for n in notices(bob, bob_room))
    await people.new("ann").join(keep, accept_rules=lambda r: True)  # the other still works
    assert await fac.invites(room) == []
