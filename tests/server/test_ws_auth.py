"""WebSocket authentication: challenge-response bound to a fresh nonce and the origin."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from backchannel.protocol import relayauth
from backchannel.protocol.keys import MemberKeyPair

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, WSClient, auth_frame, closed_with, frame


async def test_auth_ready_and_fresh_challenge(relay: RelayServer) -> None:
    a, b = MemberKeyPair.generate(), MemberKeyPair.generate()
    client = await WSClient.connect(relay)
    first = client.nonce
    ready = await client.auth([a])
    assert ready["keys"] == [a.public.sign]
    assert client.nonce != first  # a fresh challenge after every success
    ready = await client.auth([b])  # more keys later, over the new challenge
    assert sorted(ready["keys"]) == sorted([a.public.sign, b.public.sign])
    await client.send_frame("ping")
    await client.expect("pong")
    await client.close()


async def test_wrong_key_signature(relay: RelayServer) -> None:
    a, b = MemberKeyPair.generate(), MemberKeyPair.generate()
    client = await WSClient.connect(relay)
    sig = relayauth.sign_challenge(b.sign_seed, client.origin, client.nonce)
    await client.send_frame("auth", keys=[{"key": a.public.sign, "sig": sig}])
    err = await client.expect("error")
    assert err["code"] == "bad_signature"
    await client.auth([a])  # the connection may still authenticate properly
    await client.close()


async def test_signature_over_wrong_origin(relay: RelayServer) -> None:
    a = MemberKeyPair.generate()
    client = await WSClient.connect(relay)
    await client.send(auth_frame([a], "http://127.0.0.1:1", client.nonce))
    assert (await client.expect("error"))["code"] == "bad_signature"
    await client.close()


async def test_replayed_auth_frame_on_another_connection(relay: RelayServer) -> None:
    a = MemberKeyPair.generate()
    first = await WSClient.connect(relay)
    captured = auth_frame([a], first.origin, first.nonce)
    await first.send(captured)
    await first.expect("ready")
    # Same frame again on the same connection: the challenge has moved on.
    await first.send(captured)
    assert (await first.expect("error"))["code"] == "bad_signature"
    second = await WSClient.connect(relay)
    await second.send(captured)
    assert (await second.expect("error"))["code"] == "bad_signature"
    await first.close()
    await second.close()


async def test_nothing_before_auth(relay: RelayServer) -> None:
    client = await WSClient.connect(relay)
    await client.send_frame("ping")
    assert (await client.expect("error"))["code"] == "unauthenticated"
    await client.send_frame("sub", room=bytes(32), after=0)
    assert (await client.expect("error"))["code"] == "unauthenticated"
    await client.send_frame("ping")
    assert (await client.expect("error"))["code"] == "unauthenticated"
    with pytest.raises(websockets.ConnectionClosed) as info:
        await client.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008


async def test_auth_timeout_closes(relay_factory: RelayFactory) -> None:
    relay = relay_factory(auth_timeout_seconds=0.3)
    client = await WSClient.connect(relay)
    stale_nonce = client.nonce
    assert (await client.expect("error", timeout=3))["code"] == "auth_timeout"
    with pytest.raises(websockets.ConnectionClosed):
        await client.recv(timeout=3)
    # A stale challenge from that closed connection is worthless on a new one.
    fresh = await WSClient.connect(relay)
    await fresh.send(auth_frame([MemberKeyPair.generate()], fresh.origin, stale_nonce))
    assert (await fresh.expect("error"))["code"] == "bad_signature"
    await fresh.close()


async def test_keys_per_connection_limit(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_keys_per_connection=2)
    keys = [MemberKeyPair.generate() for _ in range(3)]
    client = await WSClient.connect(relay)
    await client.send(auth_frame(keys, client.origin, client.nonce))
    assert (await client.expect("error"))["code"] == "too_many_keys"
    await client.auth(keys[:2])
    await client.send(auth_frame(keys[2:], client.origin, client.nonce))
    assert (await client.expect("error"))["code"] == "too_many_keys"
    await client.send_frame("ping")
    await client.expect("pong")  # still open and working
    await client.close()


async def test_connections_per_address(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_connections_per_address=2)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    a = await WSClient.connect(relay, [room.facilitator])
    b = await WSClient.connect(relay, [room.facilitator])
    ws = await websockets.connect(relay.ws_url)
    closed = await closed_with(lambda: asyncio.wait_for(ws.recv(), 5))
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1013
    # The others keep working, and a slot frees up when one leaves.
    await a.send_frame("ping")
    await a.expect("pong")
    await b.close()
    await asyncio.sleep(0.2)
    c = await WSClient.connect(relay, [room.facilitator])
    await c.send_frame("ping")
    await c.expect("pong")
    await a.close()
    await c.close()


async def test_text_frame_closes_1003(relay: RelayServer) -> None:
    client = await WSClient.connect(relay, [MemberKeyPair.generate()])
    await client.ws.send("hello")
    assert (await client.expect("error"))["code"] == "malformed"
    with pytest.raises(websockets.ConnectionClosed) as info:
        await client.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1003


async def test_frame_is_canonical_cbor(relay: RelayServer) -> None:
    client = await WSClient.connect(relay, [MemberKeyPair.generate()])
    await client.send(frame("ping"))
    await client.expect("pong")
    await client.close()


async def test_total_connection_limit(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_connections=1)
    first = await WSClient.connect(relay, [MemberKeyPair.generate()])
    ws = await websockets.connect(relay.ws_url)
    closed = await closed_with(lambda: asyncio.wait_for(ws.recv(), 5))
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1013
    await first.send_frame("ping")
    await first.expect("pong")
    await first.close()


async def test_a_repeated_signature_is_refused_before_any_is_checked(
    relay: RelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Auth amplification (issue 12): one key and signature repeated in one frame cost
    one Ed25519 verification each on the event loop (1,024 in the report)."""
    a = MemberKeyPair.generate()
    checked: list[bytes] = []
    real = relayauth.verify_challenge

    def counting(key: bytes, *args: object) -> None:
        checked.append(key)
        real(key, *args)  # type: ignore[arg-type]

    # The relay runs in this process (a thread), so it calls the patched function.
    monkeypatch.setattr(relayauth, "verify_challenge", counting)
    client = await WSClient.connect(relay)
    sig = relayauth.sign_challenge(a.sign_seed, client.origin, client.nonce)
    await client.send_frame("auth", keys=[{"key": a.public.sign, "sig": sig}] * 60)
    assert (await client.expect("error"))["code"] == "duplicate_keys"
    assert checked == []
    await client.auth([a])  # the connection may still authenticate properly
    assert checked == [a.public.sign]
    await client.close()


async def test_a_large_frame_before_authentication_is_refused_unread(
    relay: RelayServer,
) -> None:
    """Before authentication only an auth frame is expected, and one for
    ``max_keys_per_connection`` keys is small: anything larger is refused by its
    length and the connection closed (the 1,024-copy frame of the report is 111 KB,
    and decoding it took 24 ms)."""
    a = MemberKeyPair.generate()
    client = await WSClient.connect(relay)
    sig = relayauth.sign_challenge(a.sign_seed, client.origin, client.nonce)
    await client.send_frame("auth", keys=[{"key": a.public.sign, "sig": sig}] * 1024)
    assert (await client.expect("error"))["code"] == "frame_too_large"
    await closed_with(lambda: client.recv(timeout=5))
