"""Long invite codes (``bcinv1``): what a facilitator handed a joiner out of band
(DESIGN.md §3 "Invites") before the short codes of :mod:`.shortcode`, which new
invites use; clients still read these (:func:`.shortcode.read_invite`).

A code carries the relay URL, the room id, the invite key's private seed and
the first 16 bytes of the room creator's fingerprint, so the joiner can check
that the log the relay serves really is the room the facilitator meant
(docs/sections/invite.md).

Text form::

    bcinv1-xxxxx-xxxxx-...-xxx

``bcinv1`` is a fixed prefix (it ends in ``1``, which the base32 alphabet
lacks, so prefix and data never blur; it is deliberately unlike Bitcoin's
``bc1`` addresses). The rest is RFC 4648 base32, lowercase, unpadded, of the
canonical CBOR payload followed by a 4-byte checksum. Reading ignores case,
whitespace and dashes; a mistyped character fails the checksum and raises
:class:`~.errors.InviteCodeError`. The upper-case form without dashes
(:meth:`InviteCode.to_qr_text`) uses only QR alphanumeric characters.

The code is a bearer secret: whoever holds it may join (up to the invite's use
limit). ``repr`` never shows the seed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from . import primitives as P
from .encoding import Reader, decode, encode
from .errors import InvalidInvite, InviteCodeError, ProtocolError
from .roomlog import HASH_SIZE, Invite, RoomState

CODE_VERSION: Final = 1
PREFIX: Final = "bcinv1"
LABEL_CHECKSUM: Final = b"bc-inv-check"
CHECKSUM_SIZE: Final = 4
FACILITATOR_FP_SIZE: Final = 16
MAX_URL_BYTES: Final = 200
URL_SCHEMES: Final = ("http", "https", "ws", "wss")
DEFAULT_GROUP: Final = 5
#: Longest text accepted before any parsing (a code is about 300 characters).
MAX_TEXT: Final = 2_000
_MAX_PAYLOAD: Final = 512
_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def check_relay_url(url: str) -> str:
    """Accept only a plain ``http(s)``/``ws(s)`` URL of at most 200 bytes.

    No credentials (they would travel inside every code), no query or
    fragment, printable ASCII only (internationalised hosts in punycode), so
    the URL a joiner sees is the URL the client connects to.
    """
    if not isinstance(url, str):
        raise InviteCodeError("relay URL must be text")
    if not url or len(url.encode("utf-8")) > MAX_URL_BYTES:
        raise InviteCodeError(f"relay URL must be 1..{MAX_URL_BYTES} bytes")
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise InviteCodeError("relay URL must be printable ASCII without spaces")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError as exc:
        raise InviteCodeError("relay URL does not parse") from exc
    if parts.scheme not in URL_SCHEMES or not url.startswith(parts.scheme + "://"):
        # Lower case only: one spelling per URL, and no scheme-relative forms.
        raise InviteCodeError("relay URL must start with http://, https://, ws:// or wss://")
    if not parts.hostname or "@" in parts.netloc:
        raise InviteCodeError("relay URL needs a host and no user name or password")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise InviteCodeError("relay URL must have no query or fragment")
    return url


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _checksum(payload: bytes) -> bytes:
    return P.hash_bytes(LABEL_CHECKSUM, payload, 16)[:CHECKSUM_SIZE]


@dataclass(frozen=True, slots=True)
class InviteCode:
    """Everything a joiner needs, in one pasteable string."""

    relay_url: str
    room_id: bytes
    invite_seed: bytes = field(repr=False)
    facilitator: bytes
    version: int = CODE_VERSION

    def __post_init__(self) -> None:
        check_relay_url(self.relay_url)
        if self.version != CODE_VERSION:
            raise InviteCodeError("unsupported invite code version")
        for value, size, what in (
            (self.room_id, HASH_SIZE, "room id"),
            (self.invite_seed, P.ED25519_SEED_SIZE, "invite seed"),
            (self.facilitator, FACILITATOR_FP_SIZE, "facilitator fingerprint"),
        ):
            if not isinstance(value, bytes) or len(value) != size:
                raise InviteCodeError(f"{what} must be {size} bytes")

    @classmethod
    def for_room(cls, relay_url: str, state: RoomState, invite_seed: bytes) -> InviteCode:
        """The code for an invite made (with :func:`~.roomlog.make_invite`) in ``state``'s room."""
        return cls(
            relay_url=relay_url,
            room_id=state.room_id,
            invite_seed=invite_seed,
            facilitator=state.creator.fingerprint()[:FACILITATOR_FP_SIZE],
        )

    @property
    def invite_public(self) -> bytes:
        return P.ed25519_public(self.invite_seed)

    def payload(self) -> bytes:
        return encode(
            {
                "f": self.facilitator,
                "k": self.invite_seed,
                "r": self.room_id,
                "u": self.relay_url,
                "v": self.version,
            }
        )

    def to_text(self, group: int = DEFAULT_GROUP) -> str:
        """``bcinv1-`` and the base32 body, dashes every ``group`` characters (0: none)."""
        payload = self.payload()
        body = _b32(payload + _checksum(payload))
        if group <= 0:
            return PREFIX + body
        return "-".join([PREFIX, *(body[i : i + group] for i in range(0, len(body), group))])

    def to_qr_text(self) -> str:
        """Upper case and no dashes: QR alphanumeric mode, the densest for this text."""
        return self.to_text(group=0).upper()

    @classmethod
    def from_text(cls, text: str) -> InviteCode:
        """Parse a code, ignoring case, whitespace and dashes.

        Raises :class:`~.errors.InviteCodeError` for anything else, including
        a single mistyped character (checksum).
        """
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            raise InviteCodeError("not an invite code")
        compact = "".join(text.split()).replace("-", "").lower()
        if not compact.startswith(PREFIX):
            raise InviteCodeError("not a backchannel invite code (it starts with bcinv1)")
        body = compact[len(PREFIX) :]
        if not body or not set(body) <= _ALPHABET:
            raise InviteCodeError("invite code has a character outside a-z and 2-7")
        try:
            raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        except ValueError as exc:  # binascii.Error: a length no encoder makes
            raise InviteCodeError(
                "invite code has the wrong length; a character is missing?"
            ) from exc
        if _b32(raw) != body or len(raw) <= CHECKSUM_SIZE:
            raise InviteCodeError("invite code is mistyped")
        payload, check = raw[:-CHECKSUM_SIZE], raw[-CHECKSUM_SIZE:]
        if not P.ct_equal(_checksum(payload), check):
            raise InviteCodeError("invite code is mistyped (checksum does not match)")
        try:
            r = Reader.of(decode(payload, max_size=_MAX_PAYLOAD), "invite code")
            r.version(CODE_VERSION)
            code = cls(
                relay_url=r.text("u", MAX_URL_BYTES),
                room_id=r.blob("r", HASH_SIZE),
                invite_seed=r.blob("k", P.ED25519_SEED_SIZE),
                facilitator=r.blob("f", FACILITATOR_FP_SIZE),
            )
            r.done()
        except InviteCodeError:
            raise
        except ProtocolError as exc:
            raise InviteCodeError(f"malformed invite code: {exc}") from exc
        return code

    def check_state(self, state: RoomState) -> Invite:
        """Check that a validated room state is the room this code names.

        The room id pins the ``create`` event and the facilitator fingerprint
        pins its author, so a relay cannot serve a look-alike room. Returns the
        invite's record (role, expiry, uses left) for the joiner to preview.
        """
        if not P.ct_equal(state.room_id, self.room_id):
            raise InvalidInvite("the log is for a different room than the invite code")
        creator = state.creator.fingerprint()[:FACILITATOR_FP_SIZE]
        if not P.ct_equal(creator, self.facilitator):
            raise InvalidInvite("the room's creator is not the facilitator named in the code")
        invite = state.invites.get(self.invite_public)
        if invite is None:
            raise InvalidInvite("the room's log has no such invite")
        return invite

    def __repr__(self) -> str:
        return (
            f"InviteCode(relay_url={self.relay_url!r}, room={self.room_id.hex()[:16]}, "
            f"facilitator={self.facilitator.hex()})"
        )
