"""Sender keys: one ciphertext per room message, whatever the room's size.

Specification: docs/sections/rooms.md. Each member of a room holds, per
*generation*, an outbound sender key: a symmetric chain key and a fresh
Ed25519 signing key. It hands the chain key at its current index and the
signing public key to every other member over their pairwise sessions
(:class:`SenderKeyDistribution`), then encrypts each room message once:

* ``KDF_CK(ck)``: ``out = BLAKE2b(key=ck, label="bc-sk-chain", "", 64)``; the
  next chain key is ``out[:32]``, the message key ``out[32:]``;
* ``BLAKE2b(key=mk, label="bc-sk-msg", "", 56)`` gives the XChaCha20-Poly1305
  key and nonce; each message key seals exactly one message;
* the envelope (:mod:`.envelope`) is signed with the generation's signing key.

The chain only moves forward, so a member that learns the chain key at index
``i`` can read nothing sent before ``i`` (no history for joiners). Whenever
anyone leaves or is removed, every remaining member starts a new generation
and distributes it pairwise; receivers then *retire* the old generation at the
removal's log position, so a message under the old key that names a later
epoch is refused (:class:`~.errors.StaleSenderKey`) and the removed member,
who only ever had old generations, reads nothing sent afterwards.

As in :mod:`.ratchet`, a receive works on a copy and commits only on success:
a forged, altered, replayed or out-of-bounds message changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from . import padding
from . import primitives as P
from .encoding import Reader, Value, check_bytes, decode, encode
from .envelope import MAX_GENERATION, MAX_INDEX, RoomEnvelope, envelope_signed_bytes
from .errors import (
    DecodeError,
    DuplicateMessage,
    ProtocolError,
    StaleSenderKey,
    TooManySkipped,
    UnknownSenderKey,
)
from .roomlog import HASH_SIZE

SENDER_KEY_VERSION: Final = 1
KEY_SIZE: Final = 32
#: Most message keys one message may make a receiver skip (and store).
DEFAULT_MAX_SKIP: Final = 2000
#: Most skipped message keys one inbound sender key keeps; the oldest go first.
DEFAULT_MAX_STORED: Final = 2000
MAX_STORED_LIMIT: Final = 100_000
MAX_POS: Final = (1 << 32) - 1

_LABEL_CHAIN: Final = b"bc-sk-chain"
_LABEL_MSG: Final = b"bc-sk-msg"
_MAX_STATE_SIZE: Final = 1024 + MAX_STORED_LIMIT * 48


def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    """``(next chain key, message key)``."""
    out = P.kdf(ck, _LABEL_CHAIN, b"", 2 * KEY_SIZE)
    return out[:KEY_SIZE], out[KEY_SIZE:]


def message_aead_key(mk: bytes) -> tuple[bytes, bytes]:
    out = P.kdf(mk, _LABEL_MSG, b"", P.AEAD_KEY_SIZE + P.AEAD_NONCE_SIZE)
    return out[: P.AEAD_KEY_SIZE], out[P.AEAD_KEY_SIZE :]


# --- distribution ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SenderKeyDistribution:
    """What one member sends each other member, inside a pairwise session.

    It is deliberately *not* signed by the owner's member key: the pairwise
    session already authenticates it (deniably), and a signature here would
    bind the member key to the signing key of every message it later sends.

    ``since`` is the log position the generation was made at; messages under
    it must name that epoch or a later one. ``prev_count`` is how many
    messages the owner sent under the previous generation, so that a receiver
    can tell a dropped tail of the old generation from silence.
    """

    room_id: bytes
    owner: bytes
    generation: int
    index: int
    chain_key: bytes = field(repr=False)
    signing_public: bytes
    since: int
    prev_count: int

    def to_bytes(self) -> bytes:
        return encode(
            {
                "ck": self.chain_key,
                "gen": self.generation,
                "idx": self.index,
                "owner": self.owner,
                "prev": self.prev_count,
                "room": self.room_id,
                "since": self.since,
                "spk": self.signing_public,
                "v": SENDER_KEY_VERSION,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SenderKeyDistribution:
        r = Reader.of(decode(data, max_size=512), "sender key distribution")
        r.version(SENDER_KEY_VERSION)
        out = cls(
            chain_key=r.blob("ck", KEY_SIZE),
            generation=r.integer("gen", 0, MAX_GENERATION),
            index=r.integer("idx", 0, MAX_INDEX),
            owner=r.blob("owner", P.ED25519_PUBLIC_SIZE),
            prev_count=r.integer("prev", 0, MAX_INDEX + 1),
            room_id=r.blob("room", HASH_SIZE),
            since=r.integer("since", 0, MAX_POS),
            signing_public=r.blob("spk", P.ED25519_PUBLIC_SIZE),
        )
        r.done()
        return out


# --- outbound ------------------------------------------------------------------------------


class OutboundSenderKey:
    """Our own sender key for one room and generation.

    Persist :meth:`to_bytes` in the same transaction as the message that
    :meth:`seal` produced: reloading an older state would reuse a message key.
    """

    __slots__ = (
        "_chain_key",
        "_expanded",
        "_generation",
        "_index",
        "_owner",
        "_prev_count",
        "_room_id",
        "_sign_seed",
        "_signing_public",
        "_since",
    )

    def __init__(
        self,
        *,
        room_id: bytes,
        owner: bytes,
        generation: int,
        index: int,
        chain_key: bytes,
        sign_seed: bytes,
        since: int,
        prev_count: int,
    ) -> None:
        check_bytes(room_id, "room id", size=HASH_SIZE)
        check_bytes(owner, "owner", size=P.ED25519_PUBLIC_SIZE)
        check_bytes(chain_key, "chain key", size=KEY_SIZE)
        check_bytes(sign_seed, "signing seed", size=P.ED25519_SEED_SIZE)
        if not 0 <= generation <= MAX_GENERATION or not 0 <= since <= MAX_POS:
            raise DecodeError("sender key: generation or position out of range")
        self._room_id = room_id
        self._owner = owner
        self._generation = generation
        self._index = index
        self._chain_key = chain_key
        self._sign_seed = sign_seed
        self._since = since
        self._prev_count = prev_count
        self._signing_public = P.ed25519_public(sign_seed)
        self._expanded: bytes | None = None

    @classmethod
    def generate(
        cls,
        room_id: bytes,
        owner: bytes,
        *,
        since: int,
        previous: OutboundSenderKey | None = None,
        rng: P.Rng = P.random_bytes,
    ) -> OutboundSenderKey:
        """A fresh generation: after ``previous`` (rotation) or the first one (generation 0)."""
        generation = 0 if previous is None else previous.generation + 1
        if generation > MAX_GENERATION:
            raise ProtocolError("sender key generations exhausted")
        return cls(
            room_id=room_id,
            owner=owner,
            generation=generation,
            index=0,
            chain_key=rng(KEY_SIZE),
            sign_seed=rng(P.ED25519_SEED_SIZE),
            since=since,
            prev_count=0 if previous is None else previous.index,
        )

    @property
    def room_id(self) -> bytes:
        return self._room_id

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def index(self) -> int:
        """Index of the next message; also how many were sent under this generation."""
        return self._index

    @property
    def since(self) -> int:
        return self._since

    def distribution(self) -> SenderKeyDistribution:
        """The chain at its *current* index: the recipient reads from the next message on."""
        return SenderKeyDistribution(
            room_id=self._room_id,
            owner=self._owner,
            generation=self._generation,
            index=self._index,
            chain_key=self._chain_key,
            signing_public=self._signing_public,
            since=self._since,
            prev_count=self._prev_count,
        )

    def seal(self, plaintext: bytes, epoch: tuple[int, bytes]) -> bytes:
        """Encrypt and sign one room message under ``epoch`` (our validated log head);
        returns the :class:`~.envelope.RoomEnvelope` bytes and advances the chain."""
        pos, head = epoch
        check_bytes(head, "epoch head", size=HASH_SIZE)
        if pos < self._since:
            raise StaleSenderKey("this sender key was made after that epoch")
        if self._index > MAX_INDEX:
            raise ProtocolError("sender key chain exhausted; rotate")
        chain_key, mk = kdf_ck(self._chain_key)
        unsigned = RoomEnvelope(
            room_id=self._room_id,
            sender=self._owner,
            generation=self._generation,
            index=self._index,
            epoch_pos=pos,
            epoch_head=head,
            ciphertext=b"",
        )
        ad = unsigned.associated_data()
        key, nonce = message_aead_key(mk)
        ciphertext = P.aead_encrypt(key, nonce, padding.pad(plaintext), ad)
        if self._expanded is None:
            self._expanded = P.ed25519_expand(self._sign_seed)
        signature = P.ed25519_sign_expanded(self._expanded, envelope_signed_bytes(ad, ciphertext))
        self._chain_key = chain_key
        self._index += 1
        return RoomEnvelope(
            room_id=self._room_id,
            sender=self._owner,
            generation=self._generation,
            index=unsigned.index,
            epoch_pos=pos,
            epoch_head=head,
            ciphertext=ciphertext,
            signature=signature,
        ).to_bytes()

    def to_bytes(self) -> bytes:
        return encode(
            {
                "ck": self._chain_key,
                "gen": self._generation,
                "idx": self._index,
                "owner": self._owner,
                "prev": self._prev_count,
                "room": self._room_id,
                "seed": self._sign_seed,
                "since": self._since,
                "v": SENDER_KEY_VERSION,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> OutboundSenderKey:
        r = Reader.of(decode(data, max_size=512), "outbound sender key")
        r.version(SENDER_KEY_VERSION)
        out = cls(
            chain_key=r.blob("ck", KEY_SIZE),
            generation=r.integer("gen", 0, MAX_GENERATION),
            index=r.integer("idx", 0, MAX_INDEX + 1),
            owner=r.blob("owner", P.ED25519_PUBLIC_SIZE),
            prev_count=r.integer("prev", 0, MAX_INDEX + 1),
            room_id=r.blob("room", HASH_SIZE),
            sign_seed=r.blob("seed", P.ED25519_SEED_SIZE),
            since=r.integer("since", 0, MAX_POS),
        )
        r.done()
        return out

    def __repr__(self) -> str:
        return f"OutboundSenderKey(gen={self._generation}, index={self._index})"


# --- inbound -------------------------------------------------------------------------------


class InboundSenderKey:
    """Another member's sender key for one room and generation, as we received it."""

    __slots__ = (
        "_chain_key",
        "_generation",
        "_index",
        "_max_skip",
        "_max_stored",
        "_owner",
        "_prev_count",
        "_retired_at",
        "_room_id",
        "_signing_public",
        "_since",
        "_skipped",
    )

    def __init__(
        self,
        *,
        room_id: bytes,
        owner: bytes,
        generation: int,
        index: int,
        chain_key: bytes,
        signing_public: bytes,
        since: int,
        prev_count: int,
        retired_at: int | None = None,
        skipped: dict[int, bytes] | None = None,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_stored: int = DEFAULT_MAX_STORED,
    ) -> None:
        if not 1 <= max_skip <= max_stored <= MAX_STORED_LIMIT:
            raise ValueError("need 1 <= max_skip <= max_stored <= MAX_STORED_LIMIT")
        self._room_id = room_id
        self._owner = owner
        self._generation = generation
        self._index = index
        self._chain_key = chain_key
        self._signing_public = signing_public
        self._since = since
        self._prev_count = prev_count
        self._retired_at = retired_at
        self._skipped: dict[int, bytes] = dict(skipped or {})
        self._max_skip = max_skip
        self._max_stored = max_stored

    @classmethod
    def from_distribution(
        cls,
        dist: SenderKeyDistribution,
        *,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_stored: int = DEFAULT_MAX_STORED,
    ) -> InboundSenderKey:
        return cls(
            room_id=dist.room_id,
            owner=dist.owner,
            generation=dist.generation,
            index=dist.index,
            chain_key=dist.chain_key,
            signing_public=dist.signing_public,
            since=dist.since,
            prev_count=dist.prev_count,
            max_skip=max_skip,
            max_stored=max_stored,
        )

    @property
    def owner(self) -> bytes:
        return self._owner

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def index(self) -> int:
        """One past the highest index received (or the distribution's start)."""
        return self._index

    @property
    def since(self) -> int:
        return self._since

    @property
    def prev_count(self) -> int:
        return self._prev_count

    @property
    def retired_at(self) -> int | None:
        return self._retired_at

    def missing(self) -> list[int]:
        """Indices below :attr:`index` that never arrived (still decryptable
        while kept): the gaps a user should be told about."""
        return sorted(self._skipped)

    def retire(self, pos: int) -> None:
        """Refuse, from now on, messages under this key that name epoch ``pos`` or later.

        Called for every inbound key when the validated log shows a ``remove``
        or ``leave`` at ``pos``; an earlier retirement is never moved later.
        """
        if self._retired_at is None or pos < self._retired_at:
            self._retired_at = pos

    def open(
        self,
        data: bytes | RoomEnvelope,
        *,
        authorise: Callable[[RoomEnvelope], object] | None = None,
    ) -> bytes:
        """Verify and decrypt one envelope; any failure leaves this key unchanged.

        Raises :class:`~.errors.UnknownSenderKey` if the envelope is for
        another room, sender or generation, :class:`~.errors.BadSignature`,
        :class:`~.errors.StaleSenderKey` for an epoch outside this key's
        validity, :class:`~.errors.DuplicateMessage` for a replay,
        :class:`~.errors.TooManySkipped` beyond the skip bound, and
        :class:`~.errors.DecryptionFailed` if the AEAD refuses.

        ``authorise`` (typically :func:`~.envelope.check_epoch` against the
        reader's log) runs after the signature verified and before any key is
        used, so it only ever judges what the sender really signed: a relay
        that alters a message's epoch gets ``bad_signature``, never a false
        fork alarm. It raises to refuse.
        """
        env = data if isinstance(data, RoomEnvelope) else RoomEnvelope.from_bytes(data)
        if (
            not P.ct_equal(env.room_id, self._room_id)
            or not P.ct_equal(env.sender, self._owner)
            or env.generation != self._generation
        ):
            raise UnknownSenderKey("envelope is not under this sender key")
        ad = env.associated_data()
        P.ed25519_verify(
            self._signing_public, envelope_signed_bytes(ad, env.ciphertext), env.signature
        )
        if env.epoch_pos < self._since:
            raise StaleSenderKey("message names an epoch before this sender key existed")
        if self._retired_at is not None and env.epoch_pos >= self._retired_at:
            raise StaleSenderKey("sender key was retired by a later removal or leave")
        if authorise is not None:
            authorise(env)
        mk, chain_key, index, skipped = self._message_key(env.index)
        key, nonce = message_aead_key(mk)
        plaintext = padding.unpad(P.aead_decrypt(key, nonce, env.ciphertext, ad))
        # Commit only now that the message is authentic.
        self._chain_key, self._index = chain_key, index
        self._skipped = skipped
        self._skipped.pop(env.index, None)
        self._evict()
        return plaintext

    def _message_key(self, index: int) -> tuple[bytes, bytes, int, dict[int, bytes]]:
        stored = self._skipped.get(index)
        if stored is not None:
            return stored, self._chain_key, self._index, dict(self._skipped)
        if index < self._index:
            raise DuplicateMessage("message key already used or discarded")
        if index - self._index > self._max_skip:
            raise TooManySkipped(
                f"message would skip {index - self._index} keys (max {self._max_skip})"
            )
        skipped = dict(self._skipped)
        chain_key = self._chain_key
        at = self._index
        while at < index:
            chain_key, skipped[at] = kdf_ck(chain_key)
            at += 1
        chain_key, mk = kdf_ck(chain_key)
        return mk, chain_key, index + 1, skipped

    def _evict(self) -> None:
        excess = len(self._skipped) - self._max_stored
        if excess > 0:
            for index in sorted(self._skipped)[:excess]:
                del self._skipped[index]

    def to_bytes(self) -> bytes:
        value: dict[str, Value] = {
            "ck": self._chain_key,
            "gen": self._generation,
            "idx": self._index,
            "max_skip": self._max_skip,
            "max_stored": self._max_stored,
            "owner": self._owner,
            "prev": self._prev_count,
            "room": self._room_id,
            "since": self._since,
            "skipped": [[i, self._skipped[i]] for i in sorted(self._skipped)],
            "spk": self._signing_public,
            "v": SENDER_KEY_VERSION,
        }
        if self._retired_at is not None:
            value["retired"] = self._retired_at
        return encode(value)

    @classmethod
    def from_bytes(cls, data: bytes) -> InboundSenderKey:
        r = Reader.of(decode(data, max_size=_MAX_STATE_SIZE), "inbound sender key")
        r.version(SENDER_KEY_VERSION)
        max_stored = r.integer("max_stored", 1, MAX_STORED_LIMIT)
        max_skip = r.integer("max_skip", 1, max_stored)
        skipped: dict[int, bytes] = {}
        for item in r.array("skipped", max_stored):
            if not isinstance(item, list) or len(item) != 2:
                raise DecodeError("inbound sender key: skipped entry must be [index, key]")
            index = item[0]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_INDEX:
                raise DecodeError("inbound sender key: skipped index out of range")
            if index in skipped:
                raise DecodeError("inbound sender key: duplicate skipped index")
            skipped[index] = check_bytes(item[1], "inbound sender key.skipped", size=KEY_SIZE)
        out = cls(
            chain_key=r.blob("ck", KEY_SIZE),
            generation=r.integer("gen", 0, MAX_GENERATION),
            index=r.integer("idx", 0, MAX_INDEX + 1),
            owner=r.blob("owner", P.ED25519_PUBLIC_SIZE),
            prev_count=r.integer("prev", 0, MAX_INDEX + 1),
            room_id=r.blob("room", HASH_SIZE),
            since=r.integer("since", 0, MAX_POS),
            signing_public=r.blob("spk", P.ED25519_PUBLIC_SIZE),
            retired_at=r.integer("retired", 0, MAX_POS) if r.has("retired") else None,
            skipped=skipped,
            max_skip=max_skip,
            max_stored=max_stored,
        )
        r.done()
        if any(i >= out._index for i in skipped):
            raise DecodeError("inbound sender key: skipped index not below the chain index")
        return out

    def __repr__(self) -> str:
        return (
            f"InboundSenderKey(gen={self._generation}, index={self._index}, "
            f"skipped={len(self._skipped)}, retired_at={self._retired_at})"
        )
