"""The only module that touches PyNaCl (libsodium) and pqcrypto.

Everything above this layer speaks in plain ``bytes`` and in the typed errors
of :mod:`backchannel.protocol.errors`; nothing above it imports a crypto
library. Keeping one narrow seam makes the primitive choices of the design
brief (§3) auditable in a single file.

Randomness: functions that need fresh secrets take an ``rng`` callable so that
tests can fix it (known-answer vectors); production callers use the default,
libsodium's ``randombytes``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Final

import nacl.bindings as _sodium
import nacl.exceptions as _nacl_exc
import nacl.hash as _nacl_hash
import nacl.pwhash.argon2id as _argon2id
import nacl.signing as _signing
import nacl.utils as _nacl_utils
from nacl.encoding import RawEncoder
from pqcrypto.kem import ml_kem_768 as _mlkem

from .errors import BadSignature, DecryptionFailed, InvalidKey

Rng = Callable[[int], bytes]

ED25519_PUBLIC_SIZE: Final = 32
ED25519_SEED_SIZE: Final = 32
ED25519_SIGNATURE_SIZE: Final = 64
X25519_SIZE: Final = 32
AEAD_KEY_SIZE: Final = 32
AEAD_NONCE_SIZE: Final = 24
AEAD_TAG_SIZE: Final = 16
MLKEM_PUBLIC_SIZE: Final[int] = int(_mlkem.PUBLIC_KEY_SIZE)
MLKEM_SECRET_SIZE: Final[int] = int(_mlkem.SECRET_KEY_SIZE)
MLKEM_CIPHERTEXT_SIZE: Final[int] = int(_mlkem.CIPHERTEXT_SIZE)
MLKEM_SHARED_SIZE: Final[int] = int(_mlkem.SHARED_SECRET_SIZE)
KDF_LABEL_MAX: Final = 16  # BLAKE2b personalisation is at most 16 bytes
KDF_KEY_MAX: Final = 64
ARGON2_SALT_SIZE: Final = 16


def random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes from libsodium."""
    return bytes(_nacl_utils.random(n))


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time equality for secrets, MACs and hashes."""
    return hmac.compare_digest(a, b)


# --- Ed25519 ------------------------------------------------------------------------


def ed25519_public(seed: bytes) -> bytes:
    """The public key for a 32-byte Ed25519 seed."""
    _check_len(seed, ED25519_SEED_SIZE, "Ed25519 seed")
    return bytes(_signing.SigningKey(seed).verify_key)


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    """A detached Ed25519 signature."""
    _check_len(seed, ED25519_SEED_SIZE, "Ed25519 seed")
    return bytes(_signing.SigningKey(seed).sign(message).signature)


def ed25519_expand(seed: bytes) -> bytes:
    """The 64-byte libsodium secret key for ``seed``.

    Signing from a seed recomputes the public key every time (a scalar
    multiplication); a sender key that signs every room message expands once
    and keeps the result in memory (never serialised).
    """
    _check_len(seed, ED25519_SEED_SIZE, "Ed25519 seed")
    _public, secret = _sodium.crypto_sign_seed_keypair(seed)
    return bytes(secret)


def ed25519_sign_expanded(secret: bytes, message: bytes) -> bytes:
    """A detached Ed25519 signature with a key from :func:`ed25519_expand`."""
    _check_len(secret, 64, "Ed25519 expanded secret key")
    return bytes(_sodium.crypto_sign(message, secret)[:ED25519_SIGNATURE_SIZE])


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is valid for ``message``."""
    if len(public) != ED25519_PUBLIC_SIZE or len(signature) != ED25519_SIGNATURE_SIZE:
        raise BadSignature("malformed key or signature")
    try:
        _signing.VerifyKey(public).verify(message, signature)
    except (_nacl_exc.BadSignatureError, _nacl_exc.CryptoError, ValueError, TypeError) as exc:
        raise BadSignature("signature does not verify") from exc


# --- X25519 ---------------------------------------------------------------------------


def x25519_public(private: bytes) -> bytes:
    """The public key for a 32-byte X25519 private key (libsodium clamps it)."""
    _check_len(private, X25519_SIZE, "X25519 private key")
    return bytes(_sodium.crypto_scalarmult_base(private))


def x25519(private: bytes, public: bytes) -> bytes:
    """X25519 Diffie-Hellman; rejects low-order peer keys (all-zero output)."""
    _check_len(private, X25519_SIZE, "X25519 private key")
    if len(public) != X25519_SIZE:
        raise InvalidKey("X25519 public key must be 32 bytes")
    try:
        shared = bytes(_sodium.crypto_scalarmult(private, public))
    except _nacl_exc.RuntimeError as exc:  # libsodium refuses low-order points
        raise InvalidKey("degenerate X25519 public key") from exc
    if ct_equal(shared, bytes(X25519_SIZE)):
        raise InvalidKey("degenerate X25519 public key")
    return shared


# --- ML-KEM-768 -------------------------------------------------------------------------


def mlkem_keypair() -> tuple[bytes, bytes]:
    """A fresh ML-KEM-768 key pair ``(public, secret)``.

    pqcrypto draws its own randomness; there is no seeded variant, which is why
    known-answer vectors store ML-KEM keys and ciphertexts as inputs.
    """
    public, secret = _mlkem.keygen()
    return bytes(public), bytes(secret)


def mlkem_encaps(public: bytes) -> tuple[bytes, bytes]:
    """Encapsulate to ``public``: returns ``(ciphertext, shared_secret)``."""
    if len(public) != MLKEM_PUBLIC_SIZE:
        raise InvalidKey("ML-KEM-768 public key has the wrong size")
    try:
        ciphertext, shared = _mlkem.encaps(public)
    except Exception as exc:  # the Rust binding raises untyped errors on bad keys
        raise InvalidKey("ML-KEM-768 public key rejected") from exc
    return bytes(ciphertext), bytes(shared)


def mlkem_decaps(secret: bytes, ciphertext: bytes) -> bytes:
    """Decapsulate. ML-KEM decapsulation never fails on a well-sized ciphertext:
    a forged one yields an unrelated secret (implicit rejection), which the
    AEAD of the first message then refuses."""
    if len(secret) != MLKEM_SECRET_SIZE:
        raise InvalidKey("ML-KEM-768 secret key has the wrong size")
    if len(ciphertext) != MLKEM_CIPHERTEXT_SIZE:
        raise InvalidKey("ML-KEM-768 ciphertext has the wrong size")
    try:
        return bytes(_mlkem.decaps(secret, ciphertext))
    except Exception as exc:
        raise InvalidKey("ML-KEM-768 decapsulation failed") from exc


# --- AEAD -------------------------------------------------------------------------------


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """XChaCha20-Poly1305-IETF seal; output is ciphertext followed by the 16-byte tag."""
    _check_len(key, AEAD_KEY_SIZE, "AEAD key")
    _check_len(nonce, AEAD_NONCE_SIZE, "AEAD nonce")
    return bytes(
        _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, associated_data, nonce, key)
    )


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """XChaCha20-Poly1305-IETF open; any failure is :class:`DecryptionFailed`."""
    _check_len(key, AEAD_KEY_SIZE, "AEAD key")
    _check_len(nonce, AEAD_NONCE_SIZE, "AEAD nonce")
    if len(ciphertext) < AEAD_TAG_SIZE:
        raise DecryptionFailed("ciphertext shorter than its tag")
    try:
        return bytes(
            _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext, associated_data, nonce, key
            )
        )
    except _nacl_exc.CryptoError as exc:
        raise DecryptionFailed("authentication failed") from exc


# --- BLAKE2b ------------------------------------------------------------------------------


def kdf(key: bytes, label: bytes, data: bytes = b"", size: int = 32) -> bytes:
    """Keyed BLAKE2b with a personalisation ``label`` for domain separation.

    Every call site in the protocol uses its own label (see docs/protocol.md,
    "KDF labels"), so no derived key can be confused with another.
    """
    if not 1 <= len(key) <= KDF_KEY_MAX:
        raise ValueError("BLAKE2b key must be 1..64 bytes")
    return _blake2b(data, key=key, label=label, size=size)


def hash_bytes(label: bytes, data: bytes, size: int = 32) -> bytes:
    """Unkeyed BLAKE2b with a personalisation ``label``."""
    return _blake2b(data, key=b"", label=label, size=size)


def _blake2b(data: bytes, *, key: bytes, label: bytes, size: int) -> bytes:
    if not 1 <= len(label) <= KDF_LABEL_MAX:
        raise ValueError("KDF label must be 1..16 bytes")
    if not 16 <= size <= 64:
        raise ValueError("BLAKE2b output must be 16..64 bytes")
    person = label.ljust(KDF_LABEL_MAX, b"\x00")
    return bytes(
        _nacl_hash.blake2b(data, digest_size=size, key=key, person=person, encoder=RawEncoder)
    )


# --- Argon2id --------------------------------------------------------------------------------

ARGON2_OPSLIMIT_DEFAULT: Final[int] = int(_argon2id.OPSLIMIT_MODERATE)
ARGON2_MEMLIMIT_DEFAULT: Final[int] = int(_argon2id.MEMLIMIT_MODERATE)
ARGON2_OPSLIMIT_MIN: Final[int] = int(_argon2id.OPSLIMIT_MIN)
ARGON2_MEMLIMIT_MIN: Final[int] = int(_argon2id.MEMLIMIT_MIN)


def argon2id(
    passphrase: bytes,
    salt: bytes,
    *,
    size: int = 32,
    opslimit: int = ARGON2_OPSLIMIT_DEFAULT,
    memlimit: int = ARGON2_MEMLIMIT_DEFAULT,
) -> bytes:
    """Derive a key from a passphrase with libsodium's Argon2id."""
    _check_len(salt, ARGON2_SALT_SIZE, "Argon2id salt")
    return bytes(_argon2id.kdf(size, passphrase, salt, opslimit=opslimit, memlimit=memlimit))


def _check_len(value: bytes, size: int, what: str) -> None:
    # Wrong-sized secrets are a caller bug, not hostile input: ValueError, not ProtocolError.
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(value)}")
