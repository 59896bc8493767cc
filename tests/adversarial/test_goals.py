"""Security goals stated as attacks (DESIGN.md §1.4, §1.6, §1.7): what a thief of a
member's state at time t can and cannot read, what a leaked transcript proves,
and what links one person's rooms."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from backchannel.protocol import primitives as P
from backchannel.protocol.envelope import RoomEnvelope
from backchannel.protocol.errors import BadSignature, ProtocolError
from backchannel.protocol.keys import signing_input
from backchannel.protocol.ratchet import PairwiseSession
from backchannel.protocol.senderkey import InboundSenderKey, OutboundSenderKey
from tests.client.helpers import People, heard, online, room_with, say
from tests.protocol.drbg import Drbg
from tests.protocol.test_handshake import ALICE, BOB, NOW, bundle_of

EPOCH = (1, bytes(32))


def session_pair() -> tuple[PairwiseSession, PairwiseSession]:
    alice = PairwiseSession.initiate(ALICE, bundle_of(BOB), BOB.key.public, rng=Drbg("fs"), now=NOW)
    accepted = PairwiseSession.accept(
        BOB.key, alice.encrypt(b"hello"), initiator=ALICE.public, prekeys=BOB.lookup
    )
    return alice, accepted.session


def test_pairwise_forward_secrecy_and_post_compromise_security() -> None:
    alice, bob = session_pair()
    past = [alice.encrypt(b"past %d" % i) for i in range(3)]
    for message in past:
        bob.decrypt(message)
    stolen = bob.to_bytes()  # the thief copies Bob's state now (time t)

    # Forward secrecy: nothing sent before t opens with the stolen state.
    for message in past:
        with pytest.raises(ProtocolError):
            PairwiseSession.from_bytes(stolen).decrypt(message)

    # Post-compromise security. Until the ratchet turns with keys the thief never
    # saw, a passive thief keeps reading (the Double Ratchet's documented limit):
    alice.decrypt(bob.encrypt(b"reply"))
    exposed = alice.encrypt(b"still under a key the thief can derive")
    assert PairwiseSession.from_bytes(stolen).decrypt(exposed) == (
        b"still under a key the thief can derive"
    )
    bob.decrypt(exposed)
    # Bob answers with a fresh ratchet key, Alice with another: healed.
    alice.decrypt(bob.encrypt(b"fresh ratchet key"))
    later = alice.encrypt(b"after the healing round trip")
    assert bob.decrypt(later) == b"after the healing round trip"
    thief = PairwiseSession.from_bytes(stolen)
    thief.decrypt(exposed)  # the thief follows along as far as it can ...
    with pytest.raises(ProtocolError):  # ... and is locked out from here on
        thief.decrypt(later)


def test_sender_key_forward_secrecy_and_rotation() -> None:
    owner = OutboundSenderKey.generate(bytes(32), b"\x01" * 32, since=0, rng=Drbg("sk-fs"))
    reader = InboundSenderKey.from_distribution(owner.distribution())
    past = [owner.seal(b"past %d" % i, EPOCH) for i in range(3)]
    for envelope in past:
        reader.open(envelope)
    stolen = reader.to_bytes()
    for envelope in past:  # the chain only moves forward
        with pytest.raises(ProtocolError):
            InboundSenderKey.from_bytes(stolen).open(envelope)
    # After a rotation (someone left), the new generation shares nothing with the old.
    rotated = OutboundSenderKey.generate(
        bytes(32), b"\x01" * 32, since=5, previous=owner, rng=Drbg("sk-fs-2")
    )
    after = rotated.seal(b"after rotation", (5, bytes(32)))
    with pytest.raises(ProtocolError):
        InboundSenderKey.from_bytes(stolen).open(after)


async def test_a_leaked_transcript_proves_nothing_about_anyone(
    people: People, tmp_path: Path
) -> None:
    """Everything a relay (or a leaking member) holds: no signature in it verifies
    under a member key, so nothing binds a speaker's identity to the words."""
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    await say(ann, ann_room, "a concession we never made in public")
    await say(fac, room, "noted, without attribution")
    await online(ann, ann_room)
    assert heard(ann, ann_room)[-1] == "noted, without attribution"

    db = sqlite3.connect(tmp_path / "relay.db")
    envelopes = [
        RoomEnvelope.from_bytes(bytes(d)) for (d,) in db.execute("SELECT data FROM room_messages")
    ]
    mailbox = [bytes(d) for (d,) in db.execute("SELECT data FROM mailbox")]
    db.close()
    assert len(envelopes) == 2
    member_keys = [m.key.sign for m in room.state.members.values()]
    for envelope in envelopes:
        for key in member_keys:
            with pytest.raises(BadSignature):
                P.ed25519_verify(key, envelope.signed_bytes(), envelope.signature)
            with pytest.raises(BadSignature):  # not under any other context either
                P.ed25519_verify(
                    key, signing_input("room-message", envelope.ciphertext), envelope.signature
                )
    # The signing keys that do verify are the generations' ephemeral keys, which
    # only ever travelled inside pairwise sessions: neither they nor the chain
    # keys appear anywhere the relay can see.
    raw = (tmp_path / "relay.db").read_bytes()
    for client, r in ((fac, room), (ann, ann_room)):
        out = client.senderkeys.outbound(r)
        dist = out.distribution()
        assert dist.signing_public not in raw
        assert dist.chain_key not in raw
        assert all(dist.signing_public not in item for item in mailbox)


async def test_one_person_in_two_rooms_is_two_unrelated_keys(
    people: People, tmp_path: Path
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    second = await fac.create_room("second track", room.state.rules)
    ann_second = await ann.join(
        await fac.invite(second, "participant", 3600, 1), accept_rules=lambda r: True
    )
    assert ann_room.key.public.sign != ann_second.key.public.sign
    assert ann_room.key.public.dh != ann_second.key.public.dh
    assert room.key.public.sign != second.key.public.sign
    # In the relay's database, no member key of one room appears in the other's log.
    db = sqlite3.connect(tmp_path / "relay.db")
    logs = {
        rid: b"".join(
            bytes(d)
            for (d,) in db.execute(
                "SELECT data FROM log_events WHERE room_id = ? ORDER BY pos", (rid,)
            )
        )
        for rid in (room.room_id, second.room_id)
    }
    db.close()
    for key in (ann_room.key.public.sign, ann_room.key.public.dh, room.key.public.sign):
        assert key in logs[room.room_id]
        assert key not in logs[second.room_id]
