"""Proof of key possession: signed REST requests and the WebSocket challenge.

A signed REST request carries four headers:

``X-BC-Key``    hex Ed25519 public key (a member key, or an invite key for the preview)
``X-BC-Time``   unix seconds
``X-BC-Nonce``  base64url (no padding) of 16 random bytes
``X-BC-Sig``    base64url Ed25519 signature over
                ``protocol.relayauth.request_bytes(origin, METHOD, path_with_query,
                body, time, nonce)``

The relay refuses a time outside ±``clock_skew_seconds`` (``stale_request``),
a nonce it has seen in that window (``replayed_request``; seen nonces live in
the database so every instance refuses them) and a bad signature
(``bad_signature``), all with 401. The client's
``signed_request_headers`` builds the headers.
"""

from __future__ import annotations

import base64
import binascii

from starlette.requests import Request

from backchannel.protocol import errors as perr
from backchannel.protocol import primitives as P
from backchannel.protocol import relayauth

from ..errors import RelayError

REQUEST_NONCE_SIZE = relayauth.REQUEST_NONCE_SIZE


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str, what: str = "value") -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise RelayError("malformed", 400, f"{what} must be unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise RelayError("malformed", 400, f"{what} must be unpadded base64url") from exc


def path_with_query(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


async def verify_request(request: Request) -> bytes:
    """Check a signed request; returns the signing key. Raises 401 :class:`RelayError`."""
    state = request.app.state
    settings, store = state.settings, state.store
    headers = request.headers
    try:
        key = bytes.fromhex(headers["x-bc-key"])
        when = int(headers["x-bc-time"])
        nonce = b64d(headers["x-bc-nonce"], "X-BC-Nonce")
        sig = b64d(headers["x-bc-sig"], "X-BC-Sig")
    except (KeyError, ValueError, RelayError) as exc:
        raise RelayError("unauthenticated", 401, "this request must be signed") from exc
    if len(key) != P.ED25519_PUBLIC_SIZE or len(nonce) != REQUEST_NONCE_SIZE or len(sig) != 64:
        raise RelayError("unauthenticated", 401, "malformed request signature headers")
    now = int(store.clock())
    if abs(now - when) > settings.clock_skew_seconds:
        raise RelayError("stale_request", 401, "X-BC-Time is too far from the relay's clock")
    body = await request.body()
    try:
        relayauth.verify_request(
            key,
            sig,
            origin=settings.origin(),
            method=request.method,
            path=path_with_query(request),
            body=body,
            timestamp=when,
            nonce=nonce,
        )
    except (perr.ProtocolError, ValueError) as exc:
        raise RelayError("bad_signature", 401, "the request signature does not verify") from exc
    if not await store.remember_nonce(nonce, when + settings.clock_skew_seconds + 1):
        raise RelayError("replayed_request", 401, "this request was already made")
    return key
