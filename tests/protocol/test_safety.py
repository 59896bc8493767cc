"""Safety numbers: symmetric, distinct for distinct keys, readable."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol import safety as S
from backchannel.protocol.errors import DecodeError
from backchannel.protocol.keys import MemberKeyPair, MemberPublicKey
from tests.protocol.drbg import Drbg

keys = st.builds(
    MemberPublicKey,
    sign=st.binary(min_size=32, max_size=32),
    dh=st.binary(min_size=32, max_size=32),
)
ALICE = MemberKeyPair.generate(Drbg("safety-alice")).public
BOB = MemberKeyPair.generate(Drbg("safety-bob")).public
ROOM = Drbg("safety-room")(32)


@given(keys, keys)
def test_symmetric(a: MemberPublicKey, b: MemberPublicKey) -> None:
    assert S.safety_number(a, b) == S.safety_number(b, a)


@given(keys, keys, st.integers(0, 63), st.booleans())
def test_any_key_change_changes_the_number(
    a: MemberPublicKey, b: MemberPublicKey, bit: int, in_sign: bool
) -> None:
    flip = bytearray(b.sign if in_sign else b.dh)
    flip[bit // 8] ^= 1 << (bit % 8)
    changed = (
        MemberPublicKey(sign=bytes(flip), dh=b.dh)
        if in_sign
        else MemberPublicKey(sign=b.sign, dh=bytes(flip))
    )
    assert S.safety_number(a, b) != S.safety_number(a, changed)
    # Only the changed side's half moves; the other half still matches.
    assert S.side_digits(a) in S.safety_number(a, changed).digits


def test_format() -> None:
    number = S.safety_number(ALICE, BOB)
    assert len(number.digits) == 60
    assert number.digits.isdigit()
    groups = number.groups()
    assert len(groups) == 12
    assert all(len(g) == 5 for g in groups)
    assert number.text() == " ".join(groups) == str(number)
    lines = number.lines()
    assert len(lines) == 3
    assert all(len(line.split()) == 4 for line in lines)
    halves = sorted([S.side_digits(ALICE), S.side_digits(BOB)])
    assert number.digits == halves[0] + halves[1]


def test_matches_is_tolerant_of_layout_only() -> None:
    number = S.safety_number(ALICE, BOB)
    assert number.matches(number.text())
    assert number.matches("\n".join(number.lines()))
    assert number.matches(number.digits)
    wrong = number.digits[:-1] + str((int(number.digits[-1]) + 1) % 10)
    assert not number.matches(wrong)
    assert not number.matches(number.digits[:-1])
    assert not number.matches("")


def test_room_scoped_numbers() -> None:
    plain = S.safety_number(ALICE, BOB)
    scoped = S.safety_number(ALICE, BOB, room_id=ROOM)
    assert scoped == S.safety_number(BOB, ALICE, room_id=ROOM)
    assert scoped != plain
    assert scoped != S.safety_number(ALICE, BOB, room_id=Drbg("other-room")(32))
    with pytest.raises(DecodeError):
        S.safety_number(ALICE, BOB, room_id=b"short")


def test_same_key_on_both_sides() -> None:
    number = S.safety_number(ALICE, ALICE)
    assert number.digits[:30] == number.digits[30:]


@pytest.mark.parametrize("digits", ["", "1" * 59, "1" * 61, "a" * 60, "\u0661" * 60])
def test_safety_number_value_is_checked(digits: str) -> None:
    with pytest.raises(DecodeError):
        S.SafetyNumber(digits)
