"""Issue #6 §3.1: the relay's WebSocket frame handling under random and mutated frames.

Two layers:

* ``parse_client_frame`` directly: random bytes and byte/structural mutations of every
  valid client frame raise only ``FrameError`` (with a documented code), never anything
  else;
* a real relay (uvicorn on 127.0.0.1) and a real authenticated WebSocket: sequences of
  random and mutated frames each get at most error frames with documented codes, the
  connection stays open and answers ``ping`` after every frame, no task dies with an
  unretrieved exception, ``internal_errors`` stays 0, and afterwards the same connection
  and a fresh one still send and receive room messages.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backchannel.protocol.keys import MemberKeyPair
from backchannel.server.config import Settings
from backchannel.server.frames import FrameError, parse_client_frame
from tests.server.helpers import RelayServer, TestRoom, WSClient, frame

from .test_decoders import byte_mutation, structural_mutation

#: Error codes a frame can earn (docs/relay-api.md).
FRAME_CODES = {
    "malformed",
    "unsupported_version",
    "frame_too_large",
    "unauthenticated",
    "bad_signature",
    "too_many_keys",
    "not_authenticated",
    "not_authorized",
    "too_many_subscriptions",
    "message_too_large",
    "rate_limited",
    "mailbox_full",
}
MAX_FRAME = 64 * 1024
ROOM = os.urandom(32)
KEY = os.urandom(32)


def valid_frames(room: bytes, a: bytes, b: bytes, nonce_sig: bytes = b"\x01" * 64) -> list[bytes]:
    return [
        frame("auth", keys=[{"key": a, "sig": nonce_sig}]),
        frame("sub", room=room, after=0),
        frame("sub", room=room, after=3),
        frame("unsub", room=room),
        frame("send", room=room, from_=a, cid=os.urandom(16), data=b"c" * 48),
        frame("psend", room=room, from_=a, to=b, cid=os.urandom(16), data=b"p" * 48),
        frame("ack", ids=[1, 2, 3]),
        frame("ping"),
    ]


SAMPLES = valid_frames(ROOM, KEY, os.urandom(32))


def frame_strategy(samples: list[bytes]) -> st.SearchStrategy[bytes]:
    sample = st.sampled_from(samples)
    return st.one_of(
        st.binary(max_size=512),
        sample.flatmap(byte_mutation),
        sample.flatmap(structural_mutation),
        sample.flatmap(structural_mutation),
    )


@settings(deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(data=frame_strategy(SAMPLES))
def test_parse_client_frame_raises_only_frame_errors(data: bytes) -> None:
    code = None
    try:
        parse_client_frame(data, max_size=MAX_FRAME)
    except FrameError as exc:
        code = exc.code
    assert code in {None, "malformed", "unsupported_version", "frame_too_large"}, code


# --- through a real relay ----------------------------------------------------------------------


@dataclass
class Live:
    relay: RelayServer
    room: TestRoom
    fac: MemberKeyPair
    bob: MemberKeyPair
    loop_errors: list[dict[str, Any]]
    samples: list[bytes]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp: Path = tmp_path_factory.mktemp("ws-fuzz")
    relay = RelayServer(
        Settings(
            data_dir=tmp,
            database_url=f"sqlite+aiosqlite:///{tmp}/relay.db",
            max_frame_bytes=MAX_FRAME,
            rate_messages_per_second=1000,
            rate_burst=1000,
            key_burst=1000,
            frame_burst=1000,
            max_inflight_writes=1000,
            frame_rate_per_second=1000,
            key_messages_per_second=1000,
        )
    ).start()
    errors: list[dict[str, Any]] = []
    assert relay.loop is not None
    relay.loop.call_soon_threadsafe(
        relay.loop.set_exception_handler, lambda _loop, ctx: errors.append(ctx)
    )

    async def setup() -> tuple[TestRoom, MemberKeyPair]:
        async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
            room = await TestRoom.create(http)
            bob = await room.add_member()
            return room, bob

    room, bob = asyncio.run(setup())
    fac = room.facilitator
    samples = valid_frames(room.id, fac.public.sign, bob.public.sign)
    yield Live(relay, room, fac, bob, errors, samples)
    relay.stop()
    assert relay.app.state.internal_errors == 0


async def ping(client: WSClient) -> list[dict[str, Any]]:
    """Send ping; return the frames that arrived before the pong."""
    await client.send_frame("ping")
    before: list[dict[str, Any]] = []
    while True:
        f = await client.recv(timeout=5)
        if f["t"] == "pong":
            return before
        before.append(f)


async def fuzz_connection(live: Live, frames: list[bytes]) -> None:
    client = await WSClient.connect(live.relay, [live.fac, live.bob])  # type: ignore[arg-type]
    try:
        for data in frames:
            await client.send(data)
            for f in await ping(client):
                if f["t"] == "error":
                    assert f["code"] in FRAME_CODES, f
                    assert f["code"] != "frame_too_large"
        # The same connection still works end to end.
        await client.send_frame("sub", room=live.room.id, after=0)
        await client.expect("synced", room=live.room.id, timeout=5)
        sent = await client.send_msg(live.room.id, live.fac, b"after the fuzz")
        assert sent["t"] == "sent", sent
        msg = await client.expect("msg", seq=sent["seq"], timeout=5)
        assert msg["data"] == b"after the fuzz"
    finally:
        await client.close()


@settings(
    max_examples=int(os.environ.get("BACKCHANNEL_WS_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzzed_frames_through_a_real_connection(live: Live, data: st.DataObject) -> None:
    frames = data.draw(st.lists(frame_strategy(live.samples), min_size=1, max_size=25))
    asyncio.run(fuzz_connection(live, frames))
    assert live.loop_errors == [], live.loop_errors[:3]
    assert live.relay.app.state.internal_errors == 0


async def test_fresh_connection_after_fuzzing(live: Live) -> None:
    client = await WSClient.connect(live.relay, [live.fac])  # type: ignore[arg-type]
    sent = await client.send_msg(live.room.id, live.fac, b"fresh")
    assert sent["t"] == "sent"
    await client.close()
    assert live.loop_errors == []
    assert live.relay.app.state.internal_errors == 0
