"""Known answers for invite codes: payload, checksum and text for fixed inputs."""

from __future__ import annotations

from typing import Any

from backchannel.protocol import primitives as P
from backchannel.protocol.invite import InviteCode
from tests.protocol.drbg import Drbg


def generate() -> dict[str, Any]:
    rng = Drbg("vectors-invite")
    out: dict[str, Any] = {}
    for name, url in (("typical", "https://relay.example.org"), ("local", "ws://127.0.0.1:8000")):
        code = InviteCode(relay_url=url, room_id=rng(32), invite_seed=rng(32), facilitator=rng(16))
        payload = code.payload()
        out[name] = {
            "relay_url": url,
            "room_id": code.room_id,
            "invite_seed": code.invite_seed,
            "invite_public": P.ed25519_public(code.invite_seed),
            "facilitator": code.facilitator,
            "payload": payload,
            "checksum": P.hash_bytes(b"bc-inv-check", payload, 16)[:4],
            "text": code.to_text(),
            "text_compact": code.to_text(0),
            "qr_text": code.to_qr_text(),
            "length": len(code.to_text()),
        }
    return out
