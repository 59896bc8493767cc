"""Issue 13's scripted dialogue: a facilitator in the real chat screen (Textual's pilot),
a participant through ``backchannel daemon``'s JSON interface, a second participant
through the plain commands, all on one real relay.

Short read-aloud invites, a multi-line message, the stable line schema (ids, sender
fingerprints, send times), a sidebar to a name with spaces, a role change that stops
a post, a rule change everyone is told about, the title reaching joiners, switching
rooms in the screen with an unread count, commands that need no passphrase while the
daemon runs, and the relay going away and coming back (offline reads, a queued send
delivered once, the daemon reconnecting by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backchannel.client.rpc import DaemonClient
from backchannel.protocol import roomlog as L
from backchannel.server.config import Settings
from tests.e2e.chatkit import (
    ChatApp,
    close,
    connected,
    make_client,
    screen_text,
    type_line,
    wait_for,
    wait_until,
)
from tests.server.helpers import RelayServer

PASS = "pw"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[list[RelayServer]]:
    """A list holding the relay, so the test can stop it and start it again where its
    clients know it (same port, same database)."""
    servers = [
        RelayServer(
            Settings(
                data_dir=tmp_path / "relay", database_url=f"sqlite+aiosqlite:///{tmp_path}/r.db"
            )
        ).start()
    ]
    yield servers
    with contextlib.suppress(Exception):
        servers[-1].stop()


def env(home: Path, *, passphrase: bool = True) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "BACKCHANNEL_PASSPHRASE"}
    out |= {"BACKCHANNEL_HOME": str(home), "BACKCHANNEL_KDF_PROFILE": "test-insecure"}
    if passphrase:
        out["BACKCHANNEL_PASSPHRASE"] = PASS
    return out


async def cmd(home: Path, *args: str, passphrase: bool = True, ok: bool = True) -> Any:
    """The real command, off the event loop (the chat screen keeps running meanwhile)."""

    def go() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "backchannel.client", *args],
            env=env(home, passphrase=passphrase),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    done = await asyncio.to_thread(go)
    if ok:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


async def next_line(rpc: DaemonClient, want: Any) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        for event in rpc.notifications():
            if want(event):
                return event
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(asyncio.to_thread(go), 30)


async def test_a_three_person_dialogue_through_screen_daemon_and_commands(
    tmp_path: Path, relay: list[RelayServer]
) -> None:
    server = relay[0]
    fac = make_client(tmp_path / "fac", server, "Farida")
    room = await fac.create_room("Water talks", L.Rules(mode="chatham"))
    side = await fac.create_room("Drafting group", L.Rules(mode="attributed"))
    homes = {"ann": tmp_path / "ann", "bob": tmp_path / "bob"}
    names = {"ann": "Ann Aldridge", "bob": "Maria del Mar"}
    local = {}
    for who, home in homes.items():
        await cmd(home, "init", "--relay", server.url, "--name", names[who])
        code = await fac.invite(room, "participant", 3600, 1)
        url, short = code.split()
        assert url == server.url
        assert len(short) <= 60  # read aloud: the relay's address plus 60 characters
        joined = await cmd(home, "join", code, "--accept-rules")
        local[who] = joined.stdout.strip()
    side_code = await fac.invite(side, "participant", 3600, 1)
    await cmd(homes["bob"], "join", side_code, "--accept-rules")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "backchannel.client", "daemon"],
        env=env(homes["ann"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while (rpc := DaemonClient.connect(homes["ann"], timeout=60)) is None:
            assert time.monotonic() < deadline, "the daemon did not start"
            await asyncio.sleep(0.05)
        stream = DaemonClient.connect(homes["ann"], timeout=60)
        assert stream is not None
        stream.call("subscribe")
        app = ChatApp(fac, room)
        async with app.run_test(size=(160, 40)) as pilot:
            await connected(app, pilot)
            # The title reaches a joiner the first time both are online, without the
            # facilitator saying anything: her local name for the room comes from it.
            await cmd(homes["bob"], "read", local["bob"])
            rooms = await cmd(homes["bob"], "rooms", "--json")
            titles = {r["id"]: r["title"] for r in json.loads(rooms.stdout)}
            assert titles[room.room_id.hex()] == "Water talks"

            # A multi-line message from the screen reaches the daemon whole, with the
            # facilitator's fingerprint and the time it was sent.
            before = int(time.time())
            await pilot.press(*"first point", "ctrl+j", *"second point", "enter")
            heard = await next_line(stream, lambda e: e["kind"] == "message")
            assert heard["text"] == "first point\nsecond point"
            assert heard["fingerprint"] == room.state.members[room.me].key.fingerprint().hex()
            assert before - 1 <= heard["ts"] <= heard["received"]
            assert len(heard["id"]) == 32

            # Ann answers through the daemon; the screen shows it.
            reply = await asyncio.to_thread(
                rpc.call, "send", room=local["ann"], text="we can live with joint monitoring"
            )
            await wait_for(app, pilot, "we can live with joint monitoring", timeout=20)

            # Maria, through the commands: her send prints the id every reader sees.
            sent = await cmd(homes["bob"], "send", local["bob"], "the 2019 figures first")
            await wait_for(app, pilot, "the 2019 figures first", timeout=20)
            seen = await next_line(stream, lambda e: e["text"] == "the 2019 figures first")
            assert seen["id"] == sent.stdout.strip()

            # A sidebar to a name with spaces, quoted as in a shell.
            await type_line(pilot, '/sidebar "Maria del Mar" only between us')
            await wait_for(app, pilot, "[sidebar to Maria del Mar]", timeout=20)
            read = await cmd(homes["bob"], "read", local["bob"])
            assert "(sidebar from Farida" in read.stdout
            assert "only between us" in read.stdout
            assert "first point\n    second point" in read.stdout  # continuation indented

            # The facilitator makes Ann an observer: her next post is refused, and
            # the refusal is the daemon's typed error, not a traceback.
            await type_line(pilot, '/role "Ann Aldridge" observer')
            await wait_for(app, pilot, "is now observer", timeout=20)
            await next_line(stream, lambda e: e["kind"] == "notice" and "observer" in e["text"])
            with pytest.raises(Exception, match="observers cannot post"):
                await asyncio.to_thread(rpc.call, "send", room=local["ann"], text="still here")

            # A rule change from the screen reaches everyone as a notice.
            await type_line(pilot, "/rules retention 3d")
            await wait_for(app, pilot, "change the rules for everyone")
            await type_line(pilot, "y")
            notice = await next_line(
                stream, lambda e: e["kind"] == "notice" and "rules changed" in e["text"]
            )
            assert notice["id"] is None

            # The facilitator switches to the other room; what is said in the first
            # meanwhile is counted, not shown, until it switches back.
            await pilot.press("ctrl+n")
            assert app.room.room_id == side.room_id
            await type_line(pilot, "drafting starts at ten")
            await wait_for(app, pilot, "drafting starts at ten", timeout=20)
            await cmd(homes["bob"], "send", local["bob"], "said while you were away")
            await wait_until(
                pilot, lambda: app.unread.get(room.room_id) == 1, "the unread count", timeout=20
            )
            assert "said while you were away" not in screen_text(app)
            await pilot.press("ctrl+p")
            await wait_for(app, pilot, "said while you were away", timeout=20)

        # While the daemon runs, Ann's commands need no passphrase.
        members = await cmd(homes["ann"], "members", local["ann"], "--json", passphrase=False)
        roles = {m["name"]: m["role"] for m in json.loads(members.stdout)}
        assert roles["Ann Aldridge"] == "observer"
        assert roles["Farida"] == "facilitator"
        mine = await asyncio.to_thread(rpc.call, "read", room=local["ann"])
        assert reply["id"] in {e["id"] for e in mine}

        # The relay goes down: Maria reads and lists from what she holds, and what
        # she sends is queued; when it is back, it goes out once, and Ann's daemon,
        # which reconnected by itself, streams it.
        server.stop()
        offline = await cmd(homes["bob"], "read", local["bob"])
        assert "showing what is stored locally" in offline.stderr
        assert "the 2019 figures first" in offline.stdout
        queued = await cmd(homes["bob"], "send", local["bob"], "written on the train")
        assert "queued" in queued.stderr
        relay.append(RelayServer(server.settings, port=server.port).start())
        await cmd(homes["bob"], "read", local["bob"])
        late = await next_line(stream, lambda e: e["text"] == "written on the train")
        assert late["id"] == queued.stdout.strip()
        rpc.close()
        stream.close()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        await close(fac)
