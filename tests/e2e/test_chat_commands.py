"""The chat screen's slash commands, through the real screen and a real relay: names
with spaces, recording a safety number, exports, and the facilitator's commands."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backchannel.client.core import Client, Room
from tests.e2e.chatkit import (
    ChatApp,
    add_member,
    close,
    connected,
    make_client,
    make_pair,
    panel_text,
    screen_text,
    set_composer,
    start_relay,
    sync,
    type_line,
    wait_for,
    wait_until,
)
from tests.server.helpers import RelayServer


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    server = start_relay(tmp_path)
    yield server
    server.stop()


@pytest.fixture
async def pair(
    tmp_path: Path, relay: RelayServer
) -> AsyncIterator[tuple[Client, Room, Client, Room]]:
    fac, room, ann, ann_room = await make_pair(tmp_path, relay)
    yield fac, room, ann, ann_room
    await close(fac, ann)


def sidebars(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "sidebar"]


async def test_sidebar_reaches_names_with_spaces_and_says_to_whom(
    tmp_path: Path, relay: RelayServer, pair: tuple[Client, Room, Client, Room]
) -> None:
    fac, room, ann, ann_room = pair
    maria, maria_room = await add_member(fac, room, tmp_path / "maria", relay, "Maria del Mar")
    short, short_room = await add_member(fac, room, tmp_path / "short", relay, "Maria")
    await sync((ann, ann_room))
    app = ChatApp(ann, ann_room)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await connected(app, pilot)
            # Unquoted, the longest run of words that names a member wins: not "Maria".
            await type_line(pilot, "/sidebar Maria del Mar hola, a word in private")
            await wait_for(app, pilot, "a word in private")
            await type_line(pilot, '/sidebar "Maria del Mar" quoted works too')
            await wait_for(app, pilot, "quoted works too")
            await type_line(pilot, "/sidebar Maria only the short one")
            await wait_for(app, pilot, "only the short one")
            shown = screen_text(app)
            # Your own sidebars say to whom they went.
            assert "[sidebar to Maria del Mar] • you: hola, a word in private" in shown
            assert "[sidebar to Maria] • you: only the short one" in shown
        await sync((maria, maria_room), (short, short_room))
        assert sidebars(maria, maria_room) == ["hola, a word in private", "quoted works too"]
        assert sidebars(short, short_room) == ["only the short one"]
    finally:
        await close(maria, short)


async def test_verify_records_a_match_in_the_screen(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    _fac, _room, ann, ann_room = pair
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        await type_line(pilot, "/verify Farida")
        await wait_for(app, pilot, "safety number with Farida")
        await type_line(pilot, "y")
        await wait_for(app, pilot, "Farida is verified")
        assert [m.verified for m in ann.members(ann_room) if m.name == "Farida"] == [True]
        # The members panel shows the mark now.
        await wait_until(pilot, lambda: "✓ Farida" in panel_text(app, "#members"), "the mark")
        assert "y" not in [line.text for line in ann.lines(ann_room)]


async def test_verify_confirm_after_seeing_the_number(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    _fac, _room, ann, ann_room = pair
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        # Not before it was shown: confirming blind would prove nothing.
        await type_line(pilot, "/verify Farida confirm")
        await wait_for(app, pilot, "safety number with Farida")
        await type_line(pilot, "n")
        await wait_for(app, pilot, "cancelled")
        assert [m.verified for m in ann.members(ann_room) if m.name == "Farida"] == [False]
        await type_line(pilot, "/verify Farida confirm")
        await wait_for(app, pilot, "Farida is verified")
        assert [m.verified for m in ann.members(ann_room) if m.name == "Farida"] == [True]


async def test_export_errors_stay_in_the_log_and_files_are_private(
    tmp_path: Path, pair: tuple[Client, Room, Client, Room]
) -> None:
    _fac, _room, ann, ann_room = pair
    app = ChatApp(ann, ann_room)
    out = tmp_path / "out.md"
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        await type_line(pilot, "hello")
        await type_line(pilot, f"/export {tmp_path}/missing/out.md")
        await wait_for(app, pilot, "cannot write")
        assert app.is_running
        set_composer(app, "")  # the failed command stays there to be edited
        await type_line(pilot, f"/export {out}")
        await wait_for(app, pilot, "exported to")
    assert "hello" in out.read_text()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


async def test_facilitator_commands_from_the_screen(
    tmp_path: Path, relay: RelayServer, pair: tuple[Client, Room, Client, Room]
) -> None:
    fac, room, _ann, ann_room = pair
    app = ChatApp(fac, room)
    async with app.run_test(size=(200, 40)) as pilot:
        await connected(app, pilot)
        await type_line(pilot, "/invite observer 1h")
        await wait_for(app, pilot, "as observer for 1h")
        code = app.query_one("#log").entries[-1].plain.splitlines()[-1]
        newcomer = make_client(tmp_path / "obs", relay, "Olu")
        joined = await newcomer.join(code, accept_rules=lambda rules: True)
        assert joined.state.role_of(joined.me) == "observer"
        await newcomer.aclose()
        newcomer.store.close()

        await type_line(pilot, "/invite 2h")
        await wait_for(app, pilot, "as participant for 2h")
        await type_line(pilot, "/invites")
        (open_invite,) = await fac.invites(room)
        await wait_for(app, pilot, f"{open_invite.id} — participant, 1 use(s) left")
        await type_line(pilot, f"/revoke {open_invite.id}")
        await wait_for(app, pilot, f"invite {open_invite.id} revoked")
        assert await fac.invites(room) == []

        await type_line(pilot, "/role Ann observer")
        await wait_for(app, pilot, "Ann is now observer")
        assert room.state.role_of(ann_room.me) == "observer"
        await type_line(pilot, "/rules retention 3d")
        await wait_for(app, pilot, "change the rules for everyone")
        await type_line(pilot, "y")
        await wait_for(app, pilot, "rules changed")
        assert room.state.rules.retention == 3 * 86400
        assert "messages kept 3 d" in str(app.query_one("#rules").render())

        await type_line(pilot, "/remove Ann")
        await wait_for(app, pilot, "remove Ann from the room?")
        assert ann_room.me in room.state.members  # nothing done yet
        await type_line(pilot, "yes")
        await wait_for(app, pilot, "removed Ann")
    await fac.sync_log(room)
    assert ann_room.me not in room.state.members
