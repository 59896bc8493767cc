"""Hybrid session set-up between two member keys, modelled on Signal's PQXDH.

Follows "The PQXDH Key Agreement Protocol" (Signal, Kret and Schmidt), which
extends "The X3DH Key Agreement Protocol" (Signal, 2016), with the changes
listed in docs/sections/pairwise.md:

* Identity keys are member keys: an Ed25519 key that signs the prekeys and a
  separate X25519 key for DH1/DH2 (no XEdDSA, no key converted between curves).
* The KDF is keyed BLAKE2b (``primitives.kdf``) instead of HKDF, and the
  session key is bound to a transcript of every public value of the run: the
  protocol name, both member keys (initiator first), the ephemeral key, the
  signed and one-time prekeys with their ids, the KEM prekey with its id and
  kind, and the KEM ciphertext. The published analyses of PQXDH (Bhargavan,
  Jacomme, Kiefer, Schmidt, "Formal verification of the PQXDH post-quantum key
  agreement protocol", USENIX Security 2024) found attacks that binding the
  KEM public key, the ciphertext and both identities rules out.
* The first message of the Double Ratchet is the proof of the run (as in
  PQXDH §3.3): a forged KEM ciphertext decapsulates to an unrelated secret
  (ML-KEM implicit rejection), so that message fails to decrypt.

The session key feeds only the Double Ratchet's first root key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from . import primitives as P
from .encoding import Reader, Value, decode, encode
from .errors import HandshakeError
from .keys import (
    MAX_PREKEY_ID,
    MemberKeyPair,
    MemberPublicKey,
    PreKey,
    PreKeyBundle,
    PreKeyKind,
    PreKeyPrivate,
)

HANDSHAKE_VERSION: Final = 1
#: The protocol name bound into every transcript (PQXDH parameter "info").
PROTOCOL_NAME: Final = "backchannel-pqxdh-x25519-mlkem768-blake2b"
SESSION_KEY_SIZE: Final = 32
#: Upper bound for an encoded :class:`InitialHeader` (the KEM ciphertext dominates).
MAX_INITIAL_HEADER_SIZE: Final = 2048

_LABEL_TRANSCRIPT: Final = b"bc-pqxdh-th"
_LABEL_PRK: Final = b"bc-pqxdh-prk"
_LABEL_SK: Final = b"bc-pqxdh-sk"
_LABEL_HEADER: Final = b"bc-pqxdh-hdr"

KemKind = Literal["kem", "kem-lr"]
_KEM_KINDS: Final[tuple[KemKind, ...]] = ("kem", "kem-lr")

#: How the responder finds its own prekeys: ``(kind, id) -> (signed public, private)``
#: or ``None`` when it has no such prekey (never had it, or already consumed it).
PrekeyLookup = Callable[[PreKeyKind, int], tuple[PreKey, PreKeyPrivate] | None]


def associated_data(initiator: MemberPublicKey, responder: MemberPublicKey) -> bytes:
    """The session's associated data (X3DH §3.3 ``AD``): both member keys, initiator first."""
    return encode(
        {
            "initiator": initiator.to_value(),
            "responder": responder.to_value(),
            "v": HANDSHAKE_VERSION,
        }
    )


def transcript(
    *,
    initiator: MemberPublicKey,
    responder: MemberPublicKey,
    ephemeral: bytes,
    spk: PreKey,
    kem: PreKey,
    kem_ciphertext: bytes,
    opk: PreKey | None,
) -> bytes:
    """The canonical encoding of every public value of one run; the session key is bound to it."""
    value: dict[str, Value] = {
        "ct": kem_ciphertext,
        "ek": ephemeral,
        "initiator": initiator.to_value(),
        "kem": {"id": kem.id, "kind": kem.kind, "pk": kem.public},
        "proto": PROTOCOL_NAME,
        "responder": responder.to_value(),
        "spk": {"id": spk.id, "pk": spk.public},
        "v": HANDSHAKE_VERSION,
    }
    if opk is not None:
        value["opk"] = {"id": opk.id, "pk": opk.public}
    return encode(value)


def session_key(dh_outputs: Sequence[bytes], kem_shared: bytes, transcript_bytes: bytes) -> bytes:
    """SK from DH1..DH3 (and DH4), the ML-KEM shared secret and the transcript.

    ``prk = BLAKE2b(key=SS, label="bc-pqxdh-prk", DH1 || DH2 || DH3 [|| DH4])``
    keys the extraction with the KEM secret, so SK stays pseudorandom while
    ML-KEM holds even if every X25519 output is known (the hybrid argument of
    PQXDH's security considerations); with ML-KEM broken it rests on the DH outputs as in X3DH.
    ``SK = BLAKE2b(key=prk, label="bc-pqxdh-sk", TH)`` with ``TH`` the 64-byte
    transcript hash binds every public value of the run.
    """
    if len(dh_outputs) not in (3, 4) or any(len(d) != P.X25519_SIZE for d in dh_outputs):
        raise ValueError("expected three or four 32-byte DH outputs")
    if len(kem_shared) != P.MLKEM_SHARED_SIZE:
        raise ValueError("ML-KEM shared secret has the wrong size")
    th = P.hash_bytes(_LABEL_TRANSCRIPT, transcript_bytes, 64)
    prk = P.kdf(kem_shared, _LABEL_PRK, b"".join(dh_outputs), 64)
    return P.kdf(prk, _LABEL_SK, th, SESSION_KEY_SIZE)


@dataclass(frozen=True, slots=True)
class InitialHeader:
    """What the responder needs to repeat the initiator's computation (PQXDH §3.3).

    Sent in front of the initiator's messages until the responder first answers.
    """

    initiator: MemberPublicKey
    ephemeral: bytes
    spk_id: int
    kem_id: int
    kem_kind: KemKind
    kem_ciphertext: bytes
    opk_id: int | None = None

    def __post_init__(self) -> None:
        if len(self.ephemeral) != P.X25519_SIZE:
            raise ValueError("ephemeral key must be 32 bytes")
        if len(self.kem_ciphertext) != P.MLKEM_CIPHERTEXT_SIZE:
            raise ValueError("KEM ciphertext has the wrong size")
        if self.kem_kind not in _KEM_KINDS:
            raise ValueError("unknown KEM prekey kind")

    def prekeys(self) -> list[tuple[PreKeyKind, int]]:
        """The responder's prekeys this header names, as ``(kind, id)``."""
        out: list[tuple[PreKeyKind, int]] = [("spk", self.spk_id), (self.kem_kind, self.kem_id)]
        if self.opk_id is not None:
            out.append(("opk", self.opk_id))
        return out

    def digest(self) -> bytes:
        """A 32-byte name for this run, so a responder can tell its session's header apart."""
        return P.hash_bytes(_LABEL_HEADER, self.to_bytes(), 32)

    def to_value(self) -> Value:
        out: dict[str, Value] = {
            "ct": self.kem_ciphertext,
            "ek": self.ephemeral,
            "from": self.initiator.to_value(),
            "kem_id": self.kem_id,
            "kem_kind": self.kem_kind,
            "spk_id": self.spk_id,
            "v": HANDSHAKE_VERSION,
        }
        if self.opk_id is not None:
            out["opk_id"] = self.opk_id
        return out

    def to_bytes(self) -> bytes:
        return encode(self.to_value())

    @classmethod
    def from_value(cls, value: Value) -> InitialHeader:
        r = Reader.of(value, "initial header")
        r.version(HANDSHAKE_VERSION)
        initiator = MemberPublicKey.from_value(r.raw("from"), "initial header.from")
        ephemeral = r.blob("ek", P.X25519_SIZE)
        spk_id = r.integer("spk_id", 0, MAX_PREKEY_ID)
        kem_id = r.integer("kem_id", 0, MAX_PREKEY_ID)
        kem_kind: KemKind = "kem" if r.text("kem_kind", 8, _KEM_KINDS) == "kem" else "kem-lr"
        ciphertext = r.blob("ct", P.MLKEM_CIPHERTEXT_SIZE)
        opk_id = r.integer("opk_id", 0, MAX_PREKEY_ID) if r.has("opk_id") else None
        r.done()
        return cls(
            initiator=initiator,
            ephemeral=ephemeral,
            spk_id=spk_id,
            kem_id=kem_id,
            kem_kind=kem_kind,
            kem_ciphertext=ciphertext,
            opk_id=opk_id,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InitialHeader:
        return cls.from_value(decode(data, max_size=MAX_INITIAL_HEADER_SIZE))

    def __repr__(self) -> str:
        return (
            f"InitialHeader(from={self.initiator!r}, spk={self.spk_id}, opk={self.opk_id}, "
            f"{self.kem_kind}={self.kem_id})"
        )


@dataclass(frozen=True, slots=True)
class InitiatorResult:
    """The initiator's outcome: SK for the ratchet's root key, AD, and the header to send.

    ``peer_spk`` is the responder's signed prekey, the initiator's first remote
    ratchet key (Double Ratchet, "Integration with X3DH": ``bob_dh_public_key``).
    """

    session_key: bytes = field(repr=False)
    associated_data: bytes
    header: InitialHeader
    transcript: bytes = field(repr=False)
    peer: MemberPublicKey
    peer_spk: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ResponderResult:
    """The responder's outcome.

    ``ratchet_private`` is the signed prekey's private half, the responder's
    first ratchet key pair (``bob_dh_key_pair``). ``consumed`` lists the
    one-time prekeys (``opk`` and a one-time ``kem``) the caller must delete
    once the first message has decrypted; a last-resort KEM prekey is never
    consumed.
    """

    session_key: bytes = field(repr=False)
    associated_data: bytes
    transcript: bytes = field(repr=False)
    ratchet_private: bytes = field(repr=False)
    consumed: tuple[tuple[PreKeyKind, int], ...]


def initiate(
    me: MemberKeyPair,
    bundle: PreKeyBundle,
    expected_peer: MemberPublicKey,
    *,
    rng: P.Rng = P.random_bytes,
    kem_encaps: Callable[[bytes], tuple[bytes, bytes]] = P.mlkem_encaps,
    now: int | None = None,
    max_spk_age: int | None = None,
) -> InitiatorResult:
    """Start a session with ``expected_peer`` (PQXDH §3.3, "Sending the initial message").

    ``expected_peer`` must come from the validated room log; the bundle, which
    the relay hands out, is only believed once it verifies against it.
    """
    bundle.verify(expected_peer, now=now, max_spk_age=max_spk_age)
    if _same_member(me.public, expected_peer):
        raise HandshakeError("a member cannot open a session with itself")
    ek_private = rng(P.X25519_SIZE)
    ek_public = P.x25519_public(ek_private)
    dh = [
        me.dh(bundle.spk.public),
        P.x25519(ek_private, expected_peer.dh),
        P.x25519(ek_private, bundle.spk.public),
    ]
    if bundle.opk is not None:
        dh.append(P.x25519(ek_private, bundle.opk.public))
    ciphertext, shared = kem_encaps(bundle.kem.public)
    kem_kind: KemKind = "kem" if bundle.kem.kind == "kem" else "kem-lr"
    header = InitialHeader(
        initiator=me.public,
        ephemeral=ek_public,
        spk_id=bundle.spk.id,
        kem_id=bundle.kem.id,
        kem_kind=kem_kind,
        kem_ciphertext=ciphertext,
        opk_id=None if bundle.opk is None else bundle.opk.id,
    )
    th = transcript(
        initiator=me.public,
        responder=expected_peer,
        ephemeral=ek_public,
        spk=bundle.spk,
        kem=bundle.kem,
        kem_ciphertext=ciphertext,
        opk=bundle.opk,
    )
    return InitiatorResult(
        session_key=session_key(dh, shared, th),
        associated_data=associated_data(me.public, expected_peer),
        header=header,
        transcript=th,
        peer=expected_peer,
        peer_spk=bundle.spk.public,
    )


def respond(
    me: MemberKeyPair,
    header: InitialHeader,
    *,
    initiator: MemberPublicKey,
    prekeys: PrekeyLookup,
) -> ResponderResult:
    """Repeat the initiator's computation (PQXDH §3.4, "Receiving the initial message").

    ``initiator`` is the member key the caller found in its validated room log
    for ``header.initiator``; a header from anyone else is refused. Prekeys are
    looked up by the ids in the header; a missing one (unknown, or a one-time
    prekey already consumed, i.e. a replayed initial message) is a
    :class:`HandshakeError`. Nothing here proves the initiator knew SK: only
    the first message's successful decryption does, so the caller deletes
    ``consumed`` prekeys only after that.
    """
    if not _same_member(header.initiator, initiator):
        raise HandshakeError("initial message is not from the expected member")
    if _same_member(initiator, me.public):
        raise HandshakeError("a member cannot open a session with itself")
    spk, spk_private = _lookup(prekeys, "spk", header.spk_id)
    kem, kem_private = _lookup(prekeys, header.kem_kind, header.kem_id)
    opk: PreKey | None = None
    opk_private: PreKeyPrivate | None = None
    if header.opk_id is not None:
        opk, opk_private = _lookup(prekeys, "opk", header.opk_id)
    dh = [
        P.x25519(spk_private.private, initiator.dh),
        me.dh(header.ephemeral),
        P.x25519(spk_private.private, header.ephemeral),
    ]
    if opk_private is not None:
        dh.append(P.x25519(opk_private.private, header.ephemeral))
    shared = P.mlkem_decaps(kem_private.private, header.kem_ciphertext)
    th = transcript(
        initiator=initiator,
        responder=me.public,
        ephemeral=header.ephemeral,
        spk=spk,
        kem=kem,
        kem_ciphertext=header.kem_ciphertext,
        opk=opk,
    )
    consumed: list[tuple[PreKeyKind, int]] = []
    if opk is not None:
        consumed.append(("opk", opk.id))
    if kem.kind == "kem":
        consumed.append(("kem", kem.id))
    return ResponderResult(
        session_key=session_key(dh, shared, th),
        associated_data=associated_data(initiator, me.public),
        transcript=th,
        ratchet_private=spk_private.private,
        consumed=tuple(consumed),
    )


def _lookup(prekeys: PrekeyLookup, kind: PreKeyKind, key_id: int) -> tuple[PreKey, PreKeyPrivate]:
    found = prekeys(kind, key_id)
    if found is None:
        raise HandshakeError(f"no {kind} prekey with id {key_id} (unknown or already used)")
    public, private = found
    if (public.kind, public.id) != (kind, key_id) or (private.kind, private.id) != (kind, key_id):
        raise HandshakeError("prekey store returned a different prekey")
    if kind in ("spk", "opk") and not P.ct_equal(private.public(), public.public):
        raise HandshakeError("prekey store holds mismatched halves")
    return public, private


def _same_member(a: MemberPublicKey, b: MemberPublicKey) -> bool:
    return P.ct_equal(a.sign, b.sign) and P.ct_equal(a.dh, b.dh)
