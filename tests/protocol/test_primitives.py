"""The primitives wrapper: typed failures and the properties the protocol relies on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol import primitives as P
from backchannel.protocol.errors import BadSignature, DecryptionFailed, InvalidKey


def test_ed25519_sign_verify_and_tamper() -> None:
    seed = bytes(range(32))
    pub = P.ed25519_public(seed)
    sig = P.ed25519_sign(seed, b"message")
    P.ed25519_verify(pub, b"message", sig)
    with pytest.raises(BadSignature):
        P.ed25519_verify(pub, b"messagE", sig)
    with pytest.raises(BadSignature):
        P.ed25519_verify(pub, b"message", sig[:-1] + bytes([sig[-1] ^ 1]))
    with pytest.raises(BadSignature):
        P.ed25519_verify(pub[:31], b"message", sig)


def test_x25519_agreement_and_low_order_rejected() -> None:
    a, b = P.random_bytes(32), P.random_bytes(32)
    assert P.x25519(a, P.x25519_public(b)) == P.x25519(b, P.x25519_public(a))
    with pytest.raises(InvalidKey):
        P.x25519(a, bytes(32))
    with pytest.raises(InvalidKey):
        P.x25519(a, b"\x01" + bytes(31))  # order-1 point
    with pytest.raises(InvalidKey):
        P.x25519(a, bytes(31))


def test_mlkem_round_trip_and_implicit_rejection() -> None:
    pk, sk = P.mlkem_keypair()
    assert len(pk) == P.MLKEM_PUBLIC_SIZE == 1184
    ct, ss = P.mlkem_encaps(pk)
    assert len(ct) == P.MLKEM_CIPHERTEXT_SIZE == 1088
    assert P.mlkem_decaps(sk, ct) == ss
    forged = bytes([ct[0] ^ 1]) + ct[1:]
    assert P.mlkem_decaps(sk, forged) != ss
    with pytest.raises(InvalidKey):
        P.mlkem_decaps(sk, ct[:-1])
    with pytest.raises(InvalidKey):
        P.mlkem_encaps(pk[:-1])


@given(st.binary(max_size=300), st.binary(max_size=40), st.data())
def test_aead_round_trip_and_any_bit_flip_fails(pt: bytes, ad: bytes, data: st.DataObject) -> None:
    key, nonce = bytes(32), bytes(range(24))
    ct = P.aead_encrypt(key, nonce, pt, ad)
    assert len(ct) == len(pt) + P.AEAD_TAG_SIZE
    assert P.aead_decrypt(key, nonce, ct, ad) == pt
    i = data.draw(st.integers(0, len(ct) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = ct[:i] + bytes([ct[i] ^ (1 << bit)]) + ct[i + 1 :]
    with pytest.raises(DecryptionFailed):
        P.aead_decrypt(key, nonce, flipped, ad)
    with pytest.raises(DecryptionFailed):
        P.aead_decrypt(key, nonce, ct, ad + b"x")


def test_kdf_domain_separation() -> None:
    key = bytes(32)
    assert P.kdf(key, b"bc-a", b"x") != P.kdf(key, b"bc-b", b"x")
    assert P.kdf(key, b"bc-a", b"x") != P.kdf(bytes(31) + b"\x01", b"bc-a", b"x")
    assert len(P.kdf(key, b"bc-a", b"x", 64)) == 64
    with pytest.raises(ValueError, match="label"):
        P.kdf(key, b"x" * 17, b"")
    with pytest.raises(ValueError, match="key"):
        P.kdf(b"", b"bc-a", b"")


def test_argon2id_deterministic_for_salt() -> None:
    salt = bytes(16)
    kw = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
    k1 = P.argon2id(b"correct horse", salt, **kw)
    assert k1 == P.argon2id(b"correct horse", salt, **kw)
    assert k1 != P.argon2id(b"correct horsf", salt, **kw)
    assert k1 != P.argon2id(b"correct horse", b"\x01" * 16, **kw)


def test_ct_equal() -> None:
    assert P.ct_equal(b"abc", b"abc")
    assert not P.ct_equal(b"abc", b"abd")
    assert not P.ct_equal(b"abc", b"ab")
