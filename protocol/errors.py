"""One exception hierarchy for the whole protocol package.

Every error derives from :class:`ProtocolError` and carries a stable ``code``
string, so that the relay and the client can map failures to wire errors and
user messages in one place without matching on class names or message text.

Cryptographic failures are deliberately coarse (in the spirit of Fernet's
single ``InvalidToken``): a peer learns nothing from *which* check failed.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised by ``backchannel.protocol``."""

    code: str = "protocol_error"


# --- encoding -----------------------------------------------------------------


class DecodeError(ProtocolError):
    """Bytes or a structure that do not follow the canonical encoding or schema."""

    code = "malformed"


class UnsupportedVersion(DecodeError):
    """A structure carries a version this implementation does not speak."""

    code = "unsupported_version"


class FieldTooLong(DecodeError):
    """A field (or a whole input) exceeds its documented maximum length."""

    code = "too_long"


# --- cryptography ---------------------------------------------------------------


class CryptoError(ProtocolError):
    """A cryptographic check failed."""

    code = "crypto"


class BadSignature(CryptoError):
    """An Ed25519 signature did not verify."""

    code = "bad_signature"


class DecryptionFailed(CryptoError):
    """An AEAD open failed: wrong key, altered ciphertext or altered associated data."""

    code = "decryption_failed"


class InvalidKey(CryptoError):
    """A public key is malformed or degenerate (e.g. an X25519 low-order point)."""

    code = "invalid_key"


# --- sessions ---------------------------------------------------------------------


class HandshakeError(ProtocolError):
    """A session set-up message or prekey bundle is unusable."""

    code = "handshake"


class TooManySkipped(ProtocolError):
    """A message would require storing more skipped message keys than allowed."""

    code = "too_many_skipped"


class DuplicateMessage(ProtocolError):
    """A message whose key was already used (a replay or a duplicate delivery)."""

    code = "duplicate"


class StaleSenderKey(ProtocolError):
    """A room message made under a sender key that a rotation has retired."""

    code = "stale_sender_key"


class UnknownSenderKey(ProtocolError):
    """A room message under a sender key (room, owner, generation) we do not hold."""

    code = "unknown_sender_key"


# --- room log -------------------------------------------------------------------


class LogError(ProtocolError):
    """A room log event or chain is invalid."""

    code = "invalid_log"


class ChainBroken(LogError):
    """An event does not name the hash of its predecessor, or sits at the wrong position."""

    code = "chain_broken"


class NotAuthorized(LogError):
    """An event's author is not allowed to perform it in the current room state."""

    code = "not_authorized"


class InvalidInvite(LogError):
    """A join names an invite that is unknown, expired or used up."""

    code = "invalid_invite"


class MembershipError(LogError):
    """A join or removal that contradicts the current membership."""

    code = "membership"


class ForkDetected(LogError):
    """Two views of one room's log disagree at the same position."""

    code = "fork"


# --- invite codes -----------------------------------------------------------------


class InviteCodeError(DecodeError):
    """An invite code that is mistyped (bad checksum) or malformed."""

    code = "invalid_invite_code"
