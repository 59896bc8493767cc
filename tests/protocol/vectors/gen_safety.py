"""Known answers for safety numbers (plain and room-scoped)."""

from __future__ import annotations

from typing import Any

from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import encode
from backchannel.protocol.keys import MemberKeyPair
from backchannel.protocol.safety import safety_number, side_digits
from tests.protocol.drbg import Drbg


def generate() -> dict[str, Any]:
    rng = Drbg("vectors-safety")
    alice, bob = MemberKeyPair.generate(rng), MemberKeyPair.generate(rng)
    room = rng(32)
    first_input = encode(["bc-safety", 1, b"", alice.public.sign, alice.public.dh])
    return {
        "alice": {"sign": alice.public.sign, "dh": alice.public.dh},
        "bob": {"sign": bob.public.sign, "dh": bob.public.dh},
        "room_id": room,
        "alice_input": first_input,
        "alice_first_hash": P.hash_bytes(b"bc-safety", first_input, 64),
        "alice_side": side_digits(alice.public),
        "bob_side": side_digits(bob.public),
        "number": safety_number(alice.public, bob.public).text(),
        "alice_side_in_room": side_digits(alice.public, room),
        "bob_side_in_room": side_digits(bob.public, room),
        "number_in_room": safety_number(alice.public, bob.public, room_id=room).text(),
    }
