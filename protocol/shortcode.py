"""Short invite codes: a code a person can read aloud (docs/sections/invite.md, "Short codes").

The relay's address travels beside the code, not inside it::

    https://relay.example.org bcinv2-5xxxx-xxxxx-xxxxx-xxxxx-xxxxx-xxxxx-xxxxx-xxxxx-xxxxx

The code is 60 characters: the prefix ``bcinv2`` and 45 symbols of Crockford
base32 in groups of five. Its 39 data symbols hold a 3-bit version, a 128-bit
invite secret and a 64-bit *pin*; 6 more are a BCH checksum (the code of
BIP-173/350), which catches every error in up to four symbols, so any single
mistyped or misheard character, and any swap of two, is refused.

* The invite key's Ed25519 seed is derived from the secret (``bc-inv-seed``),
  so the secret is the whole bearer credential and the seed never travels.
* The pin is a MAC, keyed by the secret, of the full room id and the room
  creator's full fingerprint (``bc-inv-pin``). A relay without the secret
  cannot test a look-alike room against it offline; see the section for what
  64 bits buy against one that has it.
* The relay finds the room from the invite's public key (``GET
  /v1/invites/{key}/log``, signed by the invite key), so the code needs no
  room id of its own.

Reading ignores case, whitespace and dashes, and reads ``o`` as ``0`` and
``i``/``l`` as ``1`` (Crockford). :func:`read_invite` also accepts the old
``bcinv1`` codes of :mod:`.invite`. Every failure is :class:`~.errors.InviteCodeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from . import primitives as P
from . import roomlog as L
from .errors import InvalidInvite, InviteCodeError
from .invite import MAX_TEXT, InviteCode, check_relay_url
from .keys import MemberKeyPair

PREFIX: Final = "bcinv2"
SHORT_VERSION: Final = 1
SECRET_SIZE: Final = 16
PIN_SIZE: Final = 8
LABEL_SEED: Final = b"bc-inv-seed"
LABEL_PIN: Final = b"bc-inv-pin"
ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"
DATA_SYMBOLS: Final = 39  # 3 + 128 + 64 = 195 bits
CHECK_SYMBOLS: Final = 6
DEFAULT_GROUP: Final = 5
_PAYLOAD_BITS: Final = 8 * (SECRET_SIZE + PIN_SIZE)
# Crockford's reading rules: the letters people write for 0 and 1 mean 0 and 1.
_VALUES: Final = {c: i for i, c in enumerate(ALPHABET)} | {"o": 0, "i": 1, "l": 1}

# BIP-173's BCH generator and BIP-350's final constant: a checksum proven to
# catch every error in at most four symbols of a string this short.
_GEN: Final = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_BECH32M: Final = 0x2BC830A3


def _polymod(values: Sequence[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i, gen in enumerate(_GEN):
            if top >> i & 1:
                chk ^= gen
    return chk


def _prefix_values(prefix: str) -> list[int]:
    # BIP-173's expansion of the human-readable part, so the checksum covers the prefix.
    return [ord(c) >> 5 for c in prefix] + [0] + [ord(c) & 31 for c in prefix]


def checksum(data: Sequence[int], prefix: str = PREFIX) -> list[int]:
    """The 6 checksum symbols (values 0..31) for ``data`` symbols under ``prefix``."""
    mod = _polymod([*_prefix_values(prefix), *data, *[0] * CHECK_SYMBOLS]) ^ _BECH32M
    return [mod >> 5 * (CHECK_SYMBOLS - 1 - i) & 31 for i in range(CHECK_SYMBOLS)]


def checksum_ok(symbols: Sequence[int], prefix: str = PREFIX) -> bool:
    """True if the last 6 of ``symbols`` are the checksum of the ones before them."""
    return _polymod([*_prefix_values(prefix), *symbols]) == _BECH32M


def invite_seed(secret: bytes) -> bytes:
    """The invite key's Ed25519 seed: keyed BLAKE2b of nothing under the secret."""
    _check_secret(secret)
    return P.kdf(secret, LABEL_SEED, b"", P.ED25519_SEED_SIZE)


def room_pin(secret: bytes, room_id: bytes, creator_fingerprint: bytes) -> bytes:
    """The first 8 bytes of a 16-byte keyed BLAKE2b of ``room_id || fingerprint``."""
    _check_secret(secret)
    return P.kdf(secret, LABEL_PIN, room_id + creator_fingerprint, 16)[:PIN_SIZE]


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) != SECRET_SIZE:
        raise InviteCodeError(f"invite secret must be {SECRET_SIZE} bytes")


def make_invite(
    facilitator: MemberKeyPair,
    state: L.RoomState,
    role: L.Role,
    expires: int,
    uses: int,
    ts: int,
    rng: P.Rng = P.random_bytes,
) -> tuple[bytes, bytes]:
    """An ``invite`` event whose key comes from a fresh secret, and that secret."""
    secret = rng(SECRET_SIZE)
    seed = invite_seed(secret)
    event, _ = L.make_invite(facilitator, state, role, expires, uses, ts, rng=lambda _n: seed)
    return event, secret


@dataclass(frozen=True, slots=True)
class ShortCode:
    """A short invite code and the relay it is for."""

    relay_url: str
    secret: bytes = field(repr=False)
    pin: bytes
    version: int = SHORT_VERSION

    def __post_init__(self) -> None:
        check_relay_url(self.relay_url)
        if self.version != SHORT_VERSION:
            raise InviteCodeError("unsupported invite code version")
        _check_secret(self.secret)
        if not isinstance(self.pin, bytes) or len(self.pin) != PIN_SIZE:
            raise InviteCodeError(f"pin must be {PIN_SIZE} bytes")

    @classmethod
    def for_room(cls, relay_url: str, state: L.RoomState, secret: bytes) -> ShortCode:
        """The code for an invite made with :func:`make_invite` in ``state``'s room."""
        pin = room_pin(secret, state.room_id, state.creator.fingerprint())
        return cls(relay_url=relay_url, secret=secret, pin=pin)

    @property
    def invite_seed(self) -> bytes:
        return invite_seed(self.secret)

    @property
    def invite_public(self) -> bytes:
        return P.ed25519_public(self.invite_seed)

    def symbols(self) -> list[int]:
        """The 45 symbol values: 39 of data, most significant first, then the checksum."""
        n = self.version << _PAYLOAD_BITS | int.from_bytes(self.secret + self.pin, "big")
        data = [n >> 5 * (DATA_SYMBOLS - 1 - i) & 31 for i in range(DATA_SYMBOLS)]
        return data + checksum(data)

    def code_text(self, group: int = DEFAULT_GROUP) -> str:
        """``bcinv2-`` and the symbols, dashes every ``group`` of them (0: no dashes)."""
        body = "".join(ALPHABET[v] for v in self.symbols())
        if group <= 0:
            return PREFIX + body
        return "-".join([PREFIX, *(body[i : i + group] for i in range(0, len(body), group))])

    def to_text(self) -> str:
        """What the facilitator hands over: the relay URL, a space, the code."""
        return f"{self.relay_url} {self.code_text()}"

    def to_qr_text(self) -> str:
        return f"{self.relay_url} {self.code_text(0)}"

    @classmethod
    def from_code(cls, relay_url: str, text: str) -> ShortCode:
        """Read the code part (``bcinv2...``) for a relay given separately."""
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            raise InviteCodeError("not an invite code")
        compact = "".join(text.split()).replace("-", "").lower()
        if not compact.startswith(PREFIX):
            raise InviteCodeError("not a short invite code (it starts with bcinv2)")
        body = compact[len(PREFIX) :]
        values = [_VALUES.get(c, -1) for c in body]
        if -1 in values:
            raise InviteCodeError("invite code has a character outside 0-9 and a-z without u")
        if len(values) != DATA_SYMBOLS + CHECK_SYMBOLS:
            raise InviteCodeError(
                f"invite code has {len(values)} characters after bcinv2, not "
                f"{DATA_SYMBOLS + CHECK_SYMBOLS}; one is missing or extra?"
            )
        if not checksum_ok(values):
            raise InviteCodeError("invite code is mistyped (checksum does not match)")
        n = 0
        for value in values[:DATA_SYMBOLS]:
            n = n << 5 | value
        if n >> _PAYLOAD_BITS != SHORT_VERSION:
            raise InviteCodeError("unsupported invite code version")
        payload = (n & ((1 << _PAYLOAD_BITS) - 1)).to_bytes(SECRET_SIZE + PIN_SIZE, "big")
        return cls(relay_url=relay_url, secret=payload[:SECRET_SIZE], pin=payload[SECRET_SIZE:])

    def check_state(self, state: L.RoomState) -> L.Invite:
        """Check that a validated room state is the room this code names.

        The pin covers the whole room id (which pins the ``create`` event and
        so its author) and the creator's whole fingerprint. Returns the
        invite's record for the joiner to preview.
        """
        pin = room_pin(self.secret, state.room_id, state.creator.fingerprint())
        if not P.ct_equal(pin, self.pin):
            raise InvalidInvite("the log is not the room (or creator) the invite code names")
        invite = state.invites.get(self.invite_public)
        if invite is None:
            raise InvalidInvite("the room's log has no such invite")
        return invite

    def __repr__(self) -> str:
        return f"ShortCode(relay_url={self.relay_url!r}, pin={self.pin.hex()})"


AnyCode = InviteCode | ShortCode


def read_invite(text: str, relay_url: str | None = None) -> AnyCode:
    """Read what a joiner was handed: ``URL bcinv2-...``, or an old ``bcinv1-...``
    code (which carries its own URL). ``relay_url`` is used only when the text
    names no relay."""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise InviteCodeError("not an invite code")
    words = text.split()
    given = None
    if words and "://" in words[0]:
        given, words = words[0], words[1:]
    code = "".join(words)
    if code.replace("-", "").lower().startswith("bcinv1"):
        old = InviteCode.from_text(code)
        if given is not None and given != old.relay_url:
            raise InviteCodeError("the code names a different relay than the address given")
        return old
    url = given or relay_url
    if url is None:
        raise InviteCodeError(
            "a bcinv2 code needs the relay's address before it: 'https://relay... bcinv2-...'"
        )
    return ShortCode.from_code(url, code)
