"""docs/relay-api.md, "Signed REST requests", is what the relay checks.

The section's Python block is taken out of the document and run as it stands (it uses
PyNaCl and cbor2 only, never this project's signing code) to sign requests that a real
relay must answer 200; the step-by-step text must name the same parameters as the block;
the project names the section mentions must exist; and a request signed as the section
used to say (unkeyed, unpersonalised BLAKE2b-256 of the body) must be refused.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import httpx
from nacl.signing import SigningKey

from .conftest import RelayFactory
from .helpers import TestRoom, make_upload, upload

DOC = Path(__file__).resolve().parents[2] / "docs" / "relay-api.md"

Signer = Callable[..., dict[str, str]]


def section() -> str:
    text = DOC.read_text()
    start = text.index("## Signed REST requests\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def documented_signer() -> Signer:
    blocks = re.findall(r"```python\n(.*?)```", section(), re.S)
    assert len(blocks) == 1, "the section has one Python recipe"
    code = blocks[0]
    imported = set(re.findall(r"^(?:from|import) (\w+)", code, re.M))
    assert imported <= {"base64", "os", "time", "cbor2", "nacl"}, imported
    namespace: dict[str, Any] = {}
    exec(compile(code, f"{DOC}:signed-requests", "exec"), namespace)
    return namespace["signed_headers"]  # type: ignore[no-any-return]


def test_the_steps_name_the_parameters_the_recipe_uses() -> None:
    text = section()
    prose, code = text.split("```python", 1)
    label = re.search(r"personalisation\s+`([^`]+)`\s+padded with zero bytes to (\d+) bytes", prose)
    assert label is not None
    prefix = re.search(r'`\["([\w-]+)", (\d+), "([\w-]+)", request\]`', prose)
    assert prefix is not None
    assert f'b"{label[1]}".ljust({label[2]}' in code
    assert f'["{prefix[1]}", {prefix[2]}, "{prefix[3]}", request]' in code
    assert "digest_size=32" in code
    assert "32-byte digest" in prose
    assert "[origin, METHOD, path_with_query, body_hash, time, nonce]" in prose


def test_the_code_names_in_the_section_exist() -> None:
    names = set(re.findall(r"`(backchannel(?:\.\w+)+)`", section()))
    assert names, "the section points at the code"
    for dotted in sorted(names):
        module, _, attr = dotted.rpartition(".")
        try:
            assert hasattr(importlib.import_module(module), attr), dotted
        except ModuleNotFoundError:
            importlib.import_module(dotted)
    assert "relayauth.sign_request" in section()
    assert (Path(__file__).resolve().parents[2] / "server" / "rest" / "auth.py").exists()


def old_documented_headers(
    seed: bytes, origin: str, method: str, path: str, body: bytes = b""
) -> dict[str, str]:
    """The recipe as the document gave it before: ``hashlib.blake2b(body, digest_size=32)``."""
    key = SigningKey(seed)
    when, nonce = int(time.time()), os.urandom(16)
    digest = hashlib.blake2b(body, digest_size=32).digest()
    request = cbor2.dumps([origin, method.upper(), path, digest, when, nonce], canonical=True)
    signed = cbor2.dumps(["backchannel-sig", 1, "relay-request", request], canonical=True)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return {
        "X-BC-Key": key.verify_key.encode().hex(),
        "X-BC-Time": str(when),
        "X-BC-Nonce": b64(nonce),
        "X-BC-Sig": b64(key.sign(signed).signature),
    }


async def test_a_request_signed_from_the_document_is_accepted(relay_factory: RelayFactory) -> None:
    sign = documented_signer()
    relay = relay_factory()
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        bob = await room.add_member()
        await upload(http, make_upload(bob, opk=range(1, 3)))
        seed = room.facilitator.sign_seed

        path = f"/v1/rooms/{room.id.hex()}/events?after=0"
        r = await http.get(path, headers=sign(seed, relay.origin, "GET", path))
        assert r.status_code == 200, r.text
        assert r.json()["length"] >= 1

        # A body is hashed too: the claim route ignores it, the signature does not.
        path, body = f"/v1/prekeys/{bob.public.sign.hex()}/claim", b'{"why": "hash me"}'
        headers = sign(seed, relay.origin, "post", path, body)
        r = await http.post(path, content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert "bundle" in r.json()

        # The old document's recipe, and a body changed after signing, are refused.
        path = f"/v1/rooms/{room.id.hex()}/events"
        r = await http.get(path, headers=old_documented_headers(seed, relay.origin, "GET", path))
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "bad_signature"
        path = f"/v1/prekeys/{bob.public.sign.hex()}/claim"
        headers = sign(seed, relay.origin, "POST", path, b"one body")
        r = await http.post(path, content=b"another body", headers=headers)
        assert r.json()["error"]["code"] == "bad_signature"
