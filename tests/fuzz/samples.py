"""One valid encoding of every object the protocol package decodes, made with the
package's own builders (so mutations start from real bytes, not guesses)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backchannel.protocol import (
    encoding,
    handshake,
    invite,
    keys,
    padding,
    ratchet,
    roomlog,
    shortcode,
)
from backchannel.protocol import senderkey as sk
from backchannel.protocol.envelope import RoomEnvelope


@dataclass(frozen=True)
class Decoder:
    name: str
    decode: Callable[[Any], Any]
    samples: tuple[bytes, ...]
    text: bool = False  # takes a str (the invite code)


@functools.cache
def decoders() -> tuple[Decoder, ...]:
    now = int(time.time())
    fac = keys.MemberKeyPair.generate()
    bob = keys.MemberKeyPair.generate()
    create = roomlog.make_create(fac, roomlog.Rules(), now)
    log = roomlog.RoomLog()
    log.append(create)
    inv, seed = roomlog.make_invite(fac, log.state, "participant", now + 3600, 2, now)
    log.append(inv)
    join = roomlog.make_join(bob, seed, log.state, now)
    log.append(join)
    rules = roomlog.make_set_rules(fac, log.state, roomlog.Rules(mode="attributed"), now)
    log.append(rules)
    remove = roomlog.make_remove(fac, log.state, bob.public, now)
    state = log.state

    spk, spk_priv = keys.generate_x25519_prekey(bob, "spk", 1, now)
    kem, kem_priv = keys.generate_kem_prekey(bob, "kem", 2, now)
    opk, opk_priv = keys.generate_x25519_prekey(bob, "opk", 3, now)
    bundle = keys.PreKeyBundle(member=bob.public, spk=spk, kem=kem, opk=opk)
    bundle_no_opk = keys.PreKeyBundle(member=bob.public, spk=spk, kem=kem)
    upload = keys.PreKeyUpload(member=bob.public, prekeys=[spk, kem, opk])
    privs = {(p.kind, p.id): p for p in (spk_priv, kem_priv, opk_priv)}
    table = {
        (k, i): (pk, privs[(k, i)])
        for (k, i), pk in {("spk", 1): spk, ("kem", 2): kem, ("opk", 3): opk}.items()
    }

    alice = keys.MemberKeyPair.generate()
    session = ratchet.PairwiseSession.initiate(alice, bundle, bob.public)
    first = session.encrypt(b"hello bob")
    accepted = ratchet.PairwiseSession.accept(
        bob, first, initiator=alice.public, prekeys=lambda k, i: table.get((k, i))
    )
    reply = accepted.session.encrypt(b"hello alice")
    session.decrypt(reply)
    second = session.encrypt(b"again")
    initial = ratchet.PairwiseMessage.from_bytes(first).initial
    assert initial is not None

    out = sk.OutboundSenderKey.generate(state.room_id, fac.public.sign, since=0)
    dist = out.distribution()
    envelope = out.seal(b"to the room", state.epoch)
    inbound = sk.InboundSenderKey.from_distribution(dist)
    inbound.open(RoomEnvelope.from_bytes(envelope))
    code = invite.InviteCode.for_room("http://127.0.0.1:8470", state, seed)
    short = shortcode.ShortCode.for_room("http://127.0.0.1:8470", state, bytes(range(16)))

    return (
        Decoder(
            "encoding.decode",
            encoding.decode,
            (create, encoding.encode({"a": [1, -2, b"x", "y", True, None], "b": {"c": 0}})),
        ),
        Decoder(
            "keys.PreKeyBundle",
            keys.PreKeyBundle.from_bytes,
            (bundle.to_bytes(), bundle_no_opk.to_bytes()),
        ),
        Decoder("keys.PreKeyUpload", keys.PreKeyUpload.from_bytes, (upload.to_bytes(),)),
        Decoder("roomlog.decode_event", roomlog.decode_event, (create, inv, join, rules, remove)),
        Decoder("roomlog.RoomLog", roomlog.RoomLog.from_bytes, (log.to_bytes(),)),
        Decoder("roomlog.RoomState", roomlog.RoomState.from_bytes, (state.to_bytes(),)),
        Decoder(
            "ratchet.PairwiseMessage", ratchet.PairwiseMessage.from_bytes, (first, reply, second)
        ),
        Decoder(
            "ratchet.Ratchet",
            ratchet.Ratchet.from_bytes,
            (session.ratchet.to_bytes(), accepted.session.ratchet.to_bytes()),
        ),
        Decoder(
            "ratchet.PairwiseSession",
            ratchet.PairwiseSession.from_bytes,
            (session.to_bytes(), accepted.session.to_bytes()),
        ),
        Decoder(
            "handshake.InitialHeader", handshake.InitialHeader.from_bytes, (initial.to_bytes(),)
        ),
        Decoder("envelope.RoomEnvelope", RoomEnvelope.from_bytes, (envelope,)),
        Decoder(
            "senderkey.SenderKeyDistribution",
            sk.SenderKeyDistribution.from_bytes,
            (dist.to_bytes(),),
        ),
        Decoder(
            "senderkey.InboundSenderKey", sk.InboundSenderKey.from_bytes, (inbound.to_bytes(),)
        ),
        Decoder("senderkey.OutboundSenderKey", sk.OutboundSenderKey.from_bytes, (out.to_bytes(),)),
        Decoder(
            "invite.InviteCode",
            invite.InviteCode.from_text,
            (code.to_text().encode(), code.to_text(group=0).encode()),
            text=True,
        ),
        Decoder(
            "shortcode.read_invite",
            shortcode.read_invite,
            (short.to_text().encode(), short.to_qr_text().encode(), code.to_text().encode()),
            text=True,
        ),
        Decoder(
            "padding.unpad",
            padding.unpad,
            (padding.pad(b"hello"), padding.pad(b""), padding.pad(b"x" * 300)),
        ),
    )
