"""The Double Ratchet and pairwise sessions."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from backchannel.protocol import padding
from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.errors import (
    DecodeError,
    DecryptionFailed,
    DuplicateMessage,
    HandshakeError,
    ProtocolError,
    TooManySkipped,
)
from backchannel.protocol.keys import MemberKeyPair, PreKey, PreKeyKind, PreKeyPrivate
from backchannel.protocol.ratchet import (
    NewSession,
    PairwiseMessage,
    PairwiseSession,
    Ratchet,
    RatchetHeader,
    RatchetMessage,
    SessionNotReady,
    aead_associated_data,
    kdf_ck,
    message_aead_key,
)
from tests.protocol.drbg import Drbg
from tests.protocol.test_handshake import BOB, NOW, Responder, bundle_of, make_responder

AD = b"test associated data"


def pair(
    seed: str = "pair", *, max_skip: int = 1000, max_stored: int = 2000, first: bytes = b"hi"
) -> tuple[Ratchet, Ratchet]:
    """An initiator and a responder that has received the initiator's first message."""
    rng = Drbg(seed)
    sk, spk = rng(32), rng(32)
    alice = Ratchet.init_initiator(
        sk,
        P.x25519_public(spk),
        AD,
        rng=Drbg(seed + "/a"),
        max_skip=max_skip,
        max_stored=max_stored,
    )
    bob = Ratchet.init_responder(
        sk, spk, AD, rng=Drbg(seed + "/b"), max_skip=max_skip, max_stored=max_stored
    )
    assert bob.decrypt(alice.encrypt(first)) == first
    return alice, bob


def exchange(sender: Ratchet, receiver: Ratchet, text: bytes) -> None:
    assert receiver.decrypt(sender.encrypt(text)) == text


# --- ordinary conversations --------------------------------------------------------------


def test_long_conversation_alternating_and_bursts() -> None:
    alice, bob = pair()
    for i in range(60):
        exchange(alice, bob, b"a%d" % i)
        exchange(bob, alice, b"b%d" % i)
    for burst in range(5):
        for i in range(burst * 7 + 1):
            exchange(
                alice if burst % 2 else bob, bob if burst % 2 else alice, b"%d.%d" % (burst, i)
            )
    assert alice.skipped_count == bob.skipped_count == 0


def test_every_turn_changes_the_ratchet_key() -> None:
    alice, bob = pair()
    seen = {alice.public_key}
    for i in range(10):
        exchange(bob, alice, b"b%d" % i)
        exchange(alice, bob, b"a%d" % i)
        seen.add(alice.public_key)
    assert len(seen) == 11


def test_ciphertext_length_is_bucketed() -> None:
    alice, _ = pair()
    short = RatchetMessage.from_bytes(alice.encrypt(b"x"))
    longer = RatchetMessage.from_bytes(alice.encrypt(b"y" * 200))
    assert len(short.ciphertext) == len(longer.ciphertext) == padding.MIN_BUCKET + P.AEAD_TAG_SIZE
    big = RatchetMessage.from_bytes(alice.encrypt(b"z" * 300))
    assert len(big.ciphertext) == 2 * padding.MIN_BUCKET + P.AEAD_TAG_SIZE


def test_message_key_derivation_matches_the_spec_text() -> None:
    """KDF_CK then the AEAD key/nonce, recomputed by hand from the first message."""
    rng = Drbg("spec")
    sk, spk = rng(32), rng(32)
    alice = Ratchet.init_initiator(sk, P.x25519_public(spk), AD, rng=Drbg("spec/a"))
    dhs = Drbg("spec/a")(32)
    out = P.kdf(sk, b"bc-dr-root", P.x25519(dhs, P.x25519_public(spk)), 64)
    cks = out[32:]
    chain = P.kdf(cks, b"bc-dr-chain", b"", 64)
    assert kdf_ck(cks) == (chain[:32], chain[32:])
    okm = P.kdf(chain[32:], b"bc-dr-msg", b"", 56)
    assert message_aead_key(chain[32:]) == (okm[:32], okm[32:])
    message = RatchetMessage.from_bytes(alice.encrypt(b"hello"))
    assert message.header.dh == P.x25519_public(dhs)
    header = encode({"dh": message.header.dh, "n": 0, "pn": 0, "v": 1})
    ad = encode({"ad": AD, "from": "initiator", "hdr": header})
    assert ad == aead_associated_data(AD, "initiator", message.header.to_bytes())
    assert padding.unpad(P.aead_decrypt(okm[:32], okm[32:], message.ciphertext, ad)) == b"hello"


# --- out of order, bounds, duplicates ------------------------------------------------------


@given(st.permutations(range(12)), st.booleans())
def test_out_of_order_within_the_bound(order: list[int], turn_first: bool) -> None:
    alice, bob = pair(max_skip=20)
    if turn_first:
        exchange(bob, alice, b"turn")
    batch = [alice.encrypt(b"m%d" % i) for i in range(12)]
    for i in order:
        assert bob.decrypt(batch[i]) == b"m%d" % i
    assert bob.skipped_count == 0
    exchange(bob, alice, b"after")


def test_out_of_order_across_ratchet_steps() -> None:
    alice, bob = pair()
    old = [alice.encrypt(b"old%d" % i) for i in range(3)]
    exchange(bob, alice, b"turn")
    new = [alice.encrypt(b"new%d" % i) for i in range(3)]
    for i in (2, 0):
        assert bob.decrypt(new[i]) == b"new%d" % i
    assert bob.skipped_count == 4  # old[0..2] and new[1]
    for i in (1, 0, 2):
        assert bob.decrypt(old[i]) == b"old%d" % i
    assert bob.decrypt(new[1]) == b"new1"
    assert bob.skipped_count == 0


def test_beyond_max_skip_fails_cleanly() -> None:
    alice, bob = pair(max_skip=5)
    batch = [alice.encrypt(b"m%d" % i) for i in range(8)]
    before = bob.to_bytes()
    with pytest.raises(TooManySkipped):
        bob.decrypt(batch[6])  # needs 6 skipped keys (indices 0..5 of this chain after "hi")
    assert bob.to_bytes() == before
    assert bob.decrypt(batch[5]) == b"m5"  # exactly max_skip = 5 keys skipped
    assert bob.decrypt(batch[7]) == b"m7"


def test_beyond_max_skip_in_the_previous_chain_fails_cleanly() -> None:
    alice, bob = pair(max_skip=3)
    lost = [alice.encrypt(b"lost%d" % i) for i in range(4)]  # n = 1..4 of Alice's first chain
    exchange(bob, alice, b"turn")  # Alice ratchets
    after = alice.encrypt(b"new chain")  # pn = 5: keys 1..4 of the old chain would be skipped
    before = bob.to_bytes()
    with pytest.raises(TooManySkipped):
        bob.decrypt(after)
    assert bob.to_bytes() == before
    assert bob.decrypt(lost[0]) == b"lost0"
    assert bob.decrypt(after) == b"new chain"  # now three keys: within the bound
    for i in (3, 1, 2):
        assert bob.decrypt(lost[i]) == b"lost%d" % i


def test_header_claiming_a_huge_counter_is_refused_without_work() -> None:
    alice, bob = pair()
    genuine = RatchetMessage.from_bytes(alice.encrypt(b"x"))
    forged = replace(genuine, header=replace(genuine.header, n=2**32 - 1))
    before = bob.to_bytes()
    with pytest.raises(TooManySkipped):
        bob.decrypt(forged.to_bytes())
    assert bob.to_bytes() == before


def test_duplicates_are_refused() -> None:
    alice, bob = pair()
    current = alice.encrypt(b"current")
    assert bob.decrypt(current) == b"current"
    skipped = [alice.encrypt(b"s%d" % i) for i in range(3)]
    assert bob.decrypt(skipped[2]) == b"s2"
    assert bob.decrypt(skipped[0]) == b"s0"  # from the stored skipped keys
    exchange(bob, alice, b"turn")
    exchange(alice, bob, b"new chain")
    before = bob.to_bytes()
    for replayed in (current, skipped[2], skipped[0]):
        with pytest.raises(DuplicateMessage):
            bob.decrypt(replayed)
        assert bob.to_bytes() == before
    assert bob.decrypt(skipped[1]) == b"s1"
    with pytest.raises(DuplicateMessage):
        bob.decrypt(skipped[1])


def test_oldest_skipped_keys_are_evicted() -> None:
    alice, bob = pair(max_skip=10, max_stored=10)
    first = [alice.encrypt(b"a%d" % i) for i in range(8)]
    assert bob.decrypt(first[7]) == b"a7"  # stores 7 keys
    exchange(bob, alice, b"turn")
    second = [alice.encrypt(b"b%d" % i) for i in range(6)]
    assert bob.decrypt(second[5]) == b"b5"  # 5 more: 12 > 10, a0 and a1 are evicted
    assert bob.skipped_count == 10
    before = bob.to_bytes()
    for evicted in first[:2]:
        with pytest.raises(DuplicateMessage):
            bob.decrypt(evicted)
    assert bob.to_bytes() == before
    for i in range(2, 7):
        assert bob.decrypt(first[i]) == b"a%d" % i
    for i in range(5):
        assert bob.decrypt(second[i]) == b"b%d" % i
    assert bob.skipped_count == 0


def test_initiator_refuses_a_message_under_the_signed_prekey() -> None:
    """Before any reply the initiator's remote key is the responder's signed prekey,
    which never sends; a header naming it has no receiving chain."""
    rng = Drbg("spk-header")
    sk, spk = rng(32), rng(32)
    alice = Ratchet.init_initiator(sk, P.x25519_public(spk), AD, rng=rng)
    forged = RatchetMessage(
        header=RatchetHeader(dh=P.x25519_public(spk), pn=0, n=0), ciphertext=bytes(272)
    )
    before = alice.to_bytes()
    with pytest.raises(DecryptionFailed):
        alice.decrypt(forged.to_bytes())
    assert alice.to_bytes() == before


def test_responder_cannot_send_first() -> None:
    rng = Drbg("early")
    bob = Ratchet.init_responder(rng(32), rng(32), AD)
    with pytest.raises(SessionNotReady):
        bob.encrypt(b"too early")


# --- tampering and reflection --------------------------------------------------------------


CONVERSATION = pair("flip")
FLIP_TARGET = CONVERSATION[0].encrypt(b"target message")
FLIP_FOLLOWING = CONVERSATION[0].encrypt(b"following message")


@given(st.data())
def test_bit_flip_in_any_byte_is_a_typed_error_and_changes_nothing(data: st.DataObject) -> None:
    _, bob = CONVERSATION
    index = data.draw(st.integers(0, len(FLIP_TARGET) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(FLIP_TARGET)
    flipped[index] ^= 1 << bit
    receiver = Ratchet.from_bytes(bob.to_bytes(), rng=Drbg("flip-rng"))
    before = receiver.to_bytes()
    with pytest.raises(ProtocolError):
        receiver.decrypt(bytes(flipped))
    assert receiver.to_bytes() == before
    assert receiver.decrypt(FLIP_FOLLOWING) == b"following message"
    assert receiver.decrypt(FLIP_TARGET) == b"target message"


def test_reflected_message_does_not_decrypt() -> None:
    alice, bob = pair()
    exchange(bob, alice, b"turn")
    for sender in (alice, bob):
        own = sender.encrypt(b"reflect me")
        before = sender.to_bytes()
        with pytest.raises(ProtocolError):
            sender.decrypt(own)
        assert sender.to_bytes() == before


def test_direction_is_bound_in_the_associated_data() -> None:
    """Even with the right keys, a message only opens as sent by the other role."""
    alice, bob = pair()
    message = alice.encrypt(b"one way")
    value = decode(bob.to_bytes())
    assert isinstance(value, dict)
    flipped_role = Ratchet.from_bytes(encode({**value, "role": "initiator"}))
    with pytest.raises(DecryptionFailed):
        flipped_role.decrypt(message)
    assert bob.decrypt(message) == b"one way"


def test_different_associated_data_does_not_decrypt() -> None:
    alice, bob = pair()
    message = alice.encrypt(b"bound")
    value = decode(bob.to_bytes())
    assert isinstance(value, dict)
    other = Ratchet.from_bytes(encode({**value, "ad": b"other members"}))
    with pytest.raises(DecryptionFailed):
        other.decrypt(message)


# --- persistence ---------------------------------------------------------------------------


def test_state_round_trip_mid_conversation_continues_identically() -> None:
    alice, bob = pair()
    for i in range(5):
        exchange(alice, bob, b"a%d" % i)
        exchange(bob, alice, b"b%d" % i)
    pending = [alice.encrypt(b"p%d" % i) for i in range(4)]
    assert bob.decrypt(pending[3]) == b"p3"  # leaves skipped keys in the state
    a_state, b_state = alice.to_bytes(), bob.to_bytes()
    assert Ratchet.from_bytes(a_state).to_bytes() == a_state
    assert Ratchet.from_bytes(b_state).to_bytes() == b_state

    def run(a: Ratchet, b: Ratchet) -> list[bytes]:
        out = []
        for i in range(3):
            out.append(a.encrypt(b"x%d" % i))
            assert b.decrypt(out[-1]) == b"x%d" % i
            out.append(b.encrypt(b"y%d" % i))
            assert a.decrypt(out[-1]) == b"y%d" % i
        for i in range(3):
            assert b.decrypt(pending[i]) == b"p%d" % i
        return out

    first = run(
        Ratchet.from_bytes(a_state, rng=Drbg("cont/a")),
        Ratchet.from_bytes(b_state, rng=Drbg("cont/b")),
    )
    second = run(
        Ratchet.from_bytes(a_state, rng=Drbg("cont/a")),
        Ratchet.from_bytes(b_state, rng=Drbg("cont/b")),
    )
    assert first == second
    run(alice, bob)  # the originals carry on too


def test_state_hides_secrets_in_repr() -> None:
    alice, _ = pair()
    value = decode(alice.to_bytes())
    assert isinstance(value, dict)
    for secret in (value["rk"], value["dhs"], value["cks"]):
        assert isinstance(secret, bytes)
        assert secret.hex() not in repr(alice)
        assert secret[:4].hex() not in repr(alice)


def test_state_decoder_rejects_bad_states() -> None:
    _, bob = pair()
    value = decode(bob.to_bytes())
    assert isinstance(value, dict)
    bad_states = [
        {**value, "v": 2},
        {**value, "extra": 0},
        {**value, "skipped": [[b"\x01" * 32, 0, b"k" * 32]] * 2},
        {**value, "skipped": [[b"\x01" * 32, -1, b"k" * 32]]},
        {**value, "skipped": [[b"\x01" * 32, 0]]},
        {**value, "max_skip": value["max_stored"] + 1},  # type: ignore[operator]
        {k: v for k, v in value.items() if k != "dhr"},  # a receiving chain without its key
        {k: v for k, v in value.items() if k != "cks"},  # received, yet cannot send
        {**value, "role": "observer"},
    ]
    for bad in bad_states:
        with pytest.raises(DecodeError):
            Ratchet.from_bytes(encode(bad))


@given(st.binary(max_size=400))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decoder in (RatchetMessage.from_bytes, Ratchet.from_bytes, PairwiseSession.from_bytes):
        with contextlib.suppress(ProtocolError):
            decoder(data)


STATE = CONVERSATION[1].to_bytes()


@given(st.data())
def test_bit_flip_in_state_never_raises_untyped_errors(data: st.DataObject) -> None:
    # The state is not authenticated here (the client seals it at rest); a flip
    # either is refused with a typed error or yields a state that still works
    # or fails with typed errors.
    index = data.draw(st.integers(0, len(STATE) - 1))
    flipped = bytearray(STATE)
    flipped[index] ^= 1 << data.draw(st.integers(0, 7))
    try:
        state = Ratchet.from_bytes(bytes(flipped))
    except ProtocolError:
        return
    with contextlib.suppress(ProtocolError):
        state.decrypt(FLIP_FOLLOWING)


# --- pairwise sessions -----------------------------------------------------------------------


def open_session(seed: str) -> tuple[PairwiseSession, Responder]:
    bob = make_responder(seed)
    alice_key = MemberKeyPair.generate(Drbg(seed + "/alice"))
    alice = PairwiseSession.initiate(
        alice_key, bundle_of(bob), bob.key.public, rng=Drbg(seed + "/eph"), now=NOW
    )
    return alice, bob


def test_session_carries_the_initial_header_until_answered() -> None:
    alice, bob = open_session("session")
    messages = [alice.encrypt(b"m%d" % i) for i in range(3)]
    assert all(PairwiseMessage.from_bytes(m).initial is not None for m in messages)
    accepted = PairwiseSession.accept(
        bob.key, messages[1], initiator=alice.local, prekeys=bob.lookup
    )
    bob.consume(accepted.consumed)
    session = PairwiseSession.from_bytes(accepted.session.to_bytes())
    assert session.decrypt(messages[0]) == b"m0"  # same header: same session
    assert session.decrypt(messages[2]) == b"m2"
    assert not alice.established
    assert alice.decrypt(session.encrypt(b"reply")) == b"reply"
    assert alice.established
    assert PairwiseMessage.from_bytes(alice.encrypt(b"later")).initial is None
    assert session.peer == alice.local
    assert alice.peer == session.local
    assert alice.is_initiator
    assert not session.is_initiator


def test_another_initial_header_is_a_new_session() -> None:
    alice, bob = open_session("renew")
    accepted = PairwiseSession.accept(
        bob.key, alice.encrypt(b"one"), initiator=alice.local, prekeys=bob.lookup
    )
    session = accepted.session
    again = PairwiseSession.initiate(
        MemberKeyPair.generate(Drbg("renew/alice")), bundle_of(bob, opk=11), bob.key.public
    )
    before = session.to_bytes()
    with pytest.raises(NewSession):
        session.decrypt(again.encrypt(b"fresh start"))
    assert session.to_bytes() == before
    # The initiator never accepts a session-opening message into its own session.
    with pytest.raises(NewSession):
        alice.decrypt(again.encrypt(b"crossed"))


def test_reflected_prekey_message_is_refused() -> None:
    alice, _ = open_session("reflect")
    own = alice.encrypt(b"to bob")
    before = alice.to_bytes()
    with pytest.raises(HandshakeError):
        alice.decrypt(own)
    assert alice.to_bytes() == before


def test_session_bit_flips_are_typed() -> None:
    alice, bob = open_session("session-flip")
    accepted = PairwiseSession.accept(
        bob.key, alice.encrypt(b"one"), initiator=alice.local, prekeys=bob.lookup
    )
    message = alice.encrypt(b"two")
    before = accepted.session.to_bytes()
    for index in range(0, len(message), 7):
        flipped = bytearray(message)
        flipped[index] ^= 0x10
        with pytest.raises(ProtocolError):
            accepted.session.decrypt(bytes(flipped))
    assert accepted.session.to_bytes() == before
    assert accepted.session.decrypt(message) == b"two"


# --- an interaction fuzz, after libsignal's ------------------------------------------------------


class Conversation(RuleBasedStateMachine):
    """Random sends both ways, deliveries in any order, drops, duplicates and restarts.

    Invariant: every delivered message decrypts to what was sent, exactly once;
    a second delivery raises DuplicateMessage and changes nothing.
    """

    a_to_b = Bundle("a_to_b")
    b_to_a = Bundle("b_to_a")

    @initialize()
    def setup(self) -> None:
        self.store: dict[tuple[str, int], tuple[PreKey, PreKeyPrivate]] = dict(BOB.store)
        self.alice_key = MemberKeyPair.generate(Drbg("fuzz/alice"))
        self.alice = PairwiseSession.initiate(
            self.alice_key, bundle_of(BOB), BOB.key.public, rng=Drbg("fuzz/a"), now=NOW
        )
        self.bob: PairwiseSession | None = None
        self.counter = 0
        self.delivered: list[tuple[str, bytes, bytes]] = []
        self.restarts = 0

    def _lookup(self, kind: PreKeyKind, key_id: int) -> tuple[PreKey, PreKeyPrivate] | None:
        return self.store.get((kind, key_id))

    def _text(self, who: str) -> bytes:
        self.counter += 1
        return f"{who}#{self.counter}".encode() * (self.counter % 4 + 1)

    @rule(target=a_to_b)
    def alice_sends(self) -> tuple[bytes, bytes]:
        text = self._text("alice")
        return self.alice.encrypt(text), text

    @precondition(lambda self: self.bob is not None)
    @rule(target=b_to_a)
    def bob_sends(self) -> tuple[bytes, bytes]:
        assert self.bob is not None
        text = self._text("bob")
        return self.bob.encrypt(text), text

    @rule(item=consumes(a_to_b))
    def deliver_to_bob(self, item: tuple[bytes, bytes]) -> None:
        message, text = item
        if self.bob is None:
            accepted = PairwiseSession.accept(
                BOB.key,
                message,
                initiator=self.alice_key.public,
                prekeys=self._lookup,
                rng=Drbg(f"fuzz/b{self.restarts}"),
            )
            for used in accepted.consumed:
                del self.store[used]
            self.bob, got = accepted.session, accepted.plaintext
        else:
            got = self.bob.decrypt(message)
        assert got == text
        self.delivered.append(("bob", message, text))

    @rule(item=consumes(b_to_a))
    def deliver_to_alice(self, item: tuple[bytes, bytes]) -> None:
        message, text = item
        assert self.alice.decrypt(message) == text
        self.delivered.append(("alice", message, text))

    @rule(item=consumes(a_to_b))
    def drop_to_bob(self, item: tuple[bytes, bytes]) -> None:
        pass

    @rule(item=consumes(b_to_a))
    def drop_to_alice(self, item: tuple[bytes, bytes]) -> None:
        pass

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        who, message, _ = data.draw(st.sampled_from(self.delivered))
        session = self.alice if who == "alice" else self.bob
        assert session is not None
        before = session.to_bytes()
        with pytest.raises(DuplicateMessage):
            session.decrypt(message)
        assert session.to_bytes() == before

    @rule(who=st.sampled_from(["alice", "bob"]))
    def restart(self, who: str) -> None:
        self.restarts += 1
        rng = Drbg(f"fuzz/restart{self.restarts}")
        if who == "alice":
            self.alice = PairwiseSession.from_bytes(self.alice.to_bytes(), rng=rng)
        elif self.bob is not None:
            self.bob = PairwiseSession.from_bytes(self.bob.to_bytes(), rng=rng)

    @invariant()
    def bounded(self) -> None:
        for session in (self.alice, self.bob):
            if session is not None:
                assert session.ratchet.skipped_count <= 2000


Conversation.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestConversation = Conversation.TestCase
