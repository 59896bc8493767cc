"""Issue 11, attack 8: our own mistakes must not wedge a room either.

A message the relay would refuse for its size is refused by the client before
anything is stored, shown or sent; a queued message the relay refuses for good
leaves the outbox with a warning instead of being resent first for ever; a
refusal that may pass (a timeout, a busy relay) keeps it for the next try.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backchannel.client import relay as transport
from backchannel.client.core import Client, ClientError, Room
from backchannel.client.outbox import BACK_OFF, BACK_OFF_TRIES, permanent
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import encode
from backchannel.server.config import Settings
from tests.client.helpers import People, heard, online, room_with, say
from tests.server.helpers import FakeClock, RelayServer

#: Just above a padding bucket (4096): a 3,000-byte text pads to 4,096 and passes
#: the cheap lower bound, so only the exact check of the sealed envelope refuses
#: it; a 5,000-byte one pads to 8,192 and is refused before anything is sealed.
MAX_MESSAGE = 4096 + 128


@pytest.fixture
def relay(tmp_path: Path, clock: FakeClock) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(
            data_dir=tmp_path,
            database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db",
            max_message_bytes=MAX_MESSAGE,
        ),
        clock,
    ).start()
    yield server
    server.stop()


def seal(client: Client, room: Room, text: str) -> bytes:
    """Seal through the parts, skipping the size check (as a previous release did)."""
    with client.store.transaction():
        body = encode({"t": "text", "text": text, "ts": client.now()})
        return client.senderkeys.seal(room, body)


def stored_on_relay(relay: RelayServer, room: Room) -> list[bytes]:
    return [m.data for m in relay.call(relay.store.room_messages_after(room.room_id, 0, 100))]


def warnings(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "warning"]


async def test_the_relay_publishes_its_limits_and_the_client_asks_once(
    people: People, relay: RelayServer
) -> None:
    http = people.new("fac").http(relay.url)
    limits = await http.limits()
    assert limits == {
        "max_message_bytes": MAX_MESSAGE,
        "max_frame_bytes": relay.settings.max_frame_bytes,
        "max_event_bytes": relay.settings.max_event_bytes,
        "max_mailbox_depth": relay.settings.max_mailbox_depth,
        "max_inflight_writes": relay.settings.max_inflight_writes,
        "send_rate_per_second": min(
            relay.settings.rate_messages_per_second, relay.settings.key_messages_per_second
        ),
        "send_burst": min(relay.settings.rate_burst, relay.settings.key_burst),
    }
    assert await http.limits() is limits


@pytest.mark.parametrize("size", [3000, 5000, 2_000_000])
async def test_an_oversized_message_is_refused_before_anything_happens(
    people: People, relay: RelayServer, size: int
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    index = fac.senderkeys.outbound(room).index
    before = fac.lines(room)
    async with fac.connect([room]) as sock:
        await fac.pump(sock, [room], idle=0.05)
        with pytest.raises(ClientError) as refused:
            await fac.send_text(sock, room, "x" * size)
        assert fac.outbox.pending() == []
        assert fac.lines(room) == before
        assert fac.senderkeys.outbound(room).index == index
        assert stored_on_relay(relay, room) == []
        await fac.send_text(sock, room, "a shorter one")
    assert str(refused.value) == (
        f"this message is {size:,} bytes; the relay takes at most {MAX_MESSAGE:,}"
        " — shorten it or split it"
    )
    hint = refused.value.hint
    assert hint is not None
    # Measured when sealed (and rolled back), a lower bound when refused before sealing.
    assert ("would be over" in hint) == (size != 3000)
    assert "up to about 2,0" in hint  # the 2,048-byte bucket is the largest that fits
    assert fac.senderkeys.outbound(room).index == index + 1
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["a shorter one"]
    # Had the refused one taken a message number, Ann would see a gap.
    assert warnings(ann, ann_room) == []


async def test_an_oversized_sidebar_is_refused_before_a_session_moves(
    people: People, relay: RelayServer
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    async with fac.connect([room]) as sock:
        await fac.pump(sock, [room], idle=0.05)
        for size in (3000, 5000):
            with pytest.raises(ClientError, match=f"this message is {size:,} bytes"):
                await fac.send_text(sock, room, "y" * size, to=ann_room.me)
        await fac.send_text(sock, room, "a short aside", to=ann_room.me)
    assert [x.text for x in fac.lines(room) if x.kind == "sidebar"] == ["a short aside"]
    await online(ann, ann_room)
    assert [x.text for x in ann.lines(ann_room) if x.kind == "sidebar"] == ["a short aside"]


async def test_a_queued_message_refused_for_good_is_dropped_and_the_rest_go(
    people: People, relay: RelayServer
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    other = await fac.create_room("u", L.Rules())
    # As a previous release left them: too large, sealed, queued (one without a time).
    fac.outbox.queue(room, P.random_bytes(16), seal(fac, room, "secret " * 1000), ts=fac.now())
    fac.outbox.queue(room, P.random_bytes(16), seal(fac, room, "secret " * 2000))
    fac.outbox.queue(room, P.random_bytes(16), seal(fac, room, "queued behind them"))
    fac.outbox.queue(other, P.random_bytes(16), seal(fac, other, "in another room"))
    # One connection for both rooms, as the chat screen has.
    async with fac.connect([room, other]) as sock:
        assert fac.outbox.pending() == []
        await fac.send_text(sock, room, "after them")
        await fac.send_text(sock, other, "elsewhere, after them")
    refusals = [w for w in warnings(fac, room) if "refused by the relay" in w]
    assert len(refusals) == 2
    assert all("(message_too_large) and will not be delivered" in w for w in refusals)
    assert any(" sent at " in w for w in refusals)
    assert any(" sent earlier " in w for w in refusals)
    assert not [w for w in refusals if "secret" in w]
    assert [room.room_id, room.room_id] == [r for r, w in fac.notices if "refused" in w]
    assert len(stored_on_relay(relay, other)) == 2
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["queued behind them", "after them"]
    # The room stays usable on later connections too.
    await say(fac, room, "and later")
    await online(ann, ann_room)
    assert heard(ann, ann_room)[-1] == "and later"
    assert fac.outbox.pending() == []


async def test_a_relay_without_limits_refuses_and_the_outbox_lets_go(
    people: People, relay: RelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]

    async def older_relay(self: transport.RelayHttp) -> dict[str, int]:
        raise transport.RelayError("not_found", "no such route", 404)

    monkeypatch.setattr(transport.RelayHttp, "limits", older_relay)
    async with fac.connect([room]) as sock:
        with pytest.raises(transport.RelayError) as refused:
            await fac.send_text(sock, room, "z" * 5000)
        assert refused.value.code == "message_too_large"
        assert fac.outbox.pending() == []
        await fac.send_text(sock, room, "still here")
    assert [w for w in warnings(fac, room) if "(message_too_large)" in w]
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["still here"]


@pytest.mark.parametrize("code", ["timeout", "rate_limited", "storage_unavailable"])
async def test_a_transient_refusal_keeps_the_message_for_the_next_connection(
    people: People, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    real_request = transport.RelaySocket.request
    tried: list[bytes] = []

    async def refuse(self: transport.RelaySocket, kind: str, **fields: object) -> object:
        if kind == "send":
            tried.append(fields["cid"])  # type: ignore[arg-type]
            raise transport.RelayError(code, "not now")
        return await real_request(self, kind, **fields)  # type: ignore[arg-type]

    monkeypatch.setattr(transport.RelaySocket, "request", refuse)
    with pytest.raises(transport.RelayError):
        await say(fac, room, "first, kept")
    assert len(fac.outbox.pending()) == 1
    fac.outbox.queue(room, P.random_bytes(16), seal(fac, room, "second, kept"), ts=fac.now())
    tried.clear()
    # The flush stops at the first: sending the second before it would reorder them.
    with pytest.raises(transport.RelayError):
        await online(fac, room)
    # A loaded relay ("rate_limited") is tried again after a pause, a few times.
    assert len(tried) == (BACK_OFF_TRIES if code in BACK_OFF else 1)
    assert len(fac.outbox.pending()) == 2
    assert not [w for w in warnings(fac, room) if "refused" in w]
    monkeypatch.setattr(transport.RelaySocket, "request", real_request)
    await online(fac, room)
    assert fac.outbox.pending() == []
    await online(fac, room)  # nothing left to resend
    await online(ann, ann_room)
    assert heard(ann, ann_room) == ["first, kept", "second, kept"]
    assert warnings(ann, ann_room) == []


def test_which_refusals_are_permanent() -> None:
    for code in ("message_too_large", "sender_mismatch", "not_authorized", "not_member"):
        assert permanent(code)
    assert permanent("malformed")
    assert permanent("something_new")  # unknown: a message kept for ever blocks its room
    for code in (
        "timeout",
        "disconnected",
        "unreachable",
        "rate_limited",
        "busy",
        "storage_unavailable",
        "fanout_unavailable",
    ):
        assert not permanent(code)


def test_the_send_command_refuses_a_too_long_text(tmp_path: Path, relay: RelayServer) -> None:
    env = {
        **os.environ,
        "BACKCHANNEL_HOME": str(tmp_path / "fac"),
        "BACKCHANNEL_PASSPHRASE": "a long passphrase for tests",
        "BACKCHANNEL_KDF_PROFILE": "test-insecure",
        "NO_COLOR": "1",
    }

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "backchannel.client", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    assert run("init", "--relay", relay.url, "--name", "F").returncode == 0
    made = run("room", "create", "t")
    assert made.returncode == 0, made.stderr
    room = made.stdout.strip()
    result = run("send", room, stdin="w" * 5000)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: this message is 5,000 bytes; the relay takes at most {MAX_MESSAGE:,}"
        " — shorten it or split it"
    ]
    assert "hint: " in result.stderr
    lines = run("read", room, "--json")
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(x)["kind"] for x in lines.stdout.splitlines()] == []
    assert run("send", room, "short enough").returncode == 0
