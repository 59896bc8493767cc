"""Known answers for sender keys and room envelopes (docs/sections/rooms.md).

One generation-0 sender key made from fixed seeds, four messages under two
epochs, a receiver that gets them out of order, and a rotation to
generation 1. For every message: the chain key before, the message key, the
AEAD key and nonce, the associated data, the signed bytes and the envelope.
"""

from __future__ import annotations

from typing import Any

from backchannel.protocol.envelope import RoomEnvelope
from backchannel.protocol.senderkey import (
    InboundSenderKey,
    OutboundSenderKey,
    kdf_ck,
    message_aead_key,
)
from tests.protocol.drbg import Drbg

ROOM = bytes.fromhex("5a" * 32)
OWNER = bytes.fromhex("a5" * 32)
TEXTS = [b"", b"We could accept a phased approach.", b"x" * 300, b"\x00\xff" * 8]
EPOCHS = [(4, b"\x11" * 32), (4, b"\x11" * 32), (7, b"\x22" * 32), (7, b"\x22" * 32)]
RECEIVE_ORDER = [1, 0, 3, 2]


def generate() -> dict[str, Any]:
    rng = Drbg("senderkey")
    out = OutboundSenderKey.generate(ROOM, OWNER, since=4, rng=rng)
    dist = out.distribution()
    inbound = InboundSenderKey.from_distribution(dist)
    messages = []
    for text, epoch in zip(TEXTS, EPOCHS, strict=True):
        ck = out.distribution().chain_key
        _, mk = kdf_ck(ck)
        key, nonce = message_aead_key(mk)
        data = out.seal(text, epoch)
        env = RoomEnvelope.from_bytes(data)
        messages.append(
            {
                "aead_key": key,
                "aead_nonce": nonce,
                "associated_data": env.associated_data(),
                "chain_key": ck,
                "envelope": data,
                "epoch": list(epoch),
                "message_key": mk,
                "plaintext": text,
                "signed_bytes": env.signed_bytes(),
            }
        )
    received = []
    for i in RECEIVE_ORDER:
        assert inbound.open(messages[i]["envelope"]) == TEXTS[i]
        received.append({"index": i, "state": inbound.to_bytes()})
    rotated = OutboundSenderKey.generate(ROOM, OWNER, since=9, previous=out, rng=rng)
    return {
        "distribution": dist.to_bytes(),
        "messages": messages,
        "outbound_after": out.to_bytes(),
        "received": received,
        "rotated_distribution": rotated.distribution().to_bytes(),
        "seed": "senderkey",
    }
