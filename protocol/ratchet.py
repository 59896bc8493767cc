"""The Double Ratchet for pairwise sessions, and the pairwise message wrapper.

Follows "The Double Ratchet Algorithm" (Signal, Perrin and Marlinspike,
revision 4) without header encryption, sections "KDF chains", "Symmetric-key
ratchet", "Diffie-Hellman ratchet", "Initialization", "Encrypting messages"
and "Decrypting messages", with the primitives of docs/sections/pairwise.md
("Pairwise sessions"):

* ``KDF_RK(rk, dh_out)``: ``out = BLAKE2b(key=rk, label="bc-dr-root", dh_out, 64)``;
  the new root key is ``out[:32]``, the new chain key ``out[32:]``.
* ``KDF_CK(ck)``: ``out = BLAKE2b(key=ck, label="bc-dr-chain", "", 64)``; the
  new chain key is ``out[:32]``, the message key ``out[32:]``.
* ``ENCRYPT(mk, plaintext, ad)``: ``BLAKE2b(key=mk, label="bc-dr-msg", "", 56)``
  gives a 32-byte XChaCha20-Poly1305 key and its 24-byte nonce; the message key
  is used for exactly one message, so the derived nonce never repeats.

Both KDFs are a KDF chain in the shape of the spec's section "KDF chains" (and
of the ``doubleratchet`` package, which the cross-check test configures with
these primitives): one derivation whose first 32 bytes replace the chain key.

Every decryption works on a copy of the state and commits only on success, so
a forged, altered, replayed or out-of-bounds message leaves the state exactly
as it was (spec, "Decrypting messages": "if an exception is raised ... discard
any changes to the state").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from . import padding
from . import primitives as P
from .encoding import Reader, Value, check_bytes, decode, encode
from .errors import (
    DecodeError,
    DecryptionFailed,
    DuplicateMessage,
    HandshakeError,
    ProtocolError,
    TooManySkipped,
)
from .handshake import MAX_INITIAL_HEADER_SIZE, InitialHeader, PrekeyLookup, initiate, respond
from .keys import MemberKeyPair, MemberPublicKey, PreKeyBundle, PreKeyKind

RATCHET_VERSION: Final = 1
#: Spec "MAX_SKIP": most message keys one message may make us skip in one chain.
DEFAULT_MAX_SKIP: Final = 1000
#: Most skipped message keys kept at once; the oldest are evicted beyond it.
DEFAULT_MAX_STORED: Final = 2000
#: Hard ceiling for ``max_stored`` so a decoded state has a bounded size.
MAX_STORED_LIMIT: Final = 100_000
MAX_COUNTER: Final = (1 << 32) - 1
#: Remote ratchet keys remembered after they are replaced, to tell a replay
#: of an old chain's message (DuplicateMessage) from a new ratchet key.
MAX_PREVIOUS_CHAINS: Final = 64
MAX_AD_SIZE: Final = 1024
CHAIN_CONSTANT: Final = b""
KEY_SIZE: Final = 32
MAX_CIPHERTEXT_SIZE: Final = padding.MAX_BUCKET + P.AEAD_TAG_SIZE
MAX_MESSAGE_SIZE: Final = MAX_CIPHERTEXT_SIZE + 256
MAX_PAIRWISE_SIZE: Final = MAX_MESSAGE_SIZE + MAX_INITIAL_HEADER_SIZE + 64
_MAX_STATE_SIZE: Final = 8192 + MAX_STORED_LIMIT * 96 + MAX_PREVIOUS_CHAINS * 40

_LABEL_ROOT: Final = b"bc-dr-root"
_LABEL_CHAIN: Final = b"bc-dr-chain"
_LABEL_MSG: Final = b"bc-dr-msg"

Role = Literal["initiator", "responder"]
_ROLES: Final[tuple[Role, ...]] = ("initiator", "responder")


class SessionNotReady(HandshakeError):
    """The responder's ratchet cannot send before it has received the first message."""

    code = "session_not_ready"


class NewSession(HandshakeError):
    """A message that opens a different session than the one it was given to.

    The caller decides what to do (e.g. :meth:`PairwiseSession.accept` it as a
    replacement); the existing session is unchanged.
    """

    code = "new_session"


# --- KDFs and AEAD ------------------------------------------------------------------


def kdf_rk(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """Spec ``KDF_RK``: ``(root key, chain key)``."""
    out = P.kdf(rk, _LABEL_ROOT, dh_out, 64)
    return out[:KEY_SIZE], out[KEY_SIZE:]


def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    """Spec ``KDF_CK``: ``(chain key, message key)``."""
    out = P.kdf(ck, _LABEL_CHAIN, CHAIN_CONSTANT, 64)
    return out[:KEY_SIZE], out[KEY_SIZE:]


def message_aead_key(mk: bytes) -> tuple[bytes, bytes]:
    """The AEAD key and nonce for message key ``mk``."""
    out = P.kdf(mk, _LABEL_MSG, b"", P.AEAD_KEY_SIZE + P.AEAD_NONCE_SIZE)
    return out[: P.AEAD_KEY_SIZE], out[P.AEAD_KEY_SIZE :]


def aead_associated_data(ad: bytes, sender: Role, header_bytes: bytes) -> bytes:
    """Spec ``CONCAT(AD, header)``, as one canonical encoding that also names the sender's role.

    The role makes a message decrypt only in the direction it was sent: a
    message reflected back to its sender fails even where the ratchet keys
    alone would not tell.
    """
    return encode({"ad": ad, "from": sender, "hdr": header_bytes})


def _other(role: Role) -> Role:
    return "responder" if role == "initiator" else "initiator"


# --- wire formats ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RatchetHeader:
    """Spec ``HEADER(dh_pair, pn, n)``: ratchet public key, previous chain length, number."""

    dh: bytes
    pn: int
    n: int

    def to_value(self) -> Value:
        return {"dh": self.dh, "n": self.n, "pn": self.pn, "v": RATCHET_VERSION}

    def to_bytes(self) -> bytes:
        return encode(self.to_value())

    @classmethod
    def from_value(cls, value: Value) -> RatchetHeader:
        r = Reader.of(value, "ratchet header")
        r.version(RATCHET_VERSION)
        dh = r.blob("dh", P.X25519_SIZE)
        pn = r.integer("pn", 0, MAX_COUNTER)
        n = r.integer("n", 0, MAX_COUNTER)
        r.done()
        return cls(dh=dh, pn=pn, n=n)


@dataclass(frozen=True, slots=True)
class RatchetMessage:
    """A header and the AEAD ciphertext of the padded plaintext."""

    header: RatchetHeader
    ciphertext: bytes

    def to_value(self) -> Value:
        return {"ct": self.ciphertext, "h": self.header.to_value(), "v": RATCHET_VERSION}

    def to_bytes(self) -> bytes:
        return encode(self.to_value())

    @classmethod
    def from_value(cls, value: Value) -> RatchetMessage:
        r = Reader.of(value, "ratchet message")
        r.version(RATCHET_VERSION)
        header = RatchetHeader.from_value(r.raw("h"))
        ciphertext = r.blob("ct", max_size=MAX_CIPHERTEXT_SIZE)
        r.done()
        return cls(header=header, ciphertext=ciphertext)

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetMessage:
        return cls.from_value(decode(data, max_size=MAX_MESSAGE_SIZE))


@dataclass(frozen=True, slots=True)
class PairwiseMessage:
    """What travels between two members: a ratchet message, preceded by the
    handshake's :class:`InitialHeader` until the responder has answered (a
    "prekey message")."""

    message: RatchetMessage
    initial: InitialHeader | None = None

    def to_bytes(self) -> bytes:
        value: dict[str, Value] = {"msg": self.message.to_value(), "v": RATCHET_VERSION}
        if self.initial is not None:
            value["init"] = self.initial.to_value()
        return encode(value)

    @classmethod
    def from_bytes(cls, data: bytes) -> PairwiseMessage:
        r = Reader.of(decode(data, max_size=MAX_PAIRWISE_SIZE), "pairwise message")
        r.version(RATCHET_VERSION)
        message = RatchetMessage.from_value(r.raw("msg"))
        initial = InitialHeader.from_value(r.raw("init")) if r.has("init") else None
        r.done()
        return cls(message=message, initial=initial)


# --- the ratchet ---------------------------------------------------------------------------


class Ratchet:
    """One side's Double Ratchet state (spec, "State variables").

    Mutable: :meth:`encrypt` and :meth:`decrypt` advance it, and the caller
    persists :meth:`to_bytes` together with what it sent or received.
    ``rng`` supplies the new ratchet private keys (spec ``GENERATE_DH``).
    """

    __slots__ = (
        "_ad",
        "_ckr",
        "_cks",
        "_dhr",
        "_dhs",
        "_dhs_public",
        "_max_skip",
        "_max_stored",
        "_nr",
        "_ns",
        "_pn",
        "_previous",
        "_rk",
        "_rng",
        "_role",
        "_skipped",
    )

    def __init__(
        self,
        *,
        role: Role,
        ad: bytes,
        dhs: bytes,
        dhr: bytes | None,
        rk: bytes,
        cks: bytes | None,
        ckr: bytes | None,
        ns: int = 0,
        nr: int = 0,
        pn: int = 0,
        skipped: dict[tuple[bytes, int], bytes] | None = None,
        previous: list[bytes] | None = None,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_stored: int = DEFAULT_MAX_STORED,
        rng: P.Rng = P.random_bytes,
    ) -> None:
        if not 1 <= max_skip <= max_stored <= MAX_STORED_LIMIT:
            raise ValueError("need 1 <= max_skip <= max_stored <= MAX_STORED_LIMIT")
        self._role: Role = role
        self._ad = ad
        self._dhs = dhs
        self._dhs_public = P.x25519_public(dhs)
        self._dhr = dhr
        self._rk = rk
        self._cks = cks
        self._ckr = ckr
        self._ns = ns
        self._nr = nr
        self._pn = pn
        self._skipped: dict[tuple[bytes, int], bytes] = dict(skipped or {})
        self._previous: list[bytes] = list(previous or [])
        self._max_skip = max_skip
        self._max_stored = max_stored
        self._rng = rng

    @classmethod
    def init_initiator(
        cls,
        sk: bytes,
        responder_spk: bytes,
        ad: bytes,
        *,
        rng: P.Rng = P.random_bytes,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_stored: int = DEFAULT_MAX_STORED,
    ) -> Ratchet:
        """Spec ``RatchetInitAlice(state, SK, bob_dh_public_key)``, with Bob's signed prekey."""
        _check_secret(sk)
        dhs = rng(P.X25519_SIZE)
        rk, cks = kdf_rk(sk, P.x25519(dhs, responder_spk))
        return cls(
            role="initiator",
            ad=ad,
            dhs=dhs,
            dhr=responder_spk,
            rk=rk,
            cks=cks,
            ckr=None,
            max_skip=max_skip,
            max_stored=max_stored,
            rng=rng,
        )

    @classmethod
    def init_responder(
        cls,
        sk: bytes,
        spk_private: bytes,
        ad: bytes,
        *,
        rng: P.Rng = P.random_bytes,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_stored: int = DEFAULT_MAX_STORED,
    ) -> Ratchet:
        """Spec ``RatchetInitBob(state, SK, bob_dh_key_pair)``, with Bob's signed prekey pair."""
        _check_secret(sk)
        return cls(
            role="responder",
            ad=ad,
            dhs=spk_private,
            dhr=None,
            rk=sk,
            cks=None,
            ckr=None,
            max_skip=max_skip,
            max_stored=max_stored,
            rng=rng,
        )

    # --- accessors (public values only) ---

    @property
    def role(self) -> Role:
        return self._role

    @property
    def public_key(self) -> bytes:
        """Our current ratchet public key (spec ``DHs``'s public half)."""
        return self._dhs_public

    @property
    def skipped_count(self) -> int:
        return len(self._skipped)

    @property
    def can_send(self) -> bool:
        return self._cks is not None

    # --- encrypt ---

    def encrypt(self, plaintext: bytes) -> bytes:
        """Spec ``RatchetEncrypt``; returns :meth:`RatchetMessage.to_bytes`."""
        return self.encrypt_message(plaintext).to_bytes()

    def encrypt_message(self, plaintext: bytes) -> RatchetMessage:
        if self._cks is None:
            raise SessionNotReady("the responder sends only after the first message arrived")
        if self._ns > MAX_COUNTER:
            raise ProtocolError("sending chain exhausted")
        padded = padding.pad(plaintext)
        cks, mk = kdf_ck(self._cks)
        header = RatchetHeader(dh=self._dhs_public, pn=self._pn, n=self._ns)
        ciphertext = _seal(mk, self._ad, self._role, header, padded)
        self._cks = cks
        self._ns += 1
        return RatchetMessage(header=header, ciphertext=ciphertext)

    # --- decrypt ---

    def decrypt(self, data: bytes) -> bytes:
        """Spec ``RatchetDecrypt`` on the bytes of a :class:`RatchetMessage`."""
        return self.decrypt_message(RatchetMessage.from_bytes(data))

    def decrypt_message(self, message: RatchetMessage) -> bytes:
        h = message.header
        sender = _other(self._role)
        stored = self._skipped.get((h.dh, h.n))
        if stored is not None:
            plaintext = _open(stored, self._ad, sender, message)
            del self._skipped[(h.dh, h.n)]
            return plaintext
        if self._dhr is not None and h.dh == self._dhr and h.n < self._nr:
            raise DuplicateMessage("message key already used or discarded")
        if h.dh in self._previous:
            raise DuplicateMessage("message of a finished chain whose key is gone")
        state = self._copy()
        if state._dhr is None or h.dh != state._dhr:
            state._skip(h.pn)
            state._dh_ratchet(h.dh)
        if state._ckr is None:
            # Only an initiator that has received nothing gets here, for a header
            # naming the responder's signed prekey, which never sends.
            raise DecryptionFailed("no receiving chain for this ratchet key")
        state._skip(h.n)
        state._ckr, mk = kdf_ck(state._ckr)
        state._nr += 1
        plaintext = _open(mk, self._ad, sender, message)
        state._evict()
        self._commit(state)
        return plaintext

    def _skip(self, until: int) -> None:
        """Spec ``SkipMessageKeys``, refusing more than ``max_skip`` keys in one chain."""
        if self._ckr is None or self._dhr is None:
            return
        if until > self._nr + self._max_skip:
            raise TooManySkipped(
                f"message would skip {until - self._nr} keys (max {self._max_skip})"
            )
        while self._nr < until:
            self._ckr, mk = kdf_ck(self._ckr)
            self._skipped[(self._dhr, self._nr)] = mk
            self._nr += 1

    def _dh_ratchet(self, remote: bytes) -> None:
        """Spec ``DHRatchet``."""
        if self._dhr is not None:
            self._previous = [*self._previous, self._dhr][-MAX_PREVIOUS_CHAINS:]
        self._pn = self._ns
        self._ns = 0
        self._nr = 0
        self._dhr = remote
        self._rk, self._ckr = kdf_rk(self._rk, P.x25519(self._dhs, remote))
        self._dhs = self._rng(P.X25519_SIZE)
        self._dhs_public = P.x25519_public(self._dhs)
        self._rk, self._cks = kdf_rk(self._rk, P.x25519(self._dhs, remote))

    def _evict(self) -> None:
        excess = len(self._skipped) - self._max_stored
        if excess > 0:
            for key in list(self._skipped)[:excess]:
                del self._skipped[key]

    def _copy(self) -> Ratchet:
        return Ratchet(
            role=self._role,
            ad=self._ad,
            dhs=self._dhs,
            dhr=self._dhr,
            rk=self._rk,
            cks=self._cks,
            ckr=self._ckr,
            ns=self._ns,
            nr=self._nr,
            pn=self._pn,
            skipped=self._skipped,
            previous=self._previous,
            max_skip=self._max_skip,
            max_stored=self._max_stored,
            rng=self._rng,
        )

    def _commit(self, other: Ratchet) -> None:
        for name in Ratchet.__slots__:
            setattr(self, name, getattr(other, name))

    # --- persistence ---

    def to_value(self) -> Value:
        value: dict[str, Value] = {
            "ad": self._ad,
            "dhs": self._dhs,
            "max_skip": self._max_skip,
            "max_stored": self._max_stored,
            "nr": self._nr,
            "ns": self._ns,
            "pn": self._pn,
            "prev": list(self._previous),
            "rk": self._rk,
            "role": self._role,
            "skipped": [[dh, n, mk] for (dh, n), mk in self._skipped.items()],
            "v": RATCHET_VERSION,
        }
        for key, item in (("dhr", self._dhr), ("cks", self._cks), ("ckr", self._ckr)):
            if item is not None:
                value[key] = item
        return value

    def to_bytes(self) -> bytes:
        """Versioned canonical encoding of the whole state, skipped keys included (secret)."""
        return encode(self.to_value())

    @classmethod
    def from_value(cls, value: Value, *, rng: P.Rng = P.random_bytes) -> Ratchet:
        r = Reader.of(value, "ratchet state")
        r.version(RATCHET_VERSION)
        role: Role = "initiator" if r.text("role", 16, _ROLES) == "initiator" else "responder"
        ad = r.blob("ad", max_size=MAX_AD_SIZE)
        dhs = r.blob("dhs", P.X25519_SIZE)
        dhr = r.optional_blob("dhr", P.X25519_SIZE)
        rk = r.blob("rk", KEY_SIZE)
        cks = r.optional_blob("cks", KEY_SIZE)
        ckr = r.optional_blob("ckr", KEY_SIZE)
        ns = r.integer("ns", 0, MAX_COUNTER + 1)
        nr = r.integer("nr", 0, MAX_COUNTER + 1)
        pn = r.integer("pn", 0, MAX_COUNTER + 1)
        max_stored = r.integer("max_stored", 1, MAX_STORED_LIMIT)
        max_skip = r.integer("max_skip", 1, max_stored)
        skipped: dict[tuple[bytes, int], bytes] = {}
        for item in r.array("skipped", max_stored):
            if not isinstance(item, list) or len(item) != 3:
                raise DecodeError("ratchet state: skipped entry must be [dh, n, mk]")
            dh = check_bytes(item[0], "ratchet state.skipped.dh", size=P.X25519_SIZE)
            n = item[1]
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_COUNTER:
                raise DecodeError("ratchet state: skipped index out of range")
            mk = check_bytes(item[2], "ratchet state.skipped.mk", size=KEY_SIZE)
            if (dh, n) in skipped:
                raise DecodeError("ratchet state: duplicate skipped key")
            skipped[(dh, n)] = mk
        previous = [
            check_bytes(item, "ratchet state.prev", size=P.X25519_SIZE)
            for item in r.array("prev", MAX_PREVIOUS_CHAINS)
        ]
        r.done()
        # ckr needs dhr; only a responder that has received nothing lacks cks (and dhr).
        if (ckr is not None and dhr is None) or (cks is None and dhr is not None):
            raise DecodeError("ratchet state: inconsistent chains")
        return cls(
            role=role,
            ad=ad,
            dhs=dhs,
            dhr=dhr,
            rk=rk,
            cks=cks,
            ckr=ckr,
            ns=ns,
            nr=nr,
            pn=pn,
            skipped=skipped,
            previous=previous,
            max_skip=max_skip,
            max_stored=max_stored,
            rng=rng,
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, rng: P.Rng = P.random_bytes) -> Ratchet:
        return cls.from_value(decode(data, max_size=_MAX_STATE_SIZE), rng=rng)

    def __repr__(self) -> str:
        return (
            f"Ratchet({self._role}, dh={self._dhs_public[:4].hex()}, ns={self._ns}, "
            f"nr={self._nr}, pn={self._pn}, skipped={len(self._skipped)})"
        )


def _check_secret(sk: bytes) -> None:
    if len(sk) != KEY_SIZE:
        raise ValueError("the session key must be 32 bytes")


def _seal(mk: bytes, ad: bytes, sender: Role, header: RatchetHeader, padded: bytes) -> bytes:
    key, nonce = message_aead_key(mk)
    return P.aead_encrypt(key, nonce, padded, aead_associated_data(ad, sender, header.to_bytes()))


def _open(mk: bytes, ad: bytes, sender: Role, message: RatchetMessage) -> bytes:
    key, nonce = message_aead_key(mk)
    associated = aead_associated_data(ad, sender, message.header.to_bytes())
    return padding.unpad(P.aead_decrypt(key, nonce, message.ciphertext, associated))


# --- pairwise sessions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """What :meth:`PairwiseSession.accept` returns. Delete ``consumed`` prekeys
    in the same transaction that stores ``session``."""

    session: PairwiseSession
    plaintext: bytes
    consumed: tuple[tuple[PreKeyKind, int], ...]


class PairwiseSession:
    """A Double Ratchet between two member keys, set up by :mod:`.handshake`.

    The initiator puts the :class:`InitialHeader` in front of every message
    until it has decrypted one from the responder; the responder remembers
    that header's digest, so later copies of it go to the same session.
    """

    __slots__ = ("_init_digest", "_local", "_peer", "_pending", "_ratchet")

    def __init__(
        self,
        *,
        local: MemberPublicKey,
        peer: MemberPublicKey,
        ratchet: Ratchet,
        pending: InitialHeader | None,
        init_digest: bytes | None,
    ) -> None:
        self._local = local
        self._peer = peer
        self._ratchet = ratchet
        self._pending = pending
        self._init_digest = init_digest

    @classmethod
    def initiate(
        cls,
        me: MemberKeyPair,
        bundle: PreKeyBundle,
        expected_peer: MemberPublicKey,
        *,
        rng: P.Rng = P.random_bytes,
        kem_encaps: Callable[[bytes], tuple[bytes, bytes]] = P.mlkem_encaps,
        now: int | None = None,
        max_spk_age: int | None = None,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_stored: int = DEFAULT_MAX_STORED,
    ) -> PairwiseSession:
        """Open a session to ``expected_peer`` (from the validated room log) with its bundle."""
        result = initiate(
            me,
            bundle,
            expected_peer,
            rng=rng,
            kem_encaps=kem_encaps,
            now=now,
            max_spk_age=max_spk_age,
        )
        ratchet = Ratchet.init_initiator(
            result.session_key,
            result.peer_spk,
            result.associated_data,
            rng=rng,
            max_skip=max_skip,
            max_stored=max_stored,
        )
        return cls(
            local=me.public,
            peer=expected_peer,
            ratchet=ratchet,
            pending=result.header,
            init_digest=None,
        )

    @classmethod
    def accept(
        cls,
        me: MemberKeyPair,
        message: bytes | PairwiseMessage,
        *,
        initiator: MemberPublicKey,
        prekeys: PrekeyLookup,
        rng: P.Rng = P.random_bytes,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_stored: int = DEFAULT_MAX_STORED,
    ) -> Accepted:
        """Set up the responder's session from a prekey message and decrypt it, in one step.

        ``initiator`` is the member key the caller found in its validated room
        log for ``message.initial.initiator``. Raises :class:`HandshakeError`
        for a message that opens no session or names unknown prekeys, and
        :class:`~.errors.DecryptionFailed` when the first message does not
        decrypt (e.g. a forged KEM ciphertext or ephemeral key).
        """
        parsed = (
            message if isinstance(message, PairwiseMessage) else PairwiseMessage.from_bytes(message)
        )
        if parsed.initial is None:
            raise HandshakeError("message opens no session")
        result = respond(me, parsed.initial, initiator=initiator, prekeys=prekeys)
        ratchet = Ratchet.init_responder(
            result.session_key,
            result.ratchet_private,
            result.associated_data,
            rng=rng,
            max_skip=max_skip,
            max_stored=max_stored,
        )
        plaintext = ratchet.decrypt_message(parsed.message)
        session = cls(
            local=me.public,
            peer=initiator,
            ratchet=ratchet,
            pending=None,
            init_digest=parsed.initial.digest(),
        )
        return Accepted(session=session, plaintext=plaintext, consumed=result.consumed)

    @property
    def local(self) -> MemberPublicKey:
        return self._local

    @property
    def peer(self) -> MemberPublicKey:
        return self._peer

    @property
    def ratchet(self) -> Ratchet:
        return self._ratchet

    @property
    def is_initiator(self) -> bool:
        return self._ratchet.role == "initiator"

    @property
    def established(self) -> bool:
        """True once the peer is known to hold the session (we decrypted one of its messages)."""
        return self._pending is None

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt one message; returns :class:`PairwiseMessage` bytes."""
        message = self._ratchet.encrypt_message(plaintext)
        return PairwiseMessage(message=message, initial=self._pending).to_bytes()

    def decrypt(self, data: bytes | PairwiseMessage) -> bytes:
        """Decrypt one :class:`PairwiseMessage`; any failure leaves the session unchanged."""
        parsed = data if isinstance(data, PairwiseMessage) else PairwiseMessage.from_bytes(data)
        if parsed.initial is not None and (
            self._init_digest is None or not P.ct_equal(parsed.initial.digest(), self._init_digest)
        ):
            raise NewSession("message opens a different session")
        plaintext = self._ratchet.decrypt_message(parsed.message)
        self._pending = None
        return plaintext

    def to_bytes(self) -> bytes:
        value: dict[str, Value] = {
            "local": self._local.to_value(),
            "peer": self._peer.to_value(),
            "ratchet": self._ratchet.to_value(),
            "v": RATCHET_VERSION,
        }
        if self._pending is not None:
            value["pending"] = self._pending.to_value()
        if self._init_digest is not None:
            value["init"] = self._init_digest
        return encode(value)

    @classmethod
    def from_bytes(cls, data: bytes, *, rng: P.Rng = P.random_bytes) -> PairwiseSession:
        r = Reader.of(decode(data, max_size=_MAX_STATE_SIZE + 4096), "pairwise session")
        r.version(RATCHET_VERSION)
        local = MemberPublicKey.from_value(r.raw("local"), "pairwise session.local")
        peer = MemberPublicKey.from_value(r.raw("peer"), "pairwise session.peer")
        ratchet = Ratchet.from_value(r.raw("ratchet"), rng=rng)
        pending = InitialHeader.from_value(r.raw("pending")) if r.has("pending") else None
        init_digest = r.optional_blob("init", 32)
        r.done()
        if pending is not None and ratchet.role != "initiator":
            raise DecodeError("pairwise session: only an initiator has a pending header")
        return cls(
            local=local, peer=peer, ratchet=ratchet, pending=pending, init_digest=init_digest
        )

    def __repr__(self) -> str:
        return (
            f"PairwiseSession({self._ratchet.role}, local={self._local!r}, peer={self._peer!r}, "
            f"established={self.established})"
        )
