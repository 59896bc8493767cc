"""A malicious relay against the real client library (issue #6 §1, DESIGN.md §1).

Each test makes the relay lie in one way and checks what the client does:
the lie is detected and reported to the user (a warning in the transcript, or
the room locked as compromised), nothing it could not validate is displayed
as genuine, and nothing is encrypted to a state it could not validate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from backchannel.client.core import Client, ClientError, Room
from backchannel.client.relay import RelayError, b64, unb64
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import decode
from backchannel.protocol.keys import (
    MemberKeyPair,
    PreKeyBundle,
    generate_kem_prekey,
    generate_x25519_prekey,
)
from backchannel.protocol.senderkey import OutboundSenderKey
from backchannel.protocol.shortcode import read_invite
from tests.adversarial.malicious import Conn, Frame, HttpExchange, Tamper, store_unchecked
from tests.client.helpers import People, heard, online, room_with, say
from tests.server.helpers import FakeClock


def warnings(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "warning"]


def for_key(conn: Conn, room: Room) -> bool:
    return room.me in conn.keys


def rewrite_log(tamper: Tamper, room: Room, transform: Any) -> None:
    """Serve ``room``'s member a different log: ``transform(first_pos, events)``
    gets the page the honest relay answered and returns the page to serve."""

    def hook(x: HttpExchange) -> None:
        if (
            x.method == "GET"
            and x.path == f"/v1/rooms/{room.room_id.hex()}/events"
            and x.signer == room.me
            and x.status == 200
        ):
            after = int(x.query.split("after=")[1].split("&")[0]) if "after=" in x.query else -1
            events = transform(after + 1, [unb64(e) for e in x.body["events"]])
            x.body["events"] = [b64(e) for e in events]
            x.body["length"] = after + 1 + len(events)

    tamper.http = hook


def record_sends(tamper: Tamper) -> list[Frame]:
    sent: list[Frame] = []

    def hook(conn: Conn, frame: Frame) -> list[Frame]:
        if frame.get("t") in ("send", "psend"):
            sent.append(frame)
        return [frame]

    tamper.client_frame = hook
    return sent


def now() -> int:
    return int(time.time())


# --- 1. ghost members and replayed joins -----------------------------------------------------


async def test_ghost_member_is_detected_and_never_encrypted_to(
    people: People, tamper: Tamper
) -> None:
    _fac, _room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    ghost = MemberKeyPair.generate()
    # A join for an invite that does not exist: only the relay could have made it.
    forged = L.make_join(ghost, P.random_bytes(32), ann_room.state, now(), check=False)
    rewrite_log(tamper, ann_room, lambda first, events: [*events, forged])
    sent = record_sends(tamper)

    await online(ann, ann_room)
    assert ann_room.status == "compromised"
    assert any("does not validate" in w for w in warnings(ann, ann_room))
    assert ghost.public.sign not in ann_room.state.members
    with pytest.raises(ClientError, match="failed validation"):
        await say(ann, ann_room, "must not be encrypted to the ghost")
    assert not [f for f in sent if f.get("to") == ghost.public.sign]
    assert not [f for f in sent if f.get("t") == "send"]


async def test_replayed_join_after_removal_is_reported_and_ignored(
    people: People, tamper: Tamper
) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    _bob, bob_room = joined["bob"]
    bob_join = next(
        e
        for e in room.log.events
        if isinstance(L.decode_event(e), L.JoinEvent)
        and L.decode_event(e).member.sign == bob_room.me  # type: ignore[union-attr]
    )
    await fac.remove(room, bob_room.me)
    rewrite_log(tamper, ann_room, lambda first, events: [*events, bob_join])
    sent = record_sends(tamper)
    await say(ann, ann_room, "only for those still here")
    assert bob_room.me not in ann_room.state.members
    assert any("re-sent a log event" in w for w in warnings(ann, ann_room))
    assert not [f for f in sent if f.get("to") == bob_room.me]


# --- 2. hidden removals and forks ----------------------------------------------------------------


async def test_hidden_removal_is_caught_by_the_next_message(people: People, tamper: Tamper) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    _bob, bob_room = joined["bob"]
    removal_pos = room.state.length
    # Ann is never shown the removal, nor told about it.
    rewrite_log(tamper, ann_room, lambda first, events: events[: max(0, removal_pos - first)])
    tamper.server_frame = lambda conn, f: (
        [] if for_key(conn, ann_room) and f.get("t") in ("event", "removed") else [f]
    )
    await fac.remove(room, bob_room.me)
    await say(fac, room, "said after the removal")
    await online(ann, ann_room)
    # The message names history Ann is not shown: refused, and she asks its sender.
    assert ann_room.status == "active"
    assert any("names a room history we are not shown" in w for w in warnings(ann, ann_room))
    await online(fac, room)  # the facilitator answers with its signed events
    await online(ann, ann_room)  # which the relay, asked again, still hides: proof
    assert ann_room.status == "compromised"
    assert "fork" in (ann_room.problem or "")
    assert "said after the removal" not in heard(ann, ann_room)


@pytest.mark.parametrize("first", ["forked-member-speaks", "others-speak"])
async def test_fork_is_detected_when_members_exchange_messages(
    people: People, tamper: Tamper, first: str
) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]
    before = room.state
    await fac.invite(room, "participant", 3600, 1)
    pos = room.state.pos
    # A second, equally valid event for the same position (the facilitator
    # signed both, say from two devices); the relay shows Bob this one.
    alternative, _ = L.make_invite(room.key, before, "observer", now() + 60, 1, now())
    rewrite_log(
        tamper,
        bob_room,
        lambda first, events: [
            alternative if first + i == pos else e for i, e in enumerate(events)
        ],
    )
    await online(bob, bob_room)
    await online(ann, ann_room)
    assert bob_room.log.head_at(pos) != ann_room.log.head_at(pos)
    # Each log is valid on its own: nobody can tell yet.
    assert bob_room.status == ann_room.status == "active"
    if first == "forked-member-speaks":
        await say(bob, bob_room, "from the other branch")
        for client, r in ((ann, ann_room), (fac, room)):
            await online(client, r)  # Bob's epoch is only his claim: refused, Bob asked
            assert r.status == "active"
        await online(bob, bob_room)  # Bob answers with his (validly signed) events
        for client, r in ((ann, ann_room), (fac, room)):
            await online(client, r)  # two signed events at one position: a fork
            assert r.status == "compromised"
            assert "fork" in (r.problem or "")
            assert "from the other branch" not in heard(client, r)
    else:
        await say(ann, ann_room, "from the real branch")
        await online(bob, bob_room)  # asks Ann for her copy
        await online(ann, ann_room)  # answers
        with pytest.raises(ClientError, match="fork"):
            await say(bob, bob_room, "never sent")
        assert bob_room.status == "compromised"
        assert "from the real branch" not in heard(bob, bob_room)


# --- 3. altered, truncated and bit-flipped data ------------------------------------------------


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at % len(out)] ^= 0x04
    return bytes(out)


@pytest.mark.parametrize(
    "damage",
    [lambda d: flip(d, -20), lambda d: flip(d, 40), lambda d: d[: len(d) // 2]],
    ids=["flip-ciphertext", "flip-header", "truncate"],
)
async def test_altered_room_message_is_refused(people: People, tamper: Tamper, damage: Any) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    tamper.server_frame = lambda conn, f: (
        [{**f, "data": damage(f["data"])}]
        if f.get("t") == "msg" and for_key(conn, ann_room)
        else [f]
    )
    await say(fac, room, "the genuine words")
    await online(ann, ann_room)
    assert "the genuine words" not in heard(ann, ann_room)
    assert any("refused" in w for w in warnings(ann, ann_room)), ann.lines(ann_room)


async def test_altered_pairwise_message_is_refused(people: People, tamper: Tamper) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    tamper.server_frame = lambda conn, f: (
        [{**f, "data": flip(f["data"], -30)}]
        if f.get("t") == "pmsg" and for_key(conn, ann_room)
        else [f]
    )
    async with fac.connect([room]) as sock:
        await fac.send_text(sock, room, "a private word", to=ann_room.me)
    await online(ann, ann_room)
    assert not [line for line in ann.lines(ann_room) if line.kind == "sidebar"]
    assert any("pairwise message" in w and "refused" in w for w in warnings(ann, ann_room))


async def test_altered_log_event_locks_the_room(people: People, tamper: Tamper) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    await fac.invite(room, "participant", 3600, 1)
    rewrite_log(tamper, ann_room, lambda first, events: [flip(e, -10) for e in events])
    await online(ann, ann_room)
    assert ann_room.status == "compromised"


# --- 4. replay, reorder, drop --------------------------------------------------------------------


async def test_replayed_room_message_is_dropped_with_a_warning(
    people: People, tamper: Tamper
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    tamper.server_frame = lambda conn, f: (
        [f, {**f, "seq": f["seq"] + 1000}]
        if f.get("t") == "msg" and for_key(conn, ann_room)
        else [f]
    )
    await say(fac, room, "said once")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["said once"]
    assert any("replayed" in w for w in warnings(ann, ann_room))


async def test_a_message_replayed_on_a_later_connection_is_still_refused(
    people: People, tamper: Tamper
) -> None:
    # The key's state reaches the disk with the batch that advanced it (the client
    # holds inbound keys in memory only within a transaction): a later connection,
    # which reads the key from the disk again, refuses the same message.
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    seen: list[dict[str, Any]] = []

    def keep(conn: Any, f: dict[str, Any]) -> list[dict[str, Any]]:
        if f.get("t") == "msg" and for_key(conn, ann_room):
            seen.append(f)
        return [f]

    tamper.server_frame = keep
    await say(fac, room, "said once")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["said once"]
    first = seen[0]
    tamper.server_frame = lambda conn, f: (
        [{**first, "seq": f["seq"] + 1}, f]
        if f.get("t") == "synced" and for_key(conn, ann_room)
        else [f]
    )
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["said once"]
    assert any("replayed" in w for w in warnings(ann, ann_room))


async def test_replayed_pairwise_message_is_refused(people: People, tamper: Tamper) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    tamper.server_frame = lambda conn, f: (
        [f, {**f, "id": f["id"] + 10_000}]
        if f.get("t") == "pmsg" and for_key(conn, ann_room)
        else [f]
    )
    async with fac.connect([room]) as sock:
        await fac.send_text(sock, room, "only once, privately", to=ann_room.me)
    await online(ann, ann_room)
    sidebars = [line.text for line in ann.lines(ann_room) if line.kind == "sidebar"]
    assert sidebars == ["only once, privately"]
    assert any("duplicate" in w for w in warnings(ann, ann_room)), ann.lines(ann_room)


async def test_dropped_message_shows_as_a_gap(people: People, tamper: Tamper) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    dropped: list[int] = []

    def drop_first(conn: Conn, f: Frame) -> list[Frame]:
        # Every time: asking again (gap repair) gets nowhere with this relay.
        if f.get("t") == "msg" and for_key(conn, ann_room) and (not dropped or f["seq"] in dropped):
            dropped.append(f["seq"])
            return []
        return [f]

    tamper.server_frame = drop_first
    await say(fac, room, "this one vanishes")
    await say(fac, room, "this one arrives")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["this one arrives"]
    assert any("1 message(s)" in w and "have not arrived" in w for w in warnings(ann, ann_room))


async def test_reordered_messages_are_visible_as_a_gap_then_filled(
    people: People, tamper: Tamper
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    held: list[Frame] = []

    def swap(conn: Conn, f: Frame) -> list[Frame]:
        if f.get("t") == "msg" and for_key(conn, ann_room):
            if not held:
                held.append(f)
                return []
            return [f, held.pop()]
        return [f]

    tamper.server_frame = swap
    await say(fac, room, "first")
    await say(fac, room, "second")
    await online(ann, ann_room)
    assert sorted(heard(ann, ann_room)) == ["first", "second"]
    assert any("have not arrived" in w for w in warnings(ann, ann_room))


async def test_dropped_tail_of_an_old_key_is_reported_after_rotation(
    people: People, tamper: Tamper, relay: Any
) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    _bob, bob_room = joined["bob"]
    await say(fac, room, "lost one")
    await say(fac, room, "lost two")
    # The relay never hands Ann those two (whenever she asks).
    dropped = {m.seq for m in relay.call(relay.store.room_messages_after(room.room_id, 0, 100))}
    tamper.server_frame = lambda conn, f: (
        [] if f.get("t") == "msg" and for_key(conn, ann_room) and f["seq"] in dropped else [f]
    )
    await fac.remove(room, bob_room.me)  # rotation: the next key says how many came before
    await say(fac, room, "after rotation")
    await online(ann, ann_room)
    assert "after rotation" in heard(ann, ann_room)
    assert any("2 message(s)" in w and "previous key" in w for w in warnings(ann, ann_room))


# --- 5. prekey bundles ----------------------------------------------------------------------------


async def fresh_pair(people: People) -> tuple[Client, Room, Client, Room]:
    """A facilitator and a joiner that have not yet opened sessions."""
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    ann = people.new("ann")
    ann_room = await ann.join(
        await fac.invite(room, "participant", 3600, 1), accept_rules=lambda r: True
    )
    await online(fac, room)
    return fac, room, ann, ann_room


def replace_bundle(tamper: Tamper, target: bytes, make: Any) -> list[bytes]:
    seen: list[bytes] = []

    def hook(x: HttpExchange) -> None:
        if x.path == f"/v1/prekeys/{target.hex()}/claim" and x.status == 200:
            honest = unb64(x.body["bundle"])
            seen.append(honest)
            x.body["bundle"] = b64(make(honest))

    tamper.http = hook
    return seen


def bundle_for(member: MemberKeyPair, ts: int) -> PreKeyBundle:
    spk, _ = generate_x25519_prekey(member, "spk", 1, ts)
    kem, _ = generate_kem_prekey(member, "kem-lr", 2, ts)
    return PreKeyBundle(member=member.public, spk=spk, kem=kem)


@pytest.mark.parametrize("how", ["other-member", "bad-signature"])
async def test_substituted_bundle_is_refused(people: People, tamper: Tamper, how: str) -> None:
    fac, room, ann, ann_room = await fresh_pair(people)
    relay_key = MemberKeyPair.generate()

    def substitute(honest: bytes) -> bytes:
        bundle = bundle_for(relay_key, now())
        if how == "bad-signature":  # claims to be the facilitator's, signed by the relay
            bundle = PreKeyBundle(member=room.key.public, spk=bundle.spk, kem=bundle.kem)
        return bundle.to_bytes()

    replace_bundle(tamper, room.me, substitute)
    sent = record_sends(tamper)
    await online(ann, ann_room)
    assert any("bad key bundle" in w for w in warnings(ann, ann_room))
    # Nothing went to the substitute: what Ann sent the facilitator (since issue 13
    # her key goes back as soon as the facilitator's arrives) went over the session
    # the facilitator opened to her with its real keys, so the facilitator, and
    # only it, opens every one of those messages.
    tamper.http = None
    await online(fac, room)
    assert not [w for w in warnings(fac, room) if "refused" in w]
    to_fac = [f for f in sent if f.get("to") == room.me]
    assert all(f.get("t") == "psend" for f in to_fac)
    assert ann.senderkeys.outbound(ann_room).generation is not None
    assert fac.senderkeys.inbound_keys(room), "the facilitator holds Ann's real sender key"


async def test_withheld_one_time_prekeys_still_give_a_working_session(
    people: People, tamper: Tamper
) -> None:
    """The relay can withhold one-time prekeys (the "can" table): the session
    then rests on the signed and the last-resort KEM prekeys, and still works."""
    fac, room, ann, ann_room = await fresh_pair(people)

    def strip(honest: bytes) -> bytes:
        bundle = PreKeyBundle.from_bytes(honest)
        return PreKeyBundle(member=bundle.member, spk=bundle.spk, kem=bundle.kem).to_bytes()

    seen = replace_bundle(tamper, room.me, strip)
    await online(ann, ann_room)
    await online(fac, room)
    assert PreKeyBundle.from_bytes(seen[0]).opk is not None  # there was one to withhold
    await say(fac, room, "works without one-time prekeys")
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["works without one-time prekeys"]


async def test_stale_signed_prekey_is_refused(
    people: People, tamper: Tamper, clock: FakeClock
) -> None:
    fac, room, ann, ann_room = await fresh_pair(people)
    http = ann.http(ann_room.relay)
    old = await http.claim(room.me, ann_room.key.sign_seed)  # as the relay kept it
    clock.advance(31 * 86_400)
    await online(fac, room)  # the facilitator rotates its signed prekey
    replace_bundle(tamper, room.me, lambda honest: old)
    await online(ann, ann_room)
    assert any("bad key bundle" in w and "handshake" in w for w in warnings(ann, ann_room))


# --- 6. an old sender key after a removal ----------------------------------------------------


async def test_old_sender_key_after_removal_is_rejected(people: People, tmp_path: Path) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]
    ann_old_key = ann.senderkeys.outbound(ann_room)
    bob_old_key = bob.senderkeys.outbound(bob_room)
    await fac.remove(room, bob_room.me)
    await online(ann, ann_room)  # Ann sees the removal and rotates
    epoch = room.state.epoch
    # Ann's retired key (kept by someone who stole her old state, or replayed by
    # the relay) and removed Bob's key, both naming the epoch after the removal.
    forged_ann = ann_old_key.seal(b"old key, new epoch", epoch)
    forged_bob = bob_old_key.seal(b"removed, still talking", epoch)
    async with ann.connect([ann_room]) as sock:
        await sock.request(
            "send",
            room=ann_room.room_id,
            **{"from": ann_room.me},
            cid=P.random_bytes(16),
            data=forged_ann,
        )
    # The relay injects Bob's message as if Bob were still there.
    store_unchecked(tmp_path / "relay.db", room.room_id, bob_room.me, forged_bob)
    await online(fac, room)
    shown = heard(fac, room)
    assert "old key, new epoch" not in shown
    assert "removed, still talking" not in shown
    found = warnings(fac, room)
    assert "a message under a retired key from ann was refused" in found, found
    # Bob was removed: nothing under his keys is read again, whatever epoch it names.
    assert "a message from bob, who is no longer a member, was refused" in found, found


# --- 7. impersonation by another member ----------------------------------------------------------


async def test_message_made_by_another_members_key_is_refused(
    people: People, tmp_path: Path
) -> None:
    fac, room, joined = await room_with(people, "ann", "mal")
    ann, ann_room = joined["ann"]
    mal, mal_room = joined["mal"]
    await say(ann, ann_room, "hello")  # Mallory now holds Ann's chain key, as every member does
    await online(mal, mal_room)
    ann_key = mal.senderkeys.inbound(mal_room, ann_room.me, 0)
    state = decode(ann_key.to_bytes())
    assert isinstance(state, dict)
    forger = OutboundSenderKey(
        room_id=mal_room.room_id,
        owner=ann_room.me,
        generation=0,
        index=int(state["idx"]),  # type: ignore[arg-type]
        chain_key=state["ck"],  # type: ignore[arg-type]
        sign_seed=P.random_bytes(32),  # Mallory does not have Ann's signing key
        since=0,
        prev_count=0,
    )
    forged = forger.seal(b"Ann concedes everything", mal_room.state.epoch)
    async with mal.connect([mal_room]) as sock:
        # The honest relay refuses an envelope naming someone else ...
        with pytest.raises(RelayError, match="sender_mismatch"):
            await sock.request(
                "send",
                room=mal_room.room_id,
                **{"from": mal_room.me},
                cid=P.random_bytes(16),
                data=forged,
            )
    # ... so here the relay stores it anyway; the signature is what gives it away.
    store_unchecked(tmp_path / "relay.db", room.room_id, mal_room.me, forged)
    await online(fac, room)
    assert "Ann concedes everything" not in heard(fac, room)
    assert any("claiming to be from ann" in w for w in warnings(fac, room))


# --- 8. invites --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["used-up", "expired", "forged-invite"])
async def test_invite_abuse_in_the_log_locks_the_room(
    people: People, tamper: Tamper, kind: str
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    state = ann_room.state
    if kind == "used-up":
        # A one-use invite, used; then a second join signed with the same invite
        # key (anyone who saw the code can sign one). The honest relay refuses
        # it; this one serves it to Ann.
        code = await fac.invite(room, "participant", 3600, 1)
        await people.new("first").join(code, accept_rules=lambda r: True)
        await online(ann, ann_room)
        seed = read_invite(code).invite_seed
        forged = L.make_join(MemberKeyPair.generate(), seed, ann_room.state, now(), check=False)
    elif kind == "expired":
        event, seed = L.make_invite(room.key, state, "participant", now() + 60, 1, now())
        forged_join = L.make_join(
            MemberKeyPair.generate(), seed, L.apply_event(state, event), now() + 3600, check=False
        )
        rewrite_log(tamper, ann_room, lambda first, events: [*events, event, forged_join])
        await online(ann, ann_room)
        assert ann_room.status == "compromised"
        return
    else:
        impostor = MemberKeyPair.generate()
        forged, _ = L.make_invite(impostor, state, "facilitator", now() + 60, 5, now(), check=False)
    rewrite_log(tamper, ann_room, lambda first, events: [*events, forged])
    await online(ann, ann_room)
    assert ann_room.status == "compromised"
    assert any("does not validate" in w for w in warnings(ann, ann_room))


async def test_look_alike_room_for_an_invite_is_refused(people: People, tamper: Tamper) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    code = await fac.invite(room, "participant", 3600, 1)
    # The relay answers the preview with another room it controls.
    fake = MemberKeyPair.generate()
    fake_log = L.RoomLog()
    fake_log.append(L.make_create(fake, L.Rules(mode="attributed"), now()))

    def hook(x: HttpExchange) -> None:
        if x.path.endswith(("/preview", "/log")) and x.status == 200:
            x.body["events"] = [b64(e) for e in fake_log.events]

    tamper.http = hook
    ann = people.new("ann")
    with pytest.raises(ClientError, match="does not check out"):
        await ann.join(code, accept_rules=lambda r: True)
    assert ann.rooms() == []


# --- 9. moved and reflected messages -----------------------------------------------------------


async def test_message_moved_to_another_room_is_refused(people: People, tamper: Tamper) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    other = await fac.create_room("second", L.Rules())
    ann_other = await ann.join(
        await fac.invite(other, "participant", 3600, 1), accept_rules=lambda r: True
    )
    for client, r in ((fac, other), (ann, ann_other), (fac, other)):
        await online(client, r)
    tamper.server_frame = lambda conn, f: (
        [{**f, "room": ann_other.room_id}]
        if f.get("t") == "msg" and f.get("room") == ann_room.room_id and for_key(conn, ann_room)
        else [f]
    )
    await say(fac, room, "meant for the first room")
    async with ann.connect([ann_room, ann_other]) as sock:
        await ann.pump(sock, [ann_room, ann_other], idle=0.1)
    assert "meant for the first room" not in heard(ann, ann_other)
    assert any("another room" in w for w in warnings(ann, ann_other))


async def test_pairwise_message_reflected_to_its_sender_is_refused(
    people: People, tamper: Tamper
) -> None:
    _fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]

    def reflect_to_sender(conn: Conn, f: Frame) -> list[Frame]:
        if f.get("t") == "psend" and f.get("from") == ann_room.me:
            return [{**f, "to": ann_room.me}]  # stored in Ann's own mailbox
        return [f]

    tamper.client_frame = reflect_to_sender
    tamper.server_frame = lambda conn, f: (
        [{**f, "from": room.me}] if f.get("t") == "pmsg" and for_key(conn, ann_room) else [f]
    )
    async with ann.connect([ann_room]) as sock:
        await ann.send_text(sock, ann_room, "for the facilitator only", to=room.me)
    await online(ann, ann_room)
    received = [line for line in ann.lines(ann_room) if line.kind == "sidebar" and not line.mine]
    assert received == []
    assert any("pairwise message" in w and "refused" in w for w in warnings(ann, ann_room))
