"""A spoiler in the room: attacks by a member, through the honest relay.

Every test seats a :class:`~tests.adversarial.spoiler.Spoiler` (the real client
with its checks removed) beside honest members, performs one attack, and
asserts that the honest members keep reading what is sent after it and see a
warning that names the sender.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from backchannel.client.core import Client, Room
from backchannel.client.relay import RelayError
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import encode
from tests.adversarial.malicious import store_unchecked
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
    people: People, tmp_path: Path
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
    # ... and a relay that stored it anyway gets it refused by every reader.
    store_unchecked(tmp_path / "relay.db", room.room_id, sam_room.me, kept)
    await say(fac, room, "after the removal")
    for client, r in ((ann, ann_room), (fac, room)):
        await online(client, r)
        assert "words kept for later" not in heard(client, r)
        assert heard(client, r)[-1] == "after the removal"
        assert "a message from sam, who is no longer a member, was refused" in warnings(client, r)


async def test_a_demoted_member_cannot_post_under_its_old_key(
    people: People, tmp_path: Path
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
    store_unchecked(tmp_path / "relay.db", room.room_id, sam_room.me, old_epoch)
    await say(fac, room, "after the demotion")
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


def text(words: str) -> bytes:
    return encode({"t": "text", "text": words})


async def test_a_member_cannot_lock_the_room_by_naming_a_false_epoch(people: People) -> None:
    """Attack 2: the epoch in an envelope is the sender's claim. A random head at a real
    position, or a position beyond the log, is refused with a warning naming the
    sender; its sender is asked for its copy; an answer that does not prove a fork
    (its honest log, or forged events) locks nothing."""
    fac, room, ann, ann_room, sam_room, sam = await spoiler_room(people)
    pos = sam_room.state.pos
    async with sam.connect([sam_room]) as sock:
        await sam.post(sock, sam_room, text("a random head"), epoch=(pos, P.random_bytes(32)))  # type: ignore[attr-defined]
        await sam.post(sock, sam_room, text("far ahead"), epoch=(pos + 50, P.random_bytes(32)))  # type: ignore[attr-defined]
    await say(fac, room, "still talking")
    await online(ann, ann_room)
    claims = [w for w in warnings(ann, ann_room) if "names a room history" in w]
    assert len(claims) == 2
    assert all(w.startswith("a message from sam") for w in claims)
    # Sam's client answers with its real log, which matches Ann's: nothing to prove.
    await online(sam, sam_room)
    await online(ann, ann_room)
    assert ann_room.status == "active"
    # Now Sam answers with a forged alternative event at a real position.
    forged, _ = L.make_invite(
        sam_room.key, sam_room.log.state_at(pos - 1), "facilitator", fac.now() + 60, 9,
        fac.now(), check=False,
    )

    def forged_answer(room: Room, asker: Any, value: Any) -> None:
        sam.forks._answers.append((room, asker.sign, {"t": "log", "events": [forged]}))

    sam.forks.answer = forged_answer  # type: ignore[method-assign]
    async with sam.connect([sam_room]) as sock:
        await sam.post(sock, sam_room, text("again"), epoch=(pos, P.random_bytes(32)))  # type: ignore[attr-defined]
    await online(ann, ann_room)  # refused, asks again
    await online(sam, sam_room)  # the forged answer
    await online(ann, ann_room)
    assert ann_room.status == "active"
    assert any("sam's copy of the room's history does not check out" in w
               for w in warnings(ann, ann_room))
    # An answer nobody asked for is not even checked.
    async with sam.connect([sam_room]) as sock:
        unasked = {"t": "log", "events": [forged]}
        await sam.sessions.send(sock, sam_room, ann_room.key.public, unasked)
    before = len(warnings(ann, ann_room))
    await online(ann, ann_room)
    assert ann_room.status == "active"
    assert len(warnings(ann, ann_room)) == before
    await say(fac, room, "and on")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["still talking", "and on"]


async def test_a_member_cannot_pass_for_the_facilitator_or_the_reader(people: People) -> None:
    """Attack 4: display names are self-asserted. Two spoilers call themselves "fac"
    (the facilitator's name) and "you"; every line, the member list and the
    attributed export still tell them apart, and none is shown as the reader."""
    fac, room, joined = await room_with(people, "ann", rules=L.Rules(mode="attributed"))
    ann, ann_room = joined["ann"]
    fake_fac = new_spoiler(people, "imp1", calls_itself="fac")
    fake_you = new_spoiler(people, "imp2", calls_itself="You")
    seats = [(fake_fac, await seat(people, fac, room, fake_fac))]
    seats.append((fake_you, await seat(people, fac, room, fake_you)))
    for client, r in (*seats, (fac, room), (ann, ann_room), *seats):
        await online(client, r)
    await say(fac, room, "the real facilitator")
    for client, r in seats:
        await say(client, r, "an impostor")
    await online(ann, ann_room)
    by_text: dict[str, list[str]] = {}
    for line in ann.lines(ann_room):
        if line.kind == "message" and line.sender is not None:
            by_text.setdefault(line.text, []).append(ann.display_name(ann_room, line.sender))
    real = by_text["the real facilitator"][0]
    impostors = by_text["an impostor"]
    assert len({real, *impostors}) == 3  # three different labels
    assert real != "fac"  # a collision suffixes both
    assert "you" not in impostors
    assert all(label.lower() != "you" for label in impostors)
    from backchannel.client.views import render_export

    exported = render_export(ann, ann_room, "md")
    for label in (real, *impostors):
        assert label in exported


async def test_a_joiner_cannot_take_a_half_of_another_members_key(people: People) -> None:
    """Attack 7: a join whose X25519 half is another member's signing key (which it
    cannot own) is refused by the relay's validator and by every client's."""
    from dataclasses import replace

    from backchannel.client.relay import RelayError as HttpRefused
    from backchannel.protocol.keys import MemberKeyPair, MemberPublicKey

    fac, room, ann, ann_room, _sam_room, _sam = await spoiler_room(people)
    code = await fac.invite(room, "participant", 3600, 1)
    _, log, _invite = await ann.preview(code)
    from backchannel.protocol.shortcode import read_invite

    seed = read_invite(code).invite_seed
    mine = MemberKeyPair.generate()
    posing = replace(mine, public=MemberPublicKey(sign=mine.public.sign, dh=ann_room.me))
    join = L.make_join(posing, seed, log.state, fac.now(), check=False)
    with pytest.raises(HttpRefused, match=r"membership|reus|half"):
        await ann.http(room.relay).append(room.room_id, join)
    with pytest.raises(L.MembershipError):
        log.append(join)
    await say(fac, room, "nothing changed")
    await online(ann, ann_room)
    assert ann_room.status == "active"
    assert heard(ann, ann_room)[-1] == "nothing changed"
