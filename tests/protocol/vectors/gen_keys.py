"""Known answers for the primitives layer, member keys and signed prekeys."""

from __future__ import annotations

from typing import Any

from generate import mlkem_fixture

from backchannel.protocol import primitives as P
from backchannel.protocol.keys import MemberKeyPair, PreKey, PreKeyBundle, signing_input
from tests.protocol.drbg import Drbg


def generate() -> dict[str, Any]:
    rng = Drbg("keys")
    member = MemberKeyPair.generate(rng)
    spk_private = rng(32)
    spk = PreKey.create(member, "spk", 7, P.x25519_public(spk_private), 1_800_000_000)
    kem = mlkem_fixture(0)
    kem_prekey = PreKey.create(member, "kem-lr", 8, kem["public"], 1_800_000_000)
    bundle = PreKeyBundle(member=member.public, spk=spk, kem=kem_prekey)
    kdf_key = rng(32)
    return {
        "kdf": {
            "key": kdf_key,
            "label": b"bc-example",
            "data": b"backchannel",
            "out32": P.kdf(kdf_key, b"bc-example", b"backchannel", 32),
            "out64": P.kdf(kdf_key, b"bc-example", b"backchannel", 64),
        },
        "member": {
            "sign_seed": member.sign_seed,
            "dh_private": member.dh_private,
            "sign_public": member.public.sign,
            "dh_public": member.public.dh,
            "fingerprint": member.public.fingerprint(),
            "fingerprint_text": member.public.fingerprint_text(),
            "private_bytes": member.to_bytes(),
        },
        "signing_input": signing_input("prekey", b"abc"),
        "spk": {"private": spk_private, "signed_part": spk.signed_part(member.public),
                "signature": spk.signature},
        "kem_prekey_signature": kem_prekey.signature,
        "bundle_bytes": bundle.to_bytes(),
        "aead": {
            "key": kdf_key,
            "nonce": bytes(range(24)),
            "ad": b"ad",
            "ciphertext": P.aead_encrypt(kdf_key, bytes(range(24)), b"plaintext", b"ad"),
        },
    }
