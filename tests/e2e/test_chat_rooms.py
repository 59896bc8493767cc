"""Reading in the chat screen, through the real screen and a real relay: switching rooms,
unread counts and the new-lines marker, keeping your place, days, notices, narrow
terminals."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from backchannel.client.core import Client, Room
from backchannel.protocol import roomlog as L
from tests.e2e.chatkit import (
    ChatApp,
    close,
    connected,
    make_pair,
    panel_text,
    screen_text,
    start_relay,
    sync,
    type_line,
    wait_for,
    wait_until,
)
from tests.server.helpers import RelayServer

NEW = "new since you last looked"


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


async def second_room(
    fac: Client, ann: Client, rules: L.Rules | None = None
) -> tuple[Room, Room]:
    other = await fac.create_room("Second track", rules or L.Rules())
    ann_other = await ann.join(
        await fac.invite(other, "participant", 3600, 1), accept_rules=lambda rules: True
    )
    await sync((ann, ann_other), (fac, other))
    return other, ann_other


async def say(client: Client, room: Room, text: str) -> None:
    async with client.connect([room]) as sock:
        await client.pump(sock, [room], idle=0.05)
        await client.send_text(sock, room, text)


async def test_switching_rooms_with_keys_commands_and_clicks(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, _room, ann, ann_room = pair
    other, ann_other = await second_room(fac, ann)
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        await type_line(pilot, "a draft for the first room")
        await say(fac, other, "over in the other room")
        await wait_until(pilot, lambda: app.unread.get(ann_other.room_id) == 1, "the count")
        assert "(1)" in panel_text(app, "#rooms")
        assert "over in the other room" not in screen_text(app)

        await pilot.press(*"half-typed")
        await pilot.press("ctrl+n")
        assert app.room.room_id == ann_other.room_id
        await wait_for(app, pilot, "over in the other room")
        # The line you had not seen comes after the marker; the count is gone.
        shown = screen_text(app)
        assert shown.index(NEW) < shown.index("over in the other room")
        assert app.unread.get(ann_other.room_id, 0) == 0
        assert "(1)" not in panel_text(app, "#rooms")
        # The draft stayed with its room, and what you write now goes here.
        assert app.query_one("#input").text == ""
        await type_line(pilot, "written in the second room")
        await wait_for(app, pilot, "you: written in the second room")

        order = [r.room_id for r in ann.rooms()]
        await pilot.press(f"alt+{order.index(ann_room.room_id) + 1}")
        assert app.room.room_id == ann_room.room_id
        assert app.query_one("#input").text == "half-typed"
        await wait_for(app, pilot, "a draft for the first room")

        app.query_one("#input").load_text("")
        await type_line(pilot, f"/room {ann_other.name}")
        assert app.room.room_id == ann_other.room_id
        await pilot.press("ctrl+p")
        assert app.room.room_id == ann_room.room_id
        # Clicking a room in the list goes there too.
        rooms = app.query_one("#rooms")
        await pilot.click(rooms.children[order.index(ann_other.room_id)])
        await wait_until(pilot, lambda: app.room.room_id == ann_other.room_id, "the click")
    await sync((fac, other))
    assert "written in the second room" in [line.text for line in fac.lines(other)]


async def test_reading_back_keeps_your_place_and_counts_what_arrives(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, room, ann, ann_room = pair
    await say(fac, room, "\n".join(f"point {i}" for i in range(60)))
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 24)) as pilot:
        await connected(app, pilot)
        await wait_for(app, pilot, "point 59")
        log = app.query_one("#log")
        await pilot.press("pageup", "pageup")
        await pilot.pause(0.2)
        # The log scrolled and the composer kept the focus.
        assert app.focused is app.query_one("#input")
        place = log.scroll_y
        assert place < log.max_scroll_y
        await say(fac, room, "arrives while you read")
        await wait_for(app, pilot, "arrives while you read")
        await pilot.pause(0.2)
        assert log.scroll_y == place  # not pulled down
        assert app.unread.get(ann_room.room_id) == 1
        shown = screen_text(app)
        assert shown.index(NEW) < shown.index("arrives while you read")
        for _ in range(6):
            await pilot.press("pagedown")
        await wait_until(pilot, lambda: app.unread.get(ann_room.room_id, 0) == 0, "seen")


async def test_days_are_separated(pair: tuple[Client, Room, Client, Room]) -> None:
    fac, room, ann, ann_room = pair
    two_days_ago = time.time() - 2 * 86400
    ann.ctx.clock = lambda: two_days_ago
    ann.transcript.notice(ann_room, "a line from two days ago")
    ann.ctx.clock = time.time
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        await say(fac, room, "and one today")
        await wait_for(app, pilot, "and one today")
        shown = screen_text(app)
        then, today = datetime.fromtimestamp(two_days_ago), datetime.now()
        first = f"──── {then:%A} {then.day} {then:%B %Y} ────"
        second = f"──── {today:%A} {today.day} {today:%B %Y} ────"
        assert shown.index(first) < shown.index("two days ago") < shown.index(second)
        assert shown.index(second) < shown.index("and one today")


async def test_bell_and_title_for_new_messages_off_in_anonymous_rooms(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, _room, ann, _ann_room = pair
    other, ann_other = await second_room(fac, ann, L.Rules(mode="anonymous"))
    app = ChatApp(ann, ann_other)
    rings: list[int] = []
    app.bell = lambda: rings.append(1)  # type: ignore[method-assign]
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        await say(fac, other, "in the anonymous room")
        await wait_for(app, pilot, "in the anonymous room")
        await pilot.press("ctrl+n")  # now the anonymous room is not in view
        await say(fac, other, "unseen, but no bell here")
        await wait_until(pilot, lambda: app.unread.get(ann_other.room_id) == 1, "the count")
        assert rings == []
        assert app.title == "backchannel"
        await pilot.press("ctrl+p")
        await type_line(pilot, "/notify on")
        await wait_for(app, pilot, "in this room: on")
        await pilot.press("ctrl+n")
        await say(fac, other, "now it rings")
        await wait_until(pilot, lambda: rings == [1], "the bell")
        assert app.title == "backchannel (1 new)"
        await pilot.press("ctrl+p")
        assert app.title == "backchannel"


async def test_a_narrow_terminal_rewraps_and_hides_the_side_panel(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, room, ann, ann_room = pair
    words = " ".join(f"word{i}" for i in range(60))
    await say(fac, room, words)
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        await wait_for(app, pilot, "word59")
        log = app.query_one("#log")
        wide = len(log.lines)
        await pilot.resize_terminal(60, 40)
        await pilot.pause(0.3)
        assert not app.query_one("#side").display or app.query_one("#side").size.width == 0
        assert max(strip.cell_length for strip in log.lines) <= log.scrollable_content_region.width
        assert len(log.lines) > wide
        assert "word59" in screen_text(app)
        await pilot.resize_terminal(120, 40)
        await pilot.pause(0.3)
        assert len(log.lines) == wide
        assert app.query_one("#side").size.width > 0
