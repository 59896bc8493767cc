"""Known answers for the Double Ratchet (docs/protocol.md, "Pairwise sessions").

A fixed conversation with three DH ratchet steps and out-of-order delivery.
For every message: the sender's chain key before, the message key, the AEAD
key, nonce and associated data, and the message bytes; after every operation:
the state of the party that acted (root key, chain keys, counters, skipped
keys) and its full serialisation.
"""

from __future__ import annotations

from typing import Any

from backchannel.protocol import handshake as H
from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import decode
from backchannel.protocol.keys import MemberKeyPair
from backchannel.protocol.ratchet import (
    Ratchet,
    RatchetMessage,
    aead_associated_data,
    kdf_ck,
    message_aead_key,
)
from tests.protocol.drbg import Drbg

# (op, party, label): "send" makes message ``label``; "recv" delivers message
# ``label`` to ``party``. Deliveries are out of order on purpose.
SCRIPT: list[tuple[str, str, str]] = [
    ("send", "alice", "a0"),
    ("send", "alice", "a1"),
    ("send", "alice", "a2"),
    ("recv", "bob", "a1"),
    ("recv", "bob", "a0"),
    ("send", "bob", "b0"),
    ("send", "bob", "b1"),
    ("recv", "alice", "b1"),
    ("send", "alice", "a3"),
    ("recv", "bob", "a2"),
    ("recv", "bob", "a3"),
    ("recv", "alice", "b0"),
    ("send", "bob", "b2"),
    ("recv", "alice", "b2"),
    ("send", "alice", "a4"),
    ("recv", "bob", "a4"),
]


def _state(ratchet: Ratchet) -> dict[str, Any]:
    value = decode(ratchet.to_bytes())
    assert isinstance(value, dict)
    keep = ("rk", "cks", "ckr", "dhr", "ns", "nr", "pn", "skipped")
    out: dict[str, Any] = {k: value[k] for k in keep if k in value}
    out["dhs_public"] = ratchet.public_key
    out["bytes"] = ratchet.to_bytes()
    return out


def generate() -> dict[str, Any]:
    rng = Drbg("ratchet")
    alice_key = MemberKeyPair.generate(rng)
    bob_key = MemberKeyPair.generate(rng)
    sk = rng(32)
    spk_private = rng(32)
    ad = H.associated_data(alice_key.public, bob_key.public)
    parties = {
        "alice": Ratchet.init_initiator(
            sk, P.x25519_public(spk_private), ad, rng=Drbg("ratchet/alice")
        ),
        "bob": Ratchet.init_responder(sk, spk_private, ad, rng=Drbg("ratchet/bob")),
    }
    sent: dict[str, bytes] = {}
    steps: list[dict[str, Any]] = []
    for op, party, label in SCRIPT:
        ratchet = parties[party]
        plaintext = f"{label}: {'message text ' * (len(steps) % 3)}".encode()
        if op == "send":
            before = decode(ratchet.to_bytes())
            assert isinstance(before, dict)
            chain_key = before["cks"]
            assert isinstance(chain_key, bytes)
            data = ratchet.encrypt(plaintext)
            message = RatchetMessage.from_bytes(data)
            mk = kdf_ck(chain_key)[1]
            key, nonce = message_aead_key(mk)
            sent[label] = data
            steps.append(
                {
                    "op": "send",
                    "party": party,
                    "label": label,
                    "plaintext": plaintext,
                    "chain_key_before": chain_key,
                    "message_key": mk,
                    "aead_key": key,
                    "aead_nonce": nonce,
                    "aead_associated_data": aead_associated_data(
                        ad, ratchet.role, message.header.to_bytes()
                    ),
                    "header": message.header.to_bytes(),
                    "message": data,
                    "state_after": _state(ratchet),
                }
            )
        else:
            got = ratchet.decrypt(sent[label])
            steps.append(
                {
                    "op": "recv",
                    "party": party,
                    "label": label,
                    "plaintext": got,
                    "state_after": _state(ratchet),
                }
            )
    return {
        "inputs": {
            "session_key": sk,
            "spk_private": spk_private,
            "associated_data": ad,
            "alice_ratchet_privates": Drbg("ratchet/alice")(32 * 4),
            "bob_ratchet_privates": Drbg("ratchet/bob")(32 * 4),
        },
        "labels": {"root": "bc-dr-root", "chain": "bc-dr-chain", "message": "bc-dr-msg"},
        "steps": steps,
    }
