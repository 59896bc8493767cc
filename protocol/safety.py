"""Safety numbers: a short decimal string two members compare to check each
other's member keys (``backchannel verify``; docs/sections/safety.md).

Derivation, per side, for a member key ``(sign, dh)`` and an optional room id::

    input = encode(["bc-safety", 1, room_id or b"", sign, dh])    # canonical CBOR
    h     = BLAKE2b-512(input, person="bc-safety")
    repeat ITERATIONS - 1 times:  h = BLAKE2b-512(h || input, person="bc-safety")
    side  = for i in 0..5: decimal(int_be(h[5i : 5i+5]) mod 100000, 5 digits)

The two 30-digit sides are sorted as strings and concatenated: 60 digits,
the same on both devices whatever the argument order, shown as 12 groups of 5.
Iterating costs an attacker who grinds keys for a look-alike number about
2^10 more work per try, as Signal's numeric fingerprints do; 30 digits per
side (~99 bits) is already beyond reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from . import primitives as P
from .encoding import check_bytes, encode
from .errors import DecodeError
from .keys import MemberPublicKey

SAFETY_VERSION: Final = 1
LABEL: Final = b"bc-safety"
ITERATIONS: Final = 1024
DIGITS_PER_SIDE: Final = 30
GROUP: Final = 5
ROOM_ID_SIZE: Final = 32


def side_digits(key: MemberPublicKey, room_id: bytes | None = None) -> str:
    """The 30 digits one member key contributes."""
    if room_id is not None:
        check_bytes(room_id, "room id", size=ROOM_ID_SIZE)
    data = encode(["bc-safety", SAFETY_VERSION, room_id or b"", key.sign, key.dh])
    digest = P.hash_bytes(LABEL, data, 64)
    for _ in range(ITERATIONS - 1):
        digest = P.hash_bytes(LABEL, digest + data, 64)
    chunks = (int.from_bytes(digest[i : i + 5], "big") % 100_000 for i in range(0, 30, 5))
    return "".join(f"{chunk:05d}" for chunk in chunks)


@dataclass(frozen=True, slots=True)
class SafetyNumber:
    """60 decimal digits; compare by reading aloud or with :meth:`matches`."""

    digits: str

    def __post_init__(self) -> None:
        if len(self.digits) != 2 * DIGITS_PER_SIDE or not self.digits.isascii():
            raise DecodeError("a safety number has 60 digits")
        if not self.digits.isdigit():
            raise DecodeError("a safety number has only digits")

    def groups(self) -> list[str]:
        return [self.digits[i : i + GROUP] for i in range(0, len(self.digits), GROUP)]

    def text(self) -> str:
        """``12345 67890 ...``: 12 groups of 5 on one line."""
        return " ".join(self.groups())

    def lines(self, per_line: int = 4) -> list[str]:
        """Groups laid out ``per_line`` to a line (3 lines of 4 by default)."""
        groups = self.groups()
        return [" ".join(groups[i : i + per_line]) for i in range(0, len(groups), per_line)]

    def matches(self, typed: str) -> bool:
        """Whether ``typed`` (spaces, dashes and line breaks ignored) is this number."""
        compact = "".join(c for c in typed if c not in " -\t\r\n")
        return P.ct_equal(compact.encode("utf-8"), self.digits.encode("ascii"))

    def __str__(self) -> str:
        return self.text()


def safety_number(
    a: MemberPublicKey, b: MemberPublicKey, *, room_id: bytes | None = None
) -> SafetyNumber:
    """The pair's safety number; ``safety_number(a, b) == safety_number(b, a)``.

    With ``room_id`` the number is also bound to one room (member keys are per
    room already, so this mainly stops a number being reused as evidence
    about another room).
    """
    sides = sorted((side_digits(a, room_id), side_digits(b, room_id)))
    return SafetyNumber("".join(sides))
