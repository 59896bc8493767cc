"""Short invite codes (bcinv2): format, typo detection, derivations, pins, old codes."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol import invite as I
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol import shortcode as S
from backchannel.protocol.errors import InvalidInvite, InviteCodeError
from backchannel.protocol.keys import MemberKeyPair
from tests.protocol.drbg import Drbg

T0 = 1_800_000_000
URL = "https://relay.example.org"

# The test vector of docs/sections/invite.md ("Short codes").
VECTOR_SECRET = bytes(range(16))
VECTOR_ROOM = bytes(range(32, 64))
VECTOR_FINGERPRINT = bytes(range(64, 96))
VECTOR_PIN = bytes.fromhex("6fbaab8773015e3f")
VECTOR_CODE = "bcinv2-40020-g30g2-gc1r8-1450p-30d1r-7pzen-bgxsg-2qhzr-c7g4q"
VECTOR_SEED = "0ab0f5cbc7ae80b07d79803128b8041d9e30f97bf882adf40a8e4eb9d4a1fa70"
VECTOR_PUBLIC = "fe974037deb15f9ebac48653dd3c2a11d1c7df397b422eecbd2805c64071124c"

secrets = st.binary(min_size=16, max_size=16)
pins = st.binary(min_size=8, max_size=8)
codes = st.builds(S.ShortCode, relay_url=st.just(URL), secret=secrets, pin=pins)


def sample() -> S.ShortCode:
    return S.ShortCode(relay_url=URL, secret=VECTOR_SECRET, pin=VECTOR_PIN)


def room(seed: str = "room") -> tuple[MemberKeyPair, L.RoomLog]:
    key = MemberKeyPair.generate(Drbg(seed))
    return key, L.validate_log([L.make_create(key, L.Rules(), T0)])


def test_vector() -> None:
    code = sample()
    assert code.code_text() == VECTOR_CODE
    assert code.to_text() == f"{URL} {VECTOR_CODE}"
    # Independently of primitives.py: BLAKE2b keyed by the secret, person padded to 16.
    person = b"bc-inv-seed".ljust(16, b"\0")
    expected = hashlib.blake2b(b"", key=VECTOR_SECRET, person=person, digest_size=32)
    assert code.invite_seed == expected.digest()
    assert code.invite_seed.hex() == VECTOR_SEED
    assert code.invite_public.hex() == VECTOR_PUBLIC
    assert S.room_pin(VECTOR_SECRET, VECTOR_ROOM, VECTOR_FINGERPRINT) == VECTOR_PIN
    person = b"bc-inv-pin".ljust(16, b"\0")
    pin = hashlib.blake2b(
        VECTOR_ROOM + VECTOR_FINGERPRINT, key=VECTOR_SECRET, person=person, digest_size=16
    )
    assert pin.digest()[:8] == VECTOR_PIN


@given(codes)
def test_round_trip(code: S.ShortCode) -> None:
    text = code.code_text()
    assert S.ShortCode.from_code(URL, text) == code
    assert S.ShortCode.from_code(URL, code.code_text(0).upper()) == code
    assert S.read_invite(code.to_text()) == code
    assert S.read_invite(code.to_qr_text()) == code
    assert S.read_invite(text, URL) == code


@given(codes)
def test_length_is_60_characters_besides_the_relay(code: S.ShortCode) -> None:
    text = code.code_text()
    assert len(text) == 60
    groups = text.split("-")
    assert groups[0] == "bcinv2"
    assert [len(g) for g in groups[1:]] == [5] * 9
    assert set("".join(groups[1:])) <= set(S.ALPHABET)
    assert not set("ilou") & set("".join(groups[1:]))
    assert code.to_text() == f"{URL} {text}"


def test_every_single_character_typo_is_caught() -> None:
    """Exhaustive: every position, every other symbol of the alphabet (BCH guarantee)."""
    body = list(sample().code_text(0)[len(S.PREFIX) :])
    tried = 0
    for i, original in enumerate(body):
        for symbol in S.ALPHABET:
            if symbol == original:
                continue
            typo = S.PREFIX + "".join([*body[:i], symbol, *body[i + 1 :]])
            with pytest.raises(InviteCodeError):
                S.ShortCode.from_code(URL, typo)
            tried += 1
    assert tried == 45 * 31


@given(codes, st.data())
def test_any_single_typo_and_any_swap_is_caught(code: S.ShortCode, data: st.DataObject) -> None:
    body = list(code.code_text(0)[len(S.PREFIX) :])
    i = data.draw(st.integers(0, len(body) - 1))
    typo = body.copy()
    typo[i] = data.draw(st.sampled_from([c for c in S.ALPHABET if c != body[i]]))
    with pytest.raises(InviteCodeError):
        S.ShortCode.from_code(URL, S.PREFIX + "".join(typo))
    j = data.draw(st.integers(0, len(body) - 2))
    if body[j] != body[j + 1]:
        swapped = body.copy()
        swapped[j], swapped[j + 1] = swapped[j + 1], swapped[j]
        with pytest.raises(InviteCodeError):
            S.ShortCode.from_code(URL, S.PREFIX + "".join(swapped))


def test_missing_or_extra_character_is_caught() -> None:
    text = sample().code_text(0)
    for i in range(len(S.PREFIX), len(text)):
        with pytest.raises(InviteCodeError):
            S.ShortCode.from_code(URL, text[:i] + text[i + 1 :])
        with pytest.raises(InviteCodeError):
            S.ShortCode.from_code(URL, text[:i] + "7" + text[i:])


def test_reading_is_lenient_about_case_spacing_and_look_alikes() -> None:
    code = sample()
    text = code.code_text()
    assert S.ShortCode.from_code(URL, text.upper()) == code
    assert S.ShortCode.from_code(URL, " ".join(text.replace("-", " "))) == code
    # Crockford: O reads as 0, I and L as 1.
    spoken = "bcinv2" + text[6:].replace("0", "O").replace("1", "l")
    assert S.ShortCode.from_code(URL, spoken) == code
    with pytest.raises(InviteCodeError, match="outside"):
        S.ShortCode.from_code(URL, "bcinv2" + "u" + text[8:])


def test_checksum_is_bip350_bech32m() -> None:
    """The polymod is the published code: BIP-350's valid bech32m strings pass."""
    alphabet = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    for valid in (
        "a1lqfn3a",
        "abcdef1l7aum6echk45nj3s0wdvt2fg8x9yrzpqzd3ryx",
        "split1checkupstagehandshakeupstreamerranterredcaperredlc445v",
    ):
        prefix, _, data = valid.rpartition("1")
        assert S.checksum_ok([alphabet.index(c) for c in data], prefix)
    data = [3, 1, 4, 1, 5]
    assert S.checksum_ok(data + S.checksum(data))
    assert not S.checksum_ok(data + S.checksum(data), "bcinv3")


def test_other_versions_and_sizes_are_refused() -> None:
    with pytest.raises(InviteCodeError, match="version"):
        S.ShortCode(URL, VECTOR_SECRET, VECTOR_PIN, version=2)
    with pytest.raises(InviteCodeError, match="16 bytes"):
        S.ShortCode(URL, bytes(15), VECTOR_PIN)
    with pytest.raises(InviteCodeError, match="8 bytes"):
        S.ShortCode(URL, VECTOR_SECRET, bytes(9))
    with pytest.raises(InviteCodeError):
        S.ShortCode("ftp://relay", VECTOR_SECRET, VECTOR_PIN)
    # A well-checksummed code with version bits 0 (and 7).
    for version in (0, 7):
        n = version << 192 | int.from_bytes(VECTOR_SECRET + VECTOR_PIN, "big")
        data = [n >> 5 * (38 - i) & 31 for i in range(39)]
        text = "bcinv2" + "".join(S.ALPHABET[v] for v in data + S.checksum(data))
        with pytest.raises(InviteCodeError, match="version"):
            S.ShortCode.from_code(URL, text)


@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_invite_code_error(text: str) -> None:
    for attempt in (text, "bcinv2" + text, f"{URL} bcinv2{text}", "bcinv1" + text):
        with contextlib.suppress(InviteCodeError):
            S.read_invite(attempt, URL)


@given(st.lists(st.sampled_from(S.ALPHABET), min_size=40, max_size=50))
def test_arbitrary_symbols_raise_only_invite_code_error(symbols: list[str]) -> None:
    with contextlib.suppress(InviteCodeError):
        S.read_invite("bcinv2" + "".join(symbols), URL)


def test_read_invite_needs_a_relay_and_keeps_old_codes() -> None:
    code = sample()
    with pytest.raises(InviteCodeError, match="relay's address"):
        S.read_invite(code.code_text())
    assert S.read_invite(f"  {URL}\n{code.code_text().upper()} ").relay_url == URL
    # The address in the text wins over the fallback.
    assert S.read_invite(code.to_text(), "https://other.example").relay_url == URL
    rng = Drbg("old")
    old = I.InviteCode(URL, rng(32), rng(32), rng(16))
    assert S.read_invite(old.to_text()) == old
    assert S.read_invite(old.to_qr_text(), "https://other.example") == old
    assert S.read_invite(f"{URL} {old.to_text()}") == old
    with pytest.raises(InviteCodeError, match="different relay"):
        S.read_invite(f"https://other.example {old.to_text()}")
    with pytest.raises(InviteCodeError):
        S.read_invite(old.to_text()[:-1] + ("a" if old.to_text()[-1] != "a" else "b"))
    with pytest.raises(InviteCodeError):
        S.read_invite(None)  # type: ignore[arg-type]
    with pytest.raises(InviteCodeError):
        S.read_invite("x" * 3000)


def test_repr_hides_the_secret() -> None:
    code = sample()
    assert VECTOR_SECRET.hex() not in repr(code)
    assert code.invite_seed.hex() not in repr(code)


def test_code_for_a_room_checks_against_its_log() -> None:
    fac, log = room()
    event, secret = S.make_invite(fac, log.state, "participant", T0 + 3600, 2, T0)
    log.append(event)
    code = S.ShortCode.for_room(URL, log.state, secret)
    assert (
        code.pin
        == P.kdf(secret, b"bc-inv-pin", log.state.room_id + log.state.creator.fingerprint(), 16)[:8]
    )
    invite = code.check_state(log.state)
    assert (invite.role, invite.uses_left, invite.creator) == ("participant", 2, fac.public.sign)
    assert L.decode_event(event).invite == code.invite_public  # type: ignore[union-attr]
    # The join it allows validates.
    log.append(L.make_join(MemberKeyPair.generate(), code.invite_seed, log.state, T0 + 1))


def test_look_alike_rooms_fail_the_pin() -> None:
    """A relay that knows the invite's public key copies it into rooms of its own."""
    fac, log = room()
    event, secret = S.make_invite(fac, log.state, "participant", T0 + 3600, 1, T0)
    log.append(event)
    code = S.ShortCode.for_room(URL, log.state, secret)
    seed = code.invite_seed

    def copy_into(creator: MemberKeyPair, rules: L.Rules) -> L.RoomState:
        fake = L.validate_log([L.make_create(creator, rules, T0)])
        data, _ = L.make_invite(
            creator, fake.state, "participant", T0 + 3600, 1, T0, rng=lambda _n: seed
        )
        fake.append(data)
        assert code.invite_public in fake.state.invites
        return fake.state

    # Another creator; and the very same creator in another room (a different room id).
    for state in (
        copy_into(MemberKeyPair.generate(), L.Rules()),
        copy_into(fac, L.Rules(retention=7200)),
    ):
        with pytest.raises(InvalidInvite, match="not the room"):
            code.check_state(state)
    # The right room, but a code whose pin is off in any one bit.
    for bit in range(64):
        pin = (int.from_bytes(code.pin, "big") ^ 1 << bit).to_bytes(8, "big")
        with pytest.raises(InvalidInvite):
            S.ShortCode(URL, secret, pin).check_state(log.state)
    # The right room, but no such invite (another secret, same pin by construction).
    other = S.ShortCode.for_room(URL, log.state, bytes(16))
    with pytest.raises(InvalidInvite, match="no such invite"):
        other.check_state(log.state)
