"""The hybrid PQXDH-style handshake and the session-opening message."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol import handshake as H
from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.errors import (
    BadSignature,
    DecodeError,
    DecryptionFailed,
    HandshakeError,
    InvalidKey,
    ProtocolError,
)
from backchannel.protocol.keys import (
    MemberKeyPair,
    PreKey,
    PreKeyBundle,
    PreKeyKind,
    PreKeyPrivate,
    generate_kem_prekey,
    generate_x25519_prekey,
)
from backchannel.protocol.ratchet import PairwiseMessage, PairwiseSession
from tests.protocol.drbg import Drbg

NOW = 1_800_000_000


@dataclass
class Responder:
    """A member with published prekeys and the private store its client keeps."""

    key: MemberKeyPair
    store: dict[tuple[str, int], tuple[PreKey, PreKeyPrivate]] = field(default_factory=dict)

    def add(self, pair: tuple[PreKey, PreKeyPrivate]) -> PreKey:
        self.store[(pair[0].kind, pair[0].id)] = pair
        return pair[0]

    def lookup(self, kind: PreKeyKind, key_id: int) -> tuple[PreKey, PreKeyPrivate] | None:
        return self.store.get((kind, key_id))

    def consume(self, consumed: tuple[tuple[PreKeyKind, int], ...]) -> None:
        for item in consumed:
            del self.store[item]


def make_responder(seed: str = "bob") -> Responder:
    rng = Drbg(seed)
    bob = Responder(MemberKeyPair.generate(rng))
    bob.add(generate_x25519_prekey(bob.key, "spk", 1, NOW, rng))
    bob.add(generate_x25519_prekey(bob.key, "spk", 2, NOW, rng))
    for key_id in (10, 11):
        bob.add(generate_x25519_prekey(bob.key, "opk", key_id, NOW, rng))
    bob.add(generate_kem_prekey(bob.key, "kem", 20, NOW))
    bob.add(generate_kem_prekey(bob.key, "kem-lr", 21, NOW))
    return bob


BOB = make_responder()
ALICE = MemberKeyPair.generate(Drbg("alice"))


def bundle_of(
    bob: Responder, *, opk: int | None = 10, kem: tuple[PreKeyKind, int] = ("kem", 20), spk: int = 1
) -> PreKeyBundle:
    return PreKeyBundle(
        member=bob.key.public,
        spk=bob.store[("spk", spk)][0],
        kem=bob.store[kem][0],
        opk=None if opk is None else bob.store[("opk", opk)][0],
    )


def first_message(bob: Responder = BOB, *, rng: str = "eph") -> tuple[PairwiseSession, bytes]:
    alice = PairwiseSession.initiate(ALICE, bundle_of(bob), bob.key.public, rng=Drbg(rng), now=NOW)
    return alice, alice.encrypt(b"first words")


# --- agreement ---------------------------------------------------------------------------


@pytest.mark.parametrize("opk", [10, None])
@pytest.mark.parametrize("kem", [("kem", 20), ("kem-lr", 21)])
def test_both_sides_agree(opk: int | None, kem: tuple[PreKeyKind, int]) -> None:
    bundle = bundle_of(BOB, opk=opk, kem=kem)
    sent = H.initiate(ALICE, bundle, BOB.key.public, rng=Drbg("e"), now=NOW, max_spk_age=3600)
    got = H.respond(BOB.key, sent.header, initiator=ALICE.public, prekeys=BOB.lookup)
    assert len(sent.session_key) == 32
    assert P.ct_equal(sent.session_key, got.session_key)
    assert sent.associated_data == got.associated_data
    assert sent.transcript == got.transcript
    assert sent.peer_spk == P.x25519_public(got.ratchet_private)
    expected: list[tuple[str, int]] = [] if opk is None else [("opk", opk)]
    if kem[0] == "kem":
        expected.append(kem)
    assert list(got.consumed) == expected
    assert sent.header.prekeys() == [("spk", 1), kem] + ([] if opk is None else [("opk", opk)])


def test_associated_data_names_both_members_initiator_first() -> None:
    ad = H.associated_data(ALICE.public, BOB.key.public)
    assert decode(ad) == {
        "initiator": ALICE.public.to_value(),
        "responder": BOB.key.public.to_value(),
        "v": 1,
    }
    assert ad != H.associated_data(BOB.key.public, ALICE.public)


def test_transcript_binds_every_public_value() -> None:
    sent = H.initiate(ALICE, bundle_of(BOB), BOB.key.public, rng=Drbg("e"))
    value = decode(sent.transcript)
    assert isinstance(value, dict)
    assert value["proto"] == H.PROTOCOL_NAME
    assert value["initiator"] == ALICE.public.to_value()
    assert value["responder"] == BOB.key.public.to_value()
    assert value["ek"] == sent.header.ephemeral
    assert value["ct"] == sent.header.kem_ciphertext
    assert value["kem"] == {"id": 20, "kind": "kem", "pk": BOB.store[("kem", 20)][0].public}
    assert value["spk"] == {"id": 1, "pk": BOB.store[("spk", 1)][0].public}
    assert value["opk"] == {"id": 10, "pk": BOB.store[("opk", 10)][0].public}


def test_session_key_changes_with_every_input() -> None:
    rng = Drbg("sk")
    dh = [rng(32) for _ in range(4)]
    ss = rng(32)
    base = H.transcript(
        initiator=ALICE.public,
        responder=BOB.key.public,
        ephemeral=rng(32),
        spk=BOB.store[("spk", 1)][0],
        kem=BOB.store[("kem", 20)][0],
        kem_ciphertext=rng(P.MLKEM_CIPHERTEXT_SIZE),
        opk=BOB.store[("opk", 10)][0],
    )
    reference = H.session_key(dh, ss, base)
    variants = [
        H.session_key(dh[:3], ss, base),
        H.session_key([dh[1], dh[0], *dh[2:]], ss, base),
        H.session_key(dh, rng(32), base),
        H.session_key(dh, ss, base + b"\x00"),
    ]
    for i in range(4):
        changed = list(dh)
        changed[i] = bytes([changed[i][0] ^ 1]) + changed[i][1:]
        variants.append(H.session_key(changed, ss, base))
    assert len({reference, *variants}) == len(variants) + 1


def _transcript_variants() -> list[bytes]:
    """The reference transcript and one per changed element."""
    rng = Drbg("tv")
    ek, ct = rng(32), rng(P.MLKEM_CIPHERTEXT_SIZE)
    mallory = MemberKeyPair.generate(rng).public
    spk1, spk2 = BOB.store[("spk", 1)][0], BOB.store[("spk", 2)][0]
    opk1, opk2 = BOB.store[("opk", 10)][0], BOB.store[("opk", 11)][0]
    kem, kem_lr = BOB.store[("kem", 20)][0], BOB.store[("kem-lr", 21)][0]
    args = {
        "initiator": ALICE.public,
        "responder": BOB.key.public,
        "ephemeral": ek,
        "spk": spk1,
        "kem": kem,
        "kem_ciphertext": ct,
        "opk": opk1,
    }
    changes = [
        {},
        {"initiator": BOB.key.public, "responder": ALICE.public},
        {"initiator": mallory},
        {"responder": mallory},
        {"ephemeral": rng(32)},
        {"spk": spk2},
        {"spk": replace(spk1, id=99)},
        {"opk": opk2},
        {"opk": replace(opk1, id=99)},
        {"opk": None},
        {"kem": kem_lr},
        {"kem": replace(kem, kind="kem-lr")},
        {"kem": replace(kem, id=99)},
        {"kem_ciphertext": rng(P.MLKEM_CIPHERTEXT_SIZE)},
    ]
    return [H.transcript(**{**args, **change}) for change in changes]  # type: ignore[arg-type]


def test_every_transcript_element_changes_the_session_key() -> None:
    dh = [bytes([i]) * 32 for i in range(3)]
    keys = {H.session_key(dh, bytes(32), t) for t in _transcript_variants()}
    assert len(keys) == len(_transcript_variants())


def test_full_session_opens_and_consumes_one_time_prekeys() -> None:
    bob = make_responder("bob-consume")
    alice, first = first_message(bob)
    accepted = PairwiseSession.accept(bob.key, first, initiator=ALICE.public, prekeys=bob.lookup)
    assert accepted.plaintext == b"first words"
    assert set(accepted.consumed) == {("opk", 10), ("kem", 20)}
    bob.consume(accepted.consumed)
    assert alice.decrypt(accepted.session.encrypt(b"reply")) == b"reply"
    assert alice.established
    # A replay of the prekey message, once its one-time prekeys are gone:
    with pytest.raises(HandshakeError):
        PairwiseSession.accept(bob.key, first, initiator=ALICE.public, prekeys=bob.lookup)


# --- bundles refused before anything is computed -----------------------------------------


def test_bundle_for_wrong_member_is_refused() -> None:
    mallory = make_responder("mallory")
    with pytest.raises(HandshakeError):
        H.initiate(ALICE, bundle_of(mallory), BOB.key.public)
    # Mallory's prekeys presented under Bob's member key: signatures fail.
    forged = replace(bundle_of(mallory), member=BOB.key.public)
    with pytest.raises(BadSignature):
        H.initiate(ALICE, forged, BOB.key.public)


def test_bad_signature_is_refused() -> None:
    bundle = bundle_of(BOB)
    spk = bundle.spk
    broken = replace(spk, signature=bytes([spk.signature[0] ^ 1]) + spk.signature[1:])
    with pytest.raises(BadSignature):
        H.initiate(ALICE, replace(bundle, spk=broken), BOB.key.public)
    kem = replace(bundle.kem, public=bytes(P.MLKEM_PUBLIC_SIZE))
    with pytest.raises(BadSignature):
        H.initiate(ALICE, replace(bundle, kem=kem), BOB.key.public)


def test_wrong_kinds_are_refused() -> None:
    bundle = bundle_of(BOB)
    opk = BOB.store[("opk", 10)][0]
    kem = BOB.store[("kem", 20)][0]
    spk = BOB.store[("spk", 1)][0]
    for wrong in (
        replace(bundle, spk=opk),
        replace(bundle, opk=spk),
        replace(bundle, kem=replace(kem, kind="spk")),
    ):
        with pytest.raises(HandshakeError):
            H.initiate(ALICE, wrong, BOB.key.public)


def test_stale_signed_prekey_is_refused() -> None:
    H.initiate(ALICE, bundle_of(BOB), BOB.key.public, now=NOW + 100, max_spk_age=100)
    with pytest.raises(HandshakeError):
        H.initiate(ALICE, bundle_of(BOB), BOB.key.public, now=NOW + 101, max_spk_age=100)


def test_no_session_with_oneself() -> None:
    me = make_responder("self")
    with pytest.raises(HandshakeError):
        H.initiate(me.key, bundle_of(me), me.key.public)
    header = H.initiate(ALICE, bundle_of(me), me.key.public).header
    with pytest.raises(HandshakeError):
        H.respond(
            me.key,
            replace(header, initiator=me.key.public),
            initiator=me.key.public,
            prekeys=me.lookup,
        )


# --- the responder's side ----------------------------------------------------------------------


def test_initiator_must_be_the_expected_member() -> None:
    sent = H.initiate(ALICE, bundle_of(BOB), BOB.key.public)
    mallory = MemberKeyPair.generate(Drbg("mallory"))
    with pytest.raises(HandshakeError):
        H.respond(BOB.key, sent.header, initiator=mallory.public, prekeys=BOB.lookup)


@pytest.mark.parametrize("missing", [("spk", 1), ("opk", 10), ("kem", 20)])
def test_missing_prekey_is_a_handshake_error(missing: tuple[PreKeyKind, int]) -> None:
    sent = H.initiate(ALICE, bundle_of(BOB), BOB.key.public)

    def lookup(kind: PreKeyKind, key_id: int) -> tuple[PreKey, PreKeyPrivate] | None:
        return None if (kind, key_id) == missing else BOB.lookup(kind, key_id)

    with pytest.raises(HandshakeError):
        H.respond(BOB.key, sent.header, initiator=ALICE.public, prekeys=lookup)


def test_inconsistent_prekey_store_is_a_handshake_error() -> None:
    sent = H.initiate(ALICE, bundle_of(BOB), BOB.key.public)

    def wrong_id(kind: PreKeyKind, key_id: int) -> tuple[PreKey, PreKeyPrivate] | None:
        return BOB.lookup(kind, 2 if kind == "spk" else key_id)

    def wrong_half(kind: PreKeyKind, key_id: int) -> tuple[PreKey, PreKeyPrivate] | None:
        found = BOB.lookup(kind, key_id)
        if found is not None and kind == "opk":
            return found[0], BOB.store[("opk", 11)][1]
        return found

    for lookup in (wrong_id, wrong_half):
        with pytest.raises(HandshakeError):
            H.respond(BOB.key, sent.header, initiator=ALICE.public, prekeys=lookup)


def _with_header(message: bytes, **change: object) -> bytes:
    parsed = PairwiseMessage.from_bytes(message)
    assert parsed.initial is not None
    return replace(parsed, initial=replace(parsed.initial, **change)).to_bytes()


def test_forged_kem_ciphertext_fails_the_first_message() -> None:
    _, first = first_message()
    header = PairwiseMessage.from_bytes(first).initial
    assert header is not None
    forged_ct = bytes([header.kem_ciphertext[0] ^ 1]) + header.kem_ciphertext[1:]
    # ML-KEM implicit rejection: decapsulation "succeeds" with an unrelated secret ...
    got = H.respond(
        BOB.key,
        replace(header, kem_ciphertext=forged_ct),
        initiator=ALICE.public,
        prekeys=BOB.lookup,
    )
    sent_sk = H.respond(BOB.key, header, initiator=ALICE.public, prekeys=BOB.lookup).session_key
    assert got.session_key != sent_sk
    # ... so the first message does not decrypt.
    with pytest.raises(DecryptionFailed):
        PairwiseSession.accept(
            BOB.key,
            _with_header(first, kem_ciphertext=forged_ct),
            initiator=ALICE.public,
            prekeys=BOB.lookup,
        )


def test_altered_ephemeral_key_fails_the_first_message() -> None:
    _, first = first_message()
    other = P.x25519_public(Drbg("other-ek")(32))
    with pytest.raises(DecryptionFailed):
        PairwiseSession.accept(
            BOB.key,
            _with_header(first, ephemeral=other),
            initiator=ALICE.public,
            prekeys=BOB.lookup,
        )
    with pytest.raises(InvalidKey):  # a low-order point
        PairwiseSession.accept(
            BOB.key,
            _with_header(first, ephemeral=bytes(32)),
            initiator=ALICE.public,
            prekeys=BOB.lookup,
        )


@pytest.mark.parametrize(
    "change",
    [{"opk_id": 11}, {"opk_id": None}, {"spk_id": 2}, {"kem_id": 21, "kem_kind": "kem-lr"}],
)
def test_naming_other_existing_prekeys_fails_the_first_message(change: dict[str, object]) -> None:
    """Swapping in another of the responder's real prekeys changes SK: nothing is accepted."""
    _, first = first_message()
    with pytest.raises(DecryptionFailed):
        PairwiseSession.accept(
            BOB.key, _with_header(first, **change), initiator=ALICE.public, prekeys=BOB.lookup
        )


def test_message_without_initial_header_opens_nothing() -> None:
    alice, first = first_message()
    PairwiseSession.accept(BOB.key, first, initiator=ALICE.public, prekeys=BOB.lookup)
    bare = replace(PairwiseMessage.from_bytes(alice.encrypt(b"x")), initial=None).to_bytes()
    with pytest.raises(HandshakeError):
        PairwiseSession.accept(BOB.key, bare, initiator=ALICE.public, prekeys=BOB.lookup)


# --- encodings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opk", [10, None])
def test_initial_header_round_trip(opk: int | None) -> None:
    header = H.initiate(ALICE, bundle_of(BOB, opk=opk), BOB.key.public).header
    data = header.to_bytes()
    assert H.InitialHeader.from_bytes(data) == header
    assert ("opk_id" in decode(data)) is (opk is not None)  # type: ignore[operator]
    assert len(header.digest()) == 32
    assert header.kem_ciphertext.hex() not in repr(header)


def test_initial_header_rejects_unknown_versions_and_fields() -> None:
    header = H.initiate(ALICE, bundle_of(BOB), BOB.key.public).header
    value = decode(header.to_bytes())
    assert isinstance(value, dict)
    for bad in (
        {**value, "v": 2},
        {**value, "extra": 1},
        {**value, "kem_kind": "spk"},
        {k: v for k, v in value.items() if k != "ek"},
    ):
        with pytest.raises(DecodeError):
            H.InitialHeader.from_bytes(encode(bad))


def test_results_hide_secrets_in_repr() -> None:
    sent = H.initiate(ALICE, bundle_of(BOB), BOB.key.public)
    got = H.respond(BOB.key, sent.header, initiator=ALICE.public, prekeys=BOB.lookup)
    for text in (repr(sent), repr(got)):
        assert sent.session_key.hex() not in text
        assert got.ratchet_private.hex() not in text


FIRST = first_message(rng="bitflip")[1]
HEADER = H.initiate(ALICE, bundle_of(BOB), BOB.key.public, rng=Drbg("h")).header.to_bytes()


@given(st.data())
def test_bit_flip_in_initial_header_is_a_typed_error(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(HEADER) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(HEADER)
    flipped[index] ^= 1 << bit
    try:
        header = H.InitialHeader.from_bytes(bytes(flipped))
    except DecodeError:
        return
    # It parsed (a changed id, key or ciphertext byte): the run must not agree.
    original = H.InitialHeader.from_bytes(HEADER)
    try:
        got = H.respond(BOB.key, header, initiator=ALICE.public, prekeys=BOB.lookup)
    except ProtocolError:
        return
    want = H.respond(BOB.key, original, initiator=ALICE.public, prekeys=BOB.lookup)
    assert got.session_key != want.session_key


@given(st.data())
def test_bit_flip_in_first_message_is_a_typed_error(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(FIRST) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(FIRST)
    flipped[index] ^= 1 << bit
    with pytest.raises(ProtocolError):
        PairwiseSession.accept(BOB.key, bytes(flipped), initiator=ALICE.public, prekeys=BOB.lookup)


@given(st.binary(max_size=3000))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decoder in (H.InitialHeader.from_bytes, PairwiseMessage.from_bytes):
        with contextlib.suppress(ProtocolError):
            decoder(data)
