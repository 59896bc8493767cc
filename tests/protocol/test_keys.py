"""Member keys, signed prekeys and bundles."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol import primitives as P
from backchannel.protocol.errors import BadSignature, DecodeError, HandshakeError, ProtocolError
from backchannel.protocol.keys import (
    MemberKeyPair,
    MemberPublicKey,
    PreKey,
    PreKeyBundle,
    PreKeyUpload,
    generate_kem_prekey,
    generate_x25519_prekey,
    signing_input,
)
from tests.protocol.drbg import Drbg

NOW = 1_800_000_000


def make_bundle(seed: str = "bob", *, with_opk: bool = True) -> tuple[MemberKeyPair, PreKeyBundle]:
    rng = Drbg(seed)
    bob = MemberKeyPair.generate(rng)
    spk, _ = generate_x25519_prekey(bob, "spk", 1, NOW, rng)
    kem, _ = generate_kem_prekey(bob, "kem-lr", 2, NOW)
    opk = generate_x25519_prekey(bob, "opk", 3, NOW, rng)[0] if with_opk else None
    return bob, PreKeyBundle(member=bob.public, spk=spk, kem=kem, opk=opk)


def test_member_key_round_trip_and_repr_hides_secrets() -> None:
    key = MemberKeyPair.generate(Drbg("k"))
    again = MemberKeyPair.from_bytes(key.to_bytes())
    assert again == key
    text = repr(key)
    assert key.sign_seed.hex() not in text
    assert key.dh_private.hex() not in text
    assert key.public.fingerprint_text(2) in text


def test_signing_contexts_are_separated() -> None:
    key = MemberKeyPair.generate(Drbg("k"))
    sig = key.sign("prekey", b"m")
    key.public.verify("prekey", b"m", sig)
    with pytest.raises(BadSignature):
        key.public.verify("log-event", b"m", sig)
    assert signing_input("a", b"bc") != signing_input("ab", b"c")


def test_bundle_verifies_and_round_trips() -> None:
    bob, bundle = make_bundle()
    bundle.verify(bob.public, now=NOW + 10, max_spk_age=100)
    assert PreKeyBundle.from_bytes(bundle.to_bytes()) == bundle
    _, no_opk = make_bundle(with_opk=False)
    assert PreKeyBundle.from_bytes(no_opk.to_bytes()).opk is None


def test_bundle_for_another_member_is_refused() -> None:
    _, bundle = make_bundle("bob")
    mallory = MemberKeyPair.generate(Drbg("mallory"))
    with pytest.raises(HandshakeError):
        bundle.verify(mallory.public)


def test_substituted_prekey_is_refused() -> None:
    bob, bundle = make_bundle("bob")
    mallory = MemberKeyPair.generate(Drbg("mallory"))
    forged_spk, _ = generate_x25519_prekey(mallory, "spk", 1, NOW, Drbg("m2"))
    forged = PreKeyBundle(member=bob.public, spk=forged_spk, kem=bundle.kem, opk=bundle.opk)
    with pytest.raises(BadSignature):
        forged.verify(bob.public)


def test_prekey_kinds_cannot_be_swapped() -> None:
    bob, bundle = make_bundle()
    assert bundle.opk is not None
    as_spk = PreKey("spk", bundle.opk.id, bundle.opk.public, bundle.opk.ts, bundle.opk.signature)
    with pytest.raises(BadSignature):  # the kind is inside the signed bytes
        as_spk.verify(bob.public)
    wrong_slot = PreKeyBundle(member=bob.public, spk=bundle.opk, kem=bundle.kem)
    with pytest.raises(HandshakeError):
        wrong_slot.verify(bob.public)


def test_stale_signed_prekey_is_refused() -> None:
    bob, bundle = make_bundle()
    with pytest.raises(HandshakeError, match="stale"):
        bundle.verify(bob.public, now=NOW + 1000, max_spk_age=999)


@given(st.data())
def test_any_bit_flip_in_a_bundle_is_a_typed_error(data: st.DataObject) -> None:
    bob, bundle = BUNDLE
    raw = bundle.to_bytes()
    i = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1 :]
    with pytest.raises(ProtocolError):
        PreKeyBundle.from_bytes(flipped).verify(bob.public)


BUNDLE = make_bundle("fixed")


def test_upload_round_trip_and_duplicate_ids() -> None:
    bob, bundle = make_bundle()
    assert bundle.opk is not None
    upload = PreKeyUpload(member=bob.public, prekeys=[bundle.spk, bundle.kem, bundle.opk])
    parsed = PreKeyUpload.from_bytes(upload.to_bytes())
    parsed.verify()
    assert list(parsed.prekeys) == [bundle.spk, bundle.kem, bundle.opk]
    dup = PreKeyUpload(member=bob.public, prekeys=[bundle.spk, bundle.spk])
    with pytest.raises(DecodeError):
        dup.verify()
    too_many = PreKeyUpload(member=bob.public, prekeys=[bundle.opk] * 5)
    with pytest.raises(DecodeError):
        PreKeyUpload.from_bytes(too_many.to_bytes(), max_prekeys=4)


def test_member_public_key_rejects_wrong_sizes() -> None:
    with pytest.raises(DecodeError):
        MemberPublicKey(sign=bytes(31), dh=bytes(32))
    with pytest.raises(DecodeError):
        MemberPublicKey.from_value({"sign": bytes(32), "dh": bytes(32), "x": 1})


def test_fingerprint_binds_both_keys() -> None:
    a = MemberKeyPair.generate(Drbg("a")).public
    b = MemberKeyPair.generate(Drbg("b")).public
    mixed = MemberPublicKey(sign=a.sign, dh=b.dh)
    assert len({a.fingerprint(), b.fingerprint(), mixed.fingerprint()}) == 3
    assert len(a.fingerprint()) == 32
    assert P.hash_bytes(b"bc-fingerprint", a.sign + a.dh) == a.fingerprint()
