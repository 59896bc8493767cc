"""Sender keys and room envelopes: round trips, ordering, replay, rotation,
tampering, persistence, and the epoch check against a validated room log."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from backchannel.protocol import padding
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.envelope import RoomEnvelope, check_epoch
from backchannel.protocol.errors import (
    BadSignature,
    DecodeError,
    DecryptionFailed,
    DuplicateMessage,
    ForkDetected,
    NotAuthorized,
    ProtocolError,
    StaleSenderKey,
    TooManySkipped,
    UnknownSenderKey,
    UnsupportedVersion,
)
from backchannel.protocol.keys import MemberKeyPair
from backchannel.protocol.senderkey import (
    InboundSenderKey,
    OutboundSenderKey,
    SenderKeyDistribution,
    kdf_ck,
    message_aead_key,
)
from tests.protocol.drbg import Drbg

ROOM = bytes(range(32))
OWNER = bytes(range(32, 64))
HEAD = bytes(32)
EPOCH = (3, HEAD)


def fresh(seed: str = "sk", *, since: int = 0, max_skip: int = 2000, max_stored: int = 2000):
    out = OutboundSenderKey.generate(ROOM, OWNER, since=since, rng=Drbg(seed))
    inbound = InboundSenderKey.from_distribution(
        out.distribution(), max_skip=max_skip, max_stored=max_stored
    )
    return out, inbound


def test_round_trip_and_counters() -> None:
    out, inb = fresh()
    for i in range(5):
        env = out.seal(f"message {i}".encode(), EPOCH)
        assert RoomEnvelope.from_bytes(env).index == i
        assert inb.open(env) == f"message {i}".encode()
    assert out.index == inb.index == 5
    assert inb.missing() == []


def test_chain_matches_the_documented_kdf() -> None:
    """docs/sections/rooms.md: chain step and AEAD key derivation, by hand."""
    out, _ = fresh()
    ck = out.distribution().chain_key
    env = RoomEnvelope.from_bytes(out.seal(b"x", EPOCH))
    next_ck = P.kdf(ck, b"bc-sk-chain", b"", 64)
    mk = next_ck[32:]
    assert kdf_ck(ck) == (next_ck[:32], mk)
    key = P.kdf(mk, b"bc-sk-msg", b"", 56)
    assert message_aead_key(mk) == (key[:32], key[32:])
    padded = P.aead_decrypt(key[:32], key[32:], env.ciphertext, env.associated_data())
    assert padding.unpad(padded) == b"x"
    assert out.distribution().chain_key == next_ck[:32]


def test_ciphertext_length_is_bucketed() -> None:
    out, _ = fresh()
    sizes = {len(RoomEnvelope.from_bytes(out.seal(b"a" * n, EPOCH)).ciphertext) for n in range(200)}
    assert sizes == {256 + P.AEAD_TAG_SIZE}


@settings(max_examples=40, deadline=None)
@given(st.permutations(range(15)))
def test_any_order_within_the_bound_decrypts(order: list[int]) -> None:
    out, inb = fresh("order")
    envs = [out.seal(bytes([i]), EPOCH) for i in range(15)]
    for i in order:
        assert inb.open(envs[i]) == bytes([i])
    assert inb.missing() == []


def test_gaps_are_visible_until_filled() -> None:
    out, inb = fresh()
    envs = [out.seal(bytes([i]), EPOCH) for i in range(6)]
    inb.open(envs[5])
    assert inb.missing() == [0, 1, 2, 3, 4]
    inb.open(envs[2])
    assert inb.missing() == [0, 1, 3, 4]


def test_beyond_the_skip_bound_fails_cleanly_and_changes_nothing() -> None:
    out, inb = fresh(max_skip=10, max_stored=10)
    envs = [out.seal(b"m", EPOCH) for i in range(12)]
    before = inb.to_bytes()
    with pytest.raises(TooManySkipped):
        inb.open(envs[11])
    assert inb.to_bytes() == before
    assert inb.open(envs[10]) == b"m"  # exactly the bound is fine
    assert inb.missing() == list(range(10))


def test_replays_are_refused() -> None:
    out, inb = fresh()
    envs = [out.seal(bytes([i]), EPOCH) for i in range(3)]
    inb.open(envs[2])
    inb.open(envs[0])
    for env in (envs[2], envs[0]):
        before = inb.to_bytes()
        with pytest.raises(DuplicateMessage):
            inb.open(env)
        assert inb.to_bytes() == before
    assert inb.open(envs[1]) == bytes([1])


def test_oldest_skipped_keys_are_evicted() -> None:
    out, inb = fresh(max_skip=5, max_stored=5)
    envs = [out.seal(bytes([i]), EPOCH) for i in range(12)]
    inb.open(envs[5])  # skips 0..4
    inb.open(envs[11])  # skips 6..10: 0..4 must go to keep at most five
    assert inb.missing() == [6, 7, 8, 9, 10]
    with pytest.raises(DuplicateMessage):
        inb.open(envs[0])


def test_joiner_reads_only_from_its_distribution_on() -> None:
    out, _ = fresh()
    early = [out.seal(b"before you came", EPOCH) for _ in range(3)]
    late = InboundSenderKey.from_distribution(out.distribution())
    for env in early:
        with pytest.raises(DuplicateMessage):
            late.open(env)
    assert late.open(out.seal(b"welcome", EPOCH)) == b"welcome"


def test_rotation_retires_the_old_generation_at_the_removal() -> None:
    out, inb = fresh()
    inb.open(out.seal(b"old", (3, HEAD)))
    in_flight = out.seal(b"sent before the sender saw the removal", (4, HEAD))
    after_removal = out.seal(b"old key, later epoch", (6, HEAD))
    inb.retire(5)  # the validated log shows a removal at position 5
    assert inb.open(in_flight) == b"sent before the sender saw the removal"
    with pytest.raises(StaleSenderKey):
        inb.open(after_removal)
    new = OutboundSenderKey.generate(ROOM, OWNER, since=5, previous=out, rng=Drbg("rot"))
    dist = new.distribution()
    assert dist.generation == 1
    assert dist.prev_count == 3
    assert dist.since == 5
    assert dist.chain_key != out.distribution().chain_key
    new_in = InboundSenderKey.from_distribution(dist)
    assert new_in.open(new.seal(b"new key", (6, HEAD))) == b"new key"
    # The old generation's inbound key cannot read the new one.
    with pytest.raises(UnknownSenderKey):
        inb.open(new.seal(b"x", (6, HEAD)))


def test_retirement_only_moves_earlier() -> None:
    _, inb = fresh()
    inb.retire(9)
    inb.retire(12)
    assert inb.retired_at == 9
    inb.retire(4)
    assert inb.retired_at == 4


def test_new_key_cannot_claim_an_epoch_before_it_existed() -> None:
    out, inb = fresh(since=7)
    with pytest.raises(StaleSenderKey):
        out.seal(b"x", (6, HEAD))
    # A relay cannot rewrite the epoch either: it is signed.
    env = RoomEnvelope.from_bytes(out.seal(b"x", (7, HEAD)))
    forged = RoomEnvelope(**{**_fields(env), "epoch_pos": 6})
    with pytest.raises(BadSignature):
        inb.open(forged.to_bytes())


def _fields(env: RoomEnvelope) -> dict[str, object]:
    return {name: getattr(env, name) for name in RoomEnvelope.__slots__}


def test_message_moved_to_another_room_or_sender_is_refused() -> None:
    out, inb = fresh()
    env = RoomEnvelope.from_bytes(out.seal(b"x", EPOCH))
    for change in ({"room_id": bytes(32)}, {"sender": bytes(32)}, {"generation": 1}):
        moved = RoomEnvelope(**{**_fields(env), **change})
        with pytest.raises(UnknownSenderKey):
            inb.open(moved.to_bytes())
    # The same sender's key in another room is a different inbound key: the
    # room id is signed and is the AEAD's associated data.
    other_room = InboundSenderKey.from_distribution(
        SenderKeyDistribution(**{**_dist_fields(out.distribution()), "room_id": bytes(32)})
    )
    with pytest.raises((UnknownSenderKey, BadSignature)):
        other_room.open(RoomEnvelope(**{**_fields(env), "room_id": bytes(32)}).to_bytes())


def _dist_fields(d: SenderKeyDistribution) -> dict[str, object]:
    return {name: getattr(d, name) for name in SenderKeyDistribution.__slots__}


def test_message_signed_by_another_members_key_is_refused() -> None:
    """A member that knows someone else's chain key (every member does) still
    cannot write as them: only the owner holds the signing key."""
    out, inb = fresh()
    mallory = OutboundSenderKey.generate(ROOM, b"\x07" * 32, since=0, rng=Drbg("mallory"))
    # Mallory takes the victim's chain key from the distribution she received
    # and signs with her own key while claiming to be the owner.
    stolen = OutboundSenderKey(
        room_id=ROOM,
        owner=OWNER,
        generation=0,
        index=0,
        chain_key=out.distribution().chain_key,
        sign_seed=Drbg("mallory-seed")(32),
        since=0,
        prev_count=0,
    )
    with pytest.raises(BadSignature):
        inb.open(stolen.seal(b"I never said this", EPOCH))
    assert inb.index == 0
    with pytest.raises(UnknownSenderKey):
        inb.open(mallory.seal(b"hi", EPOCH))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_bit_flip_is_a_typed_error_and_changes_nothing(data: st.DataObject) -> None:
    out, inb = fresh("flip")
    env = out.seal(b"the position we can live with", EPOCH)
    at = data.draw(st.integers(0, len(env) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(env)
    flipped[at] ^= 1 << bit
    before = inb.to_bytes()
    with pytest.raises(ProtocolError):
        inb.open(bytes(flipped))
    assert inb.to_bytes() == before
    assert inb.open(env) == b"the position we can live with"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decoder in (
        RoomEnvelope.from_bytes,
        SenderKeyDistribution.from_bytes,
        InboundSenderKey.from_bytes,
        OutboundSenderKey.from_bytes,
    ):
        with pytest.raises(ProtocolError):
            decoder(data)


def test_envelope_decoder_rejects_wrong_versions_fields_and_trailing_bytes() -> None:
    out, _ = fresh()
    env = out.seal(b"x", EPOCH)
    value = decode(env)
    assert isinstance(value, dict)
    with pytest.raises(UnsupportedVersion):
        RoomEnvelope.from_bytes(encode({**value, "v": 2}))
    with pytest.raises(DecodeError):
        RoomEnvelope.from_bytes(encode({**value, "extra": 1}))
    with pytest.raises(DecodeError):
        RoomEnvelope.from_bytes(env + b"\x00")
    with pytest.raises(DecodeError):
        RoomEnvelope.from_bytes(encode({k: v for k, v in value.items() if k != "sig"}))
    with pytest.raises(DecodeError):
        RoomEnvelope.from_bytes(encode({**value, "room": b"short"}))


def test_truncated_ciphertext_fails_authentication() -> None:
    out, inb = fresh()
    env = RoomEnvelope.from_bytes(out.seal(b"x", EPOCH))
    cut = RoomEnvelope(**{**_fields(env), "ciphertext": env.ciphertext[:-1]})
    with pytest.raises((BadSignature, DecryptionFailed)):
        inb.open(cut.to_bytes())


def test_state_round_trips_mid_stream_and_continues_identically() -> None:
    out, inb = fresh("persist")
    envs = [out.seal(bytes([i]), EPOCH) for i in range(4)]
    inb.open(envs[3])
    inb.retire(50)
    out2 = OutboundSenderKey.from_bytes(out.to_bytes())
    inb2 = InboundSenderKey.from_bytes(inb.to_bytes())
    assert inb2.to_bytes() == inb.to_bytes()
    assert out2.to_bytes() == out.to_bytes()
    # Same key material: the reloaded sender makes the very same next envelope.
    assert out2.seal(b"next", EPOCH) == out.seal(b"next", EPOCH)
    assert inb2.open(envs[1]) == bytes([1])
    assert inb2.missing() == [0, 2]
    assert inb2.retired_at == 50


def test_state_decoder_rejects_inconsistent_states() -> None:
    out, inb = fresh()
    inb.open(out.seal(b"x", EPOCH))
    value = decode(inb.to_bytes())
    assert isinstance(value, dict)
    with pytest.raises(DecodeError):  # a skipped key at or above the index
        InboundSenderKey.from_bytes(encode({**value, "skipped": [[5, bytes(32)]]}))
    with pytest.raises(DecodeError):
        InboundSenderKey.from_bytes(encode({**value, "skipped": [[0, bytes(32)], [0, bytes(32)]]}))
    with pytest.raises(DecodeError):
        InboundSenderKey.from_bytes(encode({**value, "max_skip": 5000}))


def test_repr_hides_key_material() -> None:
    out, inb = fresh()
    dist = out.distribution()
    for obj in (out, inb, dist):
        text = repr(obj)
        assert dist.chain_key.hex() not in text
        assert repr(dist.chain_key) not in text


# --- the epoch check against a validated room log -------------------------------------------

T0 = 1_800_000_000


def _room() -> tuple[L.RoomLog, dict[str, MemberKeyPair]]:
    rng = Drbg("epoch-room")
    keys = {name: MemberKeyPair.generate(rng) for name in ("fac", "ann", "obs", "late")}
    log = L.RoomLog()
    log.append(L.make_create(keys["fac"], L.Rules(), T0, rng))
    for name, role in (("ann", "participant"), ("obs", "observer")):
        event, seed = L.make_invite(keys["fac"], log.state, role, T0 + 900, 1, T0, rng)
        log.append(event)
        log.append(L.make_join(keys[name], seed, log.state, T0))
    return log, keys


def _env(sender: MemberKeyPair, pos: int, head: bytes) -> RoomEnvelope:
    out = OutboundSenderKey.generate(b"\x01" * 32, sender.public.sign, since=0, rng=Drbg("e"))
    return RoomEnvelope.from_bytes(out.seal(b"x", (pos, head)))


def test_epoch_check_accepts_members_and_refuses_the_rest() -> None:
    log, k = _room()
    head = log.state.head
    fac, ann = k["fac"].public.sign, k["ann"].public.sign
    assert check_epoch(log, _env(k["ann"], log.state.pos, head), fac) == "ok"
    with pytest.raises(NotAuthorized):  # observers do not post
        check_epoch(log, _env(k["obs"], log.state.pos, head), fac)
    with pytest.raises(NotAuthorized):  # a stranger is no sender
        check_epoch(log, _env(k["late"], log.state.pos, head), fac)
    # Ann joined at position 2: a message from epoch 1 is not hers to read.
    assert isinstance(log.decoded(2), L.JoinEvent)
    assert check_epoch(log, _env(k["fac"], 2, log.head_at(2)), ann) == "ok"
    with pytest.raises(NotAuthorized):
        check_epoch(log, _env(k["fac"], 1, log.head_at(1)), ann)
    assert check_epoch(log, _env(k["fac"], 99, head), ann) == "ahead"


def test_epoch_check_detects_a_fork() -> None:
    """The relay showed the sender a different event at a position we hold."""
    log, k = _room()
    pos = log.state.pos
    with pytest.raises(ForkDetected):
        check_epoch(log, _env(k["ann"], pos, bytes(32)), k["fac"].public.sign)


class Delivery(RuleBasedStateMachine):
    """Random send / deliver / duplicate / drop / persist-and-reload: every
    message that decrypts equals what was sent, each at most once."""

    @initialize()
    def setup(self) -> None:
        self.out, self.inb = fresh("machine", max_skip=30, max_stored=30)
        self.sent: list[bytes] = []
        self.texts: list[bytes] = []
        self.read: set[int] = set()

    @rule(text=st.binary(max_size=40))
    def send(self, text: bytes) -> None:
        self.sent.append(self.out.seal(text, EPOCH))
        self.texts.append(text)

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        if not self.sent:
            return
        i = data.draw(st.integers(0, len(self.sent) - 1))
        index_before = self.inb.index
        missing_before = set(self.inb.missing())
        try:
            plaintext = self.inb.open(self.sent[i])
        except DuplicateMessage:
            # Only a message already read, or one whose skipped key was evicted.
            assert i < index_before
            assert i not in missing_before
            return
        except TooManySkipped:
            assert i - index_before > 30
            return
        assert plaintext == self.texts[i]
        assert i not in self.read
        self.read.add(i)

    @rule()
    def reload(self) -> None:
        self.inb = InboundSenderKey.from_bytes(self.inb.to_bytes())
        self.out = OutboundSenderKey.from_bytes(self.out.to_bytes())

    @invariant()
    def nothing_read_is_missing(self) -> None:
        if hasattr(self, "inb"):
            assert not self.read & set(self.inb.missing())


TestDelivery = Delivery.TestCase
TestDelivery.settings = settings(max_examples=30, stateful_step_count=40, deadline=None)


def test_authorise_sees_only_signed_envelopes_and_can_refuse() -> None:
    out, inb = fresh()
    env = RoomEnvelope.from_bytes(out.seal(b"x", EPOCH))
    seen: list[RoomEnvelope] = []
    # An altered epoch fails the signature before authorise is asked.
    forged = RoomEnvelope(**{**_fields(env), "epoch_head": b"\x01" * 32})
    with pytest.raises(BadSignature):
        inb.open(forged.to_bytes(), authorise=seen.append)
    assert seen == []

    def refuse(e: RoomEnvelope) -> None:
        raise NotAuthorized("not today")

    before = inb.to_bytes()
    with pytest.raises(NotAuthorized):
        inb.open(env, authorise=refuse)
    assert inb.to_bytes() == before  # a refusal uses no key
    assert inb.open(env, authorise=seen.append) == b"x"
    assert seen == [env]
