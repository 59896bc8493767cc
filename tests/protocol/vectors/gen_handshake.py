"""Known answers for the hybrid handshake (docs/protocol.md, "Pairwise sessions").

Two runs between fixed member keys: one with a one-time X25519 prekey and a
one-time ML-KEM prekey, one with neither (last-resort ML-KEM prekey). Every
intermediate value is recomputed here from the formulas, independently of
``handshake.py``, and checked against it, so the file is also a worked example.
"""

from __future__ import annotations

from typing import Any

from generate import mlkem_fixture

from backchannel.protocol import handshake as H
from backchannel.protocol import primitives as P
from backchannel.protocol.keys import MemberKeyPair, PreKey, PreKeyBundle, PreKeyPrivate
from backchannel.protocol.ratchet import PairwiseMessage, Ratchet
from tests.protocol.drbg import Drbg

TS = 1_800_000_000


def run(name: str, *, with_opk: bool, kem_index: int) -> dict[str, Any]:
    rng = Drbg(f"handshake/{name}")
    alice = MemberKeyPair.generate(rng)
    bob = MemberKeyPair.generate(rng)
    spk_private = rng(32)
    opk_private = rng(32)
    spk = PreKey.create(bob, "spk", 1, P.x25519_public(spk_private), TS)
    opk = PreKey.create(bob, "opk", 2, P.x25519_public(opk_private), TS) if with_opk else None
    kem_fixture = mlkem_fixture(kem_index)
    kem_kind = "kem" if with_opk else "kem-lr"
    kem = PreKey.create(bob, kem_kind, 3, kem_fixture["public"], TS)  # type: ignore[arg-type]
    bundle = PreKeyBundle(member=bob.public, spk=spk, kem=kem, opk=opk)

    def encaps(public: bytes) -> tuple[bytes, bytes]:
        assert public == kem_fixture["public"]
        return kem_fixture["ciphertext"], kem_fixture["shared"]

    ek_seed = f"handshake/{name}/ek"
    sent = H.initiate(alice, bundle, bob.public, rng=Drbg(ek_seed), kem_encaps=encaps)

    # The same computation, spelt out.
    ek_private = Drbg(ek_seed)(32)
    dh = [
        P.x25519(alice.dh_private, spk.public),
        P.x25519(ek_private, bob.public.dh),
        P.x25519(ek_private, spk.public),
    ]
    if opk is not None:
        dh.append(P.x25519(ek_private, opk.public))
    th = P.hash_bytes(b"bc-pqxdh-th", sent.transcript, 64)
    prk = P.kdf(kem_fixture["shared"], b"bc-pqxdh-prk", b"".join(dh), 64)
    sk = P.kdf(prk, b"bc-pqxdh-sk", th, 32)
    assert sk == sent.session_key

    store = {
        ("spk", 1): (spk, PreKeyPrivate("spk", 1, spk_private)),
        (kem_kind, 3): (kem, PreKeyPrivate(kem.kind, 3, kem_fixture["secret"])),
    }
    if opk is not None:
        store[("opk", 2)] = (opk, PreKeyPrivate("opk", 2, opk_private))
    got = H.respond(
        bob, sent.header, initiator=alice.public, prekeys=lambda k, i: store.get((k, i))
    )
    assert got.session_key == sk

    # The initiator's first pairwise message (a "prekey message").
    ratchet = Ratchet.init_initiator(
        sk, spk.public, sent.associated_data, rng=Drbg(f"handshake/{name}/ratchet")
    )
    first = PairwiseMessage(
        message=ratchet.encrypt_message(b"first message"), initial=sent.header
    ).to_bytes()
    return {
        "inputs": {
            "alice_sign_seed": alice.sign_seed,
            "alice_dh_private": alice.dh_private,
            "bob_sign_seed": bob.sign_seed,
            "bob_dh_private": bob.dh_private,
            "spk_private": spk_private,
            "opk_private": opk_private if opk is not None else b"",
            "mlkem_fixture_index": kem_index,
            "bundle": bundle.to_bytes(),
            "ephemeral_private": ek_private,
            "ratchet_private": Drbg(f"handshake/{name}/ratchet")(32),
        },
        "dh": dh,
        "kem_ciphertext": kem_fixture["ciphertext"],
        "kem_shared": kem_fixture["shared"],
        "transcript": sent.transcript,
        "transcript_hash": th,
        "prk": prk,
        "session_key": sk,
        "associated_data": sent.associated_data,
        "initial_header": sent.header.to_bytes(),
        "initial_header_digest": sent.header.digest(),
        "consumed": [[kind, key_id] for kind, key_id in got.consumed],
        "first_message": first,
        "first_plaintext": b"first message",
    }


def generate() -> dict[str, Any]:
    return {
        "protocol_name": H.PROTOCOL_NAME,
        "with_opk": run("with-opk", with_opk=True, kem_index=1),
        "last_resort": run("last-resort", with_opk=False, kem_index=2),
    }
