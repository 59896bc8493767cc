"""Member keys, prekeys and prekey bundles.

A participant's client makes a fresh *member key* for every room it creates or
joins: an Ed25519 key for signing and a separate X25519 key for agreement (one
key per purpose, never converted between curves). The relay knows a member only
by these public keys.

For pairwise sessions each member publishes prekeys, every one signed by its
Ed25519 member key:

* ``spk``    signed X25519 prekey (medium-term, carries a creation time so a
             stale one can be refused);
* ``opk``    one-time X25519 prekey (consumed by a claim);
* ``kem``    one-time ML-KEM-768 prekey (consumed by a claim);
* ``kem-lr`` last-resort ML-KEM-768 prekey (served when no one-time KEM prekey
             is left; never consumed).

Signing inputs are domain-separated with :func:`signing_input`, so a signature
made for one purpose never verifies for another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from . import primitives as P
from .encoding import Reader, Value, check_bytes, decode, encode
from .errors import DecodeError, HandshakeError

KEY_VERSION: Final = 1
FINGERPRINT_SIZE: Final = 32
MAX_PREKEY_ID: Final = (1 << 32) - 1
#: Upper bound on prekeys in one upload; the relay applies its own, lower, limit.
MAX_PREKEYS_PER_UPLOAD: Final = 1000

PreKeyKind = Literal["spk", "opk", "kem", "kem-lr"]
PREKEY_KINDS: Final[tuple[PreKeyKind, ...]] = ("spk", "opk", "kem", "kem-lr")


def signing_input(context: str, message: bytes) -> bytes:
    """The bytes actually signed: a fixed prefix, the purpose, then the message."""
    return encode(["backchannel-sig", 1, context, message])


@dataclass(frozen=True, slots=True)
class MemberPublicKey:
    """The public half of a member key: the member's only identity in a room."""

    sign: bytes
    dh: bytes

    def __post_init__(self) -> None:
        check_bytes(self.sign, "member.sign", size=P.ED25519_PUBLIC_SIZE)
        check_bytes(self.dh, "member.dh", size=P.X25519_SIZE)

    def fingerprint(self) -> bytes:
        """A 32-byte digest of both public keys, shown to people (hex groups)."""
        return P.hash_bytes(b"bc-fingerprint", self.sign + self.dh, FINGERPRINT_SIZE)

    def fingerprint_text(self, groups: int = 8) -> str:
        """Fingerprint as lowercase hex in groups of four, e.g. ``3f2a 91c0 ...``."""
        hexed = self.fingerprint().hex()
        return " ".join(hexed[i : i + 4] for i in range(0, groups * 4, 4))

    def verify(self, context: str, message: bytes, signature: bytes) -> None:
        P.ed25519_verify(self.sign, signing_input(context, message), signature)

    def to_value(self) -> Value:
        return {"dh": self.dh, "sign": self.sign}

    @classmethod
    def from_value(cls, value: Value, what: str = "member") -> MemberPublicKey:
        r = Reader.of(value, what)
        sign = r.blob("sign", P.ED25519_PUBLIC_SIZE)
        dh = r.blob("dh", P.X25519_SIZE)
        r.done()
        return cls(sign=sign, dh=dh)

    def __repr__(self) -> str:
        return f"MemberPublicKey({self.fingerprint_text(2)})"


@dataclass(frozen=True, slots=True)
class MemberKeyPair:
    """A member key with its private halves. ``repr`` shows public material only."""

    sign_seed: bytes = field(repr=False)
    dh_private: bytes = field(repr=False)
    public: MemberPublicKey

    @classmethod
    def generate(cls, rng: P.Rng = P.random_bytes) -> MemberKeyPair:
        sign_seed = rng(P.ED25519_SEED_SIZE)
        dh_private = rng(P.X25519_SIZE)
        return cls.from_private(sign_seed, dh_private)

    @classmethod
    def from_private(cls, sign_seed: bytes, dh_private: bytes) -> MemberKeyPair:
        public = MemberPublicKey(P.ed25519_public(sign_seed), P.x25519_public(dh_private))
        return cls(sign_seed=sign_seed, dh_private=dh_private, public=public)

    def sign(self, context: str, message: bytes) -> bytes:
        return P.ed25519_sign(self.sign_seed, signing_input(context, message))

    def dh(self, peer: bytes) -> bytes:
        return P.x25519(self.dh_private, peer)

    def to_bytes(self) -> bytes:
        """Private serialisation for the client's sealed store; never sent anywhere."""
        return encode({"dh": self.dh_private, "sign": self.sign_seed, "v": KEY_VERSION})

    @classmethod
    def from_bytes(cls, data: bytes) -> MemberKeyPair:
        r = Reader.of(decode(data), "member key pair")
        r.version(KEY_VERSION)
        sign_seed = r.blob("sign", P.ED25519_SEED_SIZE)
        dh_private = r.blob("dh", P.X25519_SIZE)
        r.done()
        return cls.from_private(sign_seed, dh_private)

    def __repr__(self) -> str:
        return f"MemberKeyPair({self.public!r})"


_PUBLIC_SIZE: Final[dict[str, int]] = {
    "spk": P.X25519_SIZE,
    "opk": P.X25519_SIZE,
    "kem": P.MLKEM_PUBLIC_SIZE,
    "kem-lr": P.MLKEM_PUBLIC_SIZE,
}


@dataclass(frozen=True, slots=True)
class PreKey:
    """One signed prekey of any kind. ``ts`` is the signer's claimed creation time."""

    kind: PreKeyKind
    id: int
    public: bytes
    ts: int
    signature: bytes

    def signed_part(self, member: MemberPublicKey) -> bytes:
        # The member key is inside the signed bytes, so a prekey cannot be
        # re-attributed to a different member even if two members shared a
        # signing key by accident.
        return encode(
            {
                "id": self.id,
                "kind": self.kind,
                "member": member.to_value(),
                "pk": self.public,
                "ts": self.ts,
            }
        )

    @classmethod
    def create(
        cls, member: MemberKeyPair, kind: PreKeyKind, key_id: int, public: bytes, ts: int
    ) -> PreKey:
        unsigned = cls(kind=kind, id=key_id, public=public, ts=ts, signature=bytes(64))
        unsigned._check_shape()
        sig = member.sign("prekey", unsigned.signed_part(member.public))
        return cls(kind=kind, id=key_id, public=public, ts=ts, signature=sig)

    def _check_shape(self) -> None:
        if self.kind not in PREKEY_KINDS:
            raise DecodeError("prekey: unknown kind")
        if not 0 <= self.id <= MAX_PREKEY_ID:
            raise DecodeError("prekey: id out of range")
        check_bytes(self.public, "prekey.pk", size=_PUBLIC_SIZE[self.kind])

    def verify(self, member: MemberPublicKey) -> None:
        """Raise :class:`~.errors.BadSignature` unless ``member`` signed this prekey."""
        self._check_shape()
        member.verify("prekey", self.signed_part(member), self.signature)

    def to_value(self) -> Value:
        return {
            "id": self.id,
            "kind": self.kind,
            "pk": self.public,
            "sig": self.signature,
            "ts": self.ts,
        }

    @classmethod
    def from_value(cls, value: Value, what: str = "prekey") -> PreKey:
        r = Reader.of(value, what)
        kind = r.text("kind", 8, PREKEY_KINDS)
        key_id = r.integer("id", 0, MAX_PREKEY_ID)
        public = r.blob("pk", _PUBLIC_SIZE[kind])
        ts = r.integer("ts", 0)
        sig = r.blob("sig", P.ED25519_SIGNATURE_SIZE)
        r.done()
        return cls(kind=kind, id=key_id, public=public, ts=ts, signature=sig)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PreKeyBundle:
    """What a claim returns: enough to start a session with ``member`` offline.

    ``kem`` is a one-time KEM prekey when one was left, else the last-resort
    one; ``opk`` is absent when the member has run out of one-time prekeys.
    """

    member: MemberPublicKey
    spk: PreKey
    kem: PreKey
    opk: PreKey | None = None

    def verify(
        self,
        expected: MemberPublicKey,
        *,
        now: int | None = None,
        max_spk_age: int | None = None,
    ) -> None:
        """Check the bundle belongs to ``expected`` (taken from the validated
        room log, never from the relay) and every signature holds.

        With ``now`` and ``max_spk_age`` a signed prekey older than the bound
        (a relay replaying a retired one) is refused too.
        """
        if not (
            P.ct_equal(self.member.sign, expected.sign) and P.ct_equal(self.member.dh, expected.dh)
        ):
            raise HandshakeError("bundle is for a different member key")
        if self.spk.kind != "spk":
            raise HandshakeError("bundle's signed prekey has the wrong kind")
        if self.kem.kind not in ("kem", "kem-lr"):
            raise HandshakeError("bundle's KEM prekey has the wrong kind")
        if self.opk is not None and self.opk.kind != "opk":
            raise HandshakeError("bundle's one-time prekey has the wrong kind")
        for prekey in (self.spk, self.kem, self.opk):
            if prekey is not None:
                prekey.verify(expected)
        if now is not None and max_spk_age is not None and now - self.spk.ts > max_spk_age:
            raise HandshakeError("bundle's signed prekey is stale")

    def to_value(self) -> Value:
        out: dict[str, Value] = {
            "kem": self.kem.to_value(),
            "member": self.member.to_value(),
            "spk": self.spk.to_value(),
            "v": KEY_VERSION,
        }
        if self.opk is not None:
            out["opk"] = self.opk.to_value()
        return out

    def to_bytes(self) -> bytes:
        return encode(self.to_value())

    @classmethod
    def from_value(cls, value: Value) -> PreKeyBundle:
        r = Reader.of(value, "bundle")
        r.version(KEY_VERSION)
        member = MemberPublicKey.from_value(r.raw("member"), "bundle.member")
        spk = PreKey.from_value(r.raw("spk"), "bundle.spk")
        kem = PreKey.from_value(r.raw("kem"), "bundle.kem")
        opk = PreKey.from_value(r.raw("opk"), "bundle.opk") if r.has("opk") else None
        r.done()
        return cls(member=member, spk=spk, kem=kem, opk=opk)

    @classmethod
    def from_bytes(cls, data: bytes) -> PreKeyBundle:
        return cls.from_value(decode(data, max_size=8192))


@dataclass(frozen=True, slots=True)
class PreKeyUpload:
    """A member's published prekeys, as uploaded to the relay."""

    member: MemberPublicKey
    prekeys: Sequence[PreKey]

    def verify(self) -> None:
        seen: set[tuple[str, int]] = set()
        for prekey in self.prekeys:
            if (prekey.kind, prekey.id) in seen:
                raise DecodeError("upload: duplicate prekey id")
            seen.add((prekey.kind, prekey.id))
            prekey.verify(self.member)

    def to_bytes(self) -> bytes:
        return encode(
            {
                "member": self.member.to_value(),
                "prekeys": [p.to_value() for p in self.prekeys],
                "v": KEY_VERSION,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_prekeys: int = MAX_PREKEYS_PER_UPLOAD) -> PreKeyUpload:
        r = Reader.of(decode(data, max_size=64 + max_prekeys * 1400), "upload")
        r.version(KEY_VERSION)
        member = MemberPublicKey.from_value(r.raw("member"), "upload.member")
        prekeys = [PreKey.from_value(v, "upload.prekey") for v in r.array("prekeys", max_prekeys)]
        r.done()
        return cls(member=member, prekeys=prekeys)


@dataclass(frozen=True, slots=True)
class PreKeyPrivate:
    """A prekey's private half as the owning client keeps it (sealed at rest)."""

    kind: PreKeyKind
    id: int
    private: bytes = field(repr=False)

    def public(self) -> bytes:
        if self.kind in ("spk", "opk"):
            return P.x25519_public(self.private)
        raise ValueError("ML-KEM public keys are stored beside the secret, not derived")


def generate_x25519_prekey(
    member: MemberKeyPair,
    kind: Literal["spk", "opk"],
    key_id: int,
    ts: int,
    rng: P.Rng = P.random_bytes,
) -> tuple[PreKey, PreKeyPrivate]:
    private = rng(P.X25519_SIZE)
    public = P.x25519_public(private)
    return (
        PreKey.create(member, kind, key_id, public, ts),
        PreKeyPrivate(kind=kind, id=key_id, private=private),
    )


def generate_kem_prekey(
    member: MemberKeyPair,
    kind: Literal["kem", "kem-lr"],
    key_id: int,
    ts: int,
) -> tuple[PreKey, PreKeyPrivate]:
    public, secret = P.mlkem_keypair()
    return (
        PreKey.create(member, kind, key_id, public, ts),
        PreKeyPrivate(kind=kind, id=key_id, private=secret),
    )
