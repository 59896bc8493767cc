"""What a client signs to prove to the relay that it holds a key.

The relay and the client both import these, so the bytes are defined once
(docs/relay-api.md, "Authentication"). Two forms:

* a WebSocket *challenge*: the relay sends a fresh 32-byte nonce; the client
  signs ``[origin, nonce]`` under the context ``relay-auth`` with each member
  key it wants to use on the connection;
* a signed REST request: ``[origin, METHOD, path?query, HASH(body), time,
  nonce]`` under ``relay-request``, with the key named in ``X-BC-Key``.

Binding the relay's origin (scheme, host and port, as participants reach it)
means a signature made for one relay is useless at another, including a
malicious relay that relays challenges from an honest one.
"""

from __future__ import annotations

from typing import Final

from . import primitives as P
from .encoding import encode
from .keys import signing_input

CTX_AUTH: Final = "relay-auth"
CTX_REQUEST: Final = "relay-request"
LABEL_BODY: Final = b"bc-req-body"
CHALLENGE_SIZE: Final = 32
REQUEST_NONCE_SIZE: Final = 16


def challenge_bytes(origin: str, nonce: bytes) -> bytes:
    """The bytes a member key signs to answer challenge ``nonce`` of the relay at ``origin``."""
    return signing_input(CTX_AUTH, encode([origin, nonce]))


def request_bytes(
    origin: str, method: str, path: str, body: bytes, timestamp: int, nonce: bytes
) -> bytes:
    """The bytes a key signs to authenticate one REST request."""
    digest = P.hash_bytes(LABEL_BODY, body, 32)
    return signing_input(
        CTX_REQUEST, encode([origin, method.upper(), path, digest, timestamp, nonce])
    )


def sign_challenge(seed: bytes, origin: str, nonce: bytes) -> bytes:
    return P.ed25519_sign(seed, challenge_bytes(origin, nonce))


def verify_challenge(public: bytes, origin: str, nonce: bytes, signature: bytes) -> None:
    """Raise :class:`~.errors.BadSignature` unless ``signature`` answers the challenge."""
    P.ed25519_verify(public, challenge_bytes(origin, nonce), signature)


def verify_request(
    public: bytes,
    signature: bytes,
    *,
    origin: str,
    method: str,
    path: str,
    body: bytes,
    timestamp: int,
    nonce: bytes,
) -> None:
    P.ed25519_verify(public, request_bytes(origin, method, path, body, timestamp, nonce), signature)


def sign_request(
    seed: bytes,
    *,
    origin: str,
    method: str,
    path: str,
    body: bytes,
    timestamp: int,
    nonce: bytes,
) -> bytes:
    """Sign one REST request with an Ed25519 seed (a member key's or an invite key's)."""
    return P.ed25519_sign(seed, request_bytes(origin, method, path, body, timestamp, nonce))
