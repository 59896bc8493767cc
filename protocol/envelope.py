"""Room envelopes: the wire format of a room message, and the epoch check.

Specification: docs/sections/rooms.md. A room message is one ciphertext for
the whole room, made with the sender's current sender key
(:mod:`.senderkey`). Its header names everything a receiver needs to pick the
key and to place the message: the room, the sender's member key, the sender
key generation, the message index within that generation, and the *epoch*,
the log position and head hash the sender had validated when it sent.

The header is the AEAD's associated data and, with the ciphertext, is signed
by the sender key's Ed25519 key. That signing key is ephemeral and was handed
out only over deniable pairwise sessions, so a leaked envelope proves nothing
about a member's long-term identity (DESIGN.md §1.6), while inside the room
every member can tell who sent what and that nobody altered it.

The relay never trusts, and never needs, anything in here: it stores the
bytes under its own sequence number. Receivers order and detect gaps by
``(generation, index)``, not by the relay's sequence numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from . import padding
from . import primitives as P
from .encoding import Reader, Value, decode, encode
from .errors import NotAuthorized
from .keys import signing_input
from .roomlog import HASH_SIZE, RoomLog

ENVELOPE_VERSION: Final = 1
CTX_ROOM_MESSAGE: Final = "room-message"
MAX_GENERATION: Final = (1 << 32) - 1
MAX_INDEX: Final = (1 << 32) - 1
MAX_EPOCH_POS: Final = (1 << 32) - 1
MAX_CIPHERTEXT_SIZE: Final = padding.MAX_BUCKET + P.AEAD_TAG_SIZE
#: Header fields plus the largest ciphertext, with room for CBOR framing.
MAX_ENVELOPE_SIZE: Final = MAX_CIPHERTEXT_SIZE + 512


class NotInEpoch(NotAuthorized):
    """The message was sent under an epoch that does not include the reader
    (from before it joined, or after it left): not an attack, not ours to read."""

    code = "not_in_epoch"


@dataclass(frozen=True, slots=True)
class RoomEnvelope:
    """One room message as it travels and is stored.

    ``sender`` is the Ed25519 half of the sender's member key; ``epoch_pos``
    and ``epoch_head`` are the log position and event hash the sender sent
    under.
    """

    room_id: bytes
    sender: bytes
    generation: int
    index: int
    epoch_pos: int
    epoch_head: bytes
    ciphertext: bytes
    signature: bytes = field(default=bytes(P.ED25519_SIGNATURE_SIZE), repr=False)

    @property
    def epoch(self) -> tuple[int, bytes]:
        return (self.epoch_pos, self.epoch_head)

    def header_value(self) -> dict[str, Value]:
        return {
            "ehead": self.epoch_head,
            "epos": self.epoch_pos,
            "from": self.sender,
            "gen": self.generation,
            "idx": self.index,
            "room": self.room_id,
            "v": ENVELOPE_VERSION,
        }

    def associated_data(self) -> bytes:
        """The AEAD associated data: the canonical header (everything but ``ct`` and ``sig``)."""
        return encode(self.header_value())

    def signed_bytes(self) -> bytes:
        """What the sender key signs: the header and the ciphertext, under a
        fixed signing context so the signature can never be mistaken for any
        other kind."""
        return envelope_signed_bytes(self.associated_data(), self.ciphertext)

    def to_bytes(self) -> bytes:
        value = self.header_value()
        value["ct"] = self.ciphertext
        value["sig"] = self.signature
        return encode(value)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> RoomEnvelope:
        """Strict decode; any malformed input raises a :class:`~.errors.DecodeError`."""
        r = Reader.of(decode(data, max_size=max_size), "room envelope")
        r.version(ENVELOPE_VERSION)
        envelope = cls(
            room_id=r.blob("room", HASH_SIZE),
            sender=r.blob("from", P.ED25519_PUBLIC_SIZE),
            generation=r.integer("gen", 0, MAX_GENERATION),
            index=r.integer("idx", 0, MAX_INDEX),
            epoch_pos=r.integer("epos", 0, MAX_EPOCH_POS),
            epoch_head=r.blob("ehead", HASH_SIZE),
            ciphertext=r.blob("ct", max_size=MAX_CIPHERTEXT_SIZE),
            signature=r.blob("sig", P.ED25519_SIGNATURE_SIZE),
        )
        r.done()
        return envelope


def envelope_signed_bytes(associated_data: bytes, ciphertext: bytes) -> bytes:
    """The sender-key signature's input for a header (as AD bytes) and ciphertext."""
    return signing_input(CTX_ROOM_MESSAGE, encode([associated_data, ciphertext]))


def check_epoch(log: RoomLog, envelope: RoomEnvelope, reader: bytes) -> Literal["ok", "ahead"]:
    """Decide whether ``reader`` (our member signing key) may believe ``envelope``.

    ``"ahead"``: the message names a log position we have not validated yet;
    fetch the log and ask again (do not decrypt yet). ``"ok"``: our log holds
    the same event at the message's epoch, the sender was a member allowed to
    post at that epoch, and so were we. Raises
    :class:`~.errors.ForkDetected` when the sender saw a different log at
    that position (the relay showed us two histories), and
    :class:`~.errors.NotAuthorized` when the sender was not a posting member,
    or the epoch does not include the reader (a message from before we
    joined, or after we were removed, is not ours to read).
    """
    if log.check_epoch(envelope.epoch_pos, envelope.epoch_head) == "ahead":
        return "ahead"
    state = log.state_at(envelope.epoch_pos)
    role = state.role_of(envelope.sender)
    if role is None:
        raise NotAuthorized("sender was not a member at the message's epoch")
    if role == "observer":
        raise NotAuthorized("observers do not post")
    if reader not in state.members:
        raise NotInEpoch("the message's epoch does not include us")
    return "ok"
