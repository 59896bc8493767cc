"""A spoiler in the room: attacks by a member, through the honest relay.

Every test seats a :class:`~tests.adversarial.spoiler.Spoiler` (the real client
with its checks removed) beside honest members, performs one attack, and
asserts that the honest members keep reading what is sent after it and see a
warning that names the sender.
"""

from __future__ import annotations

from collections import Counter

import pytest

from backchannel.client.core import Client, Room
from backchannel.client.relay import RelayError
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import encode
from tests.adversarial.malicious import Tamper, smuggle
from tests.adversarial.spoiler import new_spoiler, seat
from tests.client.helpers import People, heard, online, room_with, say


def warnings(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "warning"]


def sams_keys(client: Client, room: Room, owner: bytes) -> list[int]:
    return sorted(k.generation for k in client.senderkeys.inbound_keys(room) if k.owner == owner)


async def spoiler_room(people: People) -> tuple[Client, Room, Client, Room, Room, Client]:
    """A facilitator, an honest participant (Ann) and a spoiler (Sam), keys exchanged."""
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    sam = new_spoiler(people, "sam")
    sam_room = await seat(people, fac, room, sam)
    for client, r in ((sam, sam_room), (fac, room), (ann, ann_room), (sam, sam_room)):
        await online(client, r)
    return fac, room, ann, ann_room, sam_room, sam


async def test_unreadable_plaintext_does_not_silence_the_room(people: People) -> None:
    """Attack 1: a validly signed and sealed message whose plaintext is not CBOR
    (or not a message) used to raise out of the receive path and stop the room."""
    fac, room, ann, ann_room, sam_room, sam = await spoiler_room(people)
    async with sam.connect([sam_room]) as sock:
        for body in (b"\xff", encode([1, 2]), encode({"t": "text", "text": 7}), b""):
            await sam.post(sock, sam_room, body)  # type: ignore[attr-defined]
    await say(fac, room, "still talking")
    for client, r in ((ann, ann_room), (fac, room)):
        await online(client, r)
        assert heard(client, r) == ["still talking"]
        refused = [w for w in warnings(client, r) if "unreadable message from sam" in w]
        assert len(refused) == 4
    # The cursor moved past them: nothing is redelivered, nothing is warned twice.
    await online(ann, ann_room)
    assert len([w for w in warnings(ann, ann_room) if "unreadable" in w]) == 4
    assert ann.room(ann_room.name).cursor == ann_room.cursor > 0


async def test_a_removed_member_cannot_post_by_naming_an_earlier_epoch(
    people: People, tamper: Tamper
) -> None:
    """Attack 3: a removed member's message naming an epoch from before its removal,
    posted by an accomplice (the relay refuses that) or put in by a relay that
    does not check (the clients refuse it: the check that counts)."""
    fac, room, ann, ann_room, sam_room, sam = await spoiler_room(people)
    mal = new_spoiler(people, "mal")
    mal_room = await seat(people, fac, room, mal)
    for client, r in ((mal, mal_room), (sam, sam_room), (fac, room), (ann, ann_room)):
        await online(client, r)
    before = sam_room.state.epoch
    out = sam.senderkeys.outbound(sam_room)
    kept = out.seal(encode({"t": "text", "text": "words kept for later"}), before)
    await fac.remove(room, sam_room.me)
    for client, r in ((ann, ann_room), (mal, mal_room)):
        await online(client, r)
    # The honest relay will not take it from an accomplice's connection ...
    async with mal.connect([mal_room]) as sock:
        with pytest.raises(RelayError) as refused:
            await sock.request(
                "send", room=room.room_id, **{"from": mal_room.me}, cid=bytes(16), data=kept
            )
    assert refused.value.code == "sender_mismatch"
    # ... and a relay that took it anyway gets it refused by every reader.
    await say(fac, room, "after the removal")
    for client, r in ((ann, ann_room), (fac, room)):
        smuggle(tamper, r, kept)
        await online(client, r)
        assert "words kept for later" not in heard(client, r)
        assert heard(client, r)[-1] == "after the removal"
        assert "a message from sam, who is no longer a member, was refused" in warnings(client, r)


async def test_a_demoted_member_cannot_post_under_its_old_key(
    people: People, tamper: Tamper
) -> None:
    """Attack 3: a participant made an observer keeps its sender key; nothing it
    seals is accepted afterwards, whatever epoch it names."""
    fac, room, ann, ann_room, sam_room, sam = await spoiler_room(people)
    before = sam_room.state.epoch
    demote = L.make_set_role(room.key, room.state, sam_room.me, "observer", fac.now())
    await fac.membership._append(room, demote)
    await online(sam, sam_room)
    # The honest relay refuses an observer's send; a lax one passes it on.
    out = sam.senderkeys.outbound(sam_room)
    old_epoch = out.seal(encode({"t": "text", "text": "naming the old epoch"}), before)
    async with sam.connect([sam_room]) as sock:
        with pytest.raises(RelayError, match="observers"):
            await sam.post(sock, sam_room, encode({"t": "text", "text": "naming the new one"}))  # type: ignore[attr-defined]
    await say(fac, room, "after the demotion")
    smuggle(tamper, ann_room, old_epoch)
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["after the demotion"]
    refused = [w for w in warnings(ann, ann_room) if w.startswith("a message from sam")]
    assert refused == ["a message from sam was refused: its sender may not post (observer)"]


async def test_stash_holds_only_bounded_junk_from_a_member(people: People) -> None:
    """Attack 5: envelopes under a generation nobody was given cannot be checked; they
    are kept only for a current member and within a per-sender budget, and the
    stash is one row per item (no quadratic rewrite)."""
    from backchannel.client.senderkeys import MAX_STASH_PER_SENDER
    from backchannel.protocol.senderkey import OutboundSenderKey

    fac, room, ann, ann_room, sam_room, sam = await spoiler_room(people)
    # A generation Sam never hands out: nobody can open these.
    ghost = OutboundSenderKey.generate(
        sam_room.room_id, sam_room.me, since=sam_room.state.pos,
        previous=sam.senderkeys.outbound(sam_room),
    )
    ghost = OutboundSenderKey.generate(
        sam_room.room_id, sam_room.me, since=sam_room.state.pos, previous=ghost
    )
    cap = 20  # the real bound is MAX_STASH_PER_SENDER; a small one keeps the test fast
    ann.senderkeys._stash.size = cap
    async with sam.connect([sam_room]) as sock:
        for i in range(cap + 10):
            data = ghost.seal(encode({"t": "text", "text": f"junk {i}"}), sam_room.state.epoch)
            await sock.request(
                "send", room=room.room_id, **{"from": sam_room.me}, cid=P.random_bytes(16),
                data=data,
            )
    await say(fac, room, "the dialogue goes on")
    rows = Counter()
    real_put = ann.store.put

    def counting_put(ns: str, key: bytes, value: bytes, *, scope: bytes = b"") -> None:
        rows[ns] += len(value)
        real_put(ns, key, value, scope=scope)

    ann.store.put = counting_put  # type: ignore[method-assign]
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["the dialogue goes on"]
    kept = ann.store.scan("stash", ann_room.room_id + sam_room.me)
    assert len(kept) == cap
    # Each envelope is written once when it comes (and once more when the stash is
    # retried): linear in what came, where rewriting a whole record was quadratic.
    one = len(kept[0])
    assert rows["stash"] < 2 * (cap + 10) * (one + 64)
    assert MAX_STASH_PER_SENDER * one < 2 << 20  # the default bounds bytes too


async def test_a_generation_that_goes_backwards_is_refused(people: People) -> None:
    """Attack 6: a distribution with a lower generation than one held is refused, and
    superseded inbound keys are pruned (one row per key, not a growing record)."""
    _fac, _room, ann, ann_room, sam_room, sam = await spoiler_room(people)
    first = sam.senderkeys.outbound(sam_room)
    for _ in range(3):
        sam.senderkeys.rotate(sam_room, since=sam_room.state.pos)
        await online(sam, sam_room)  # hands the new generation out
    await online(ann, ann_room)
    assert sams_keys(ann, ann_room, sam_room.me) == [3]  # the older ones were complete and are gone
    # Sam now hands out generation 0 again (its first key).
    async with sam.connect([sam_room]) as sock:
        payload = {"skd": first.distribution().to_bytes(), "t": "keys"}
        await sam.sessions.send(sock, sam_room, ann_room.key.public, payload)
    await online(ann, ann_room)
    assert any("pairwise message from sam was refused (stale_sender_key)" in w
               for w in warnings(ann, ann_room))
    assert sams_keys(ann, ann_room, sam_room.me) == [3]
