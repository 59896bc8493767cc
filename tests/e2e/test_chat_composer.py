"""The chat screen's composer, through the real screen and a real relay: multi-line
text and pastes, text kept when a send fails, earlier sends recalled."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from textual import events

from backchannel.client.core import Client, Room
from tests.e2e.chatkit import (
    ChatApp,
    close,
    composer_text,
    connected,
    make_pair,
    screen_text,
    set_composer,
    start_relay,
    sync,
    type_line,
    wait_for,
)
from tests.server.helpers import RelayServer


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    # Small messages only, so that a send can be refused for its size.
    server = start_relay(tmp_path, max_message_bytes=2048)
    yield server
    server.stop()


@pytest.fixture
async def pair(
    tmp_path: Path, relay: RelayServer
) -> AsyncIterator[tuple[Client, Room, Client, Room]]:
    fac, room, ann, ann_room = await make_pair(tmp_path, relay)
    yield fac, room, ann, ann_room
    await close(fac, ann)


def texts(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "message"]


async def test_a_pasted_paragraph_is_sent_whole_and_ctrl_j_breaks_lines(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, room, ann, ann_room = pair
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        # A bracketed paste, as a terminal delivers it: the line breaks stay in the
        # composer instead of sending the first line and dropping the rest.
        app.post_message(
            events.Paste("first point\nsecond point\nthird point")
        )
        await pilot.pause(0.2)
        assert composer_text(app) == "first point\nsecond point\nthird point"
        await pilot.press("enter")
        await wait_for(app, pilot, "third point")
        assert composer_text(app) == ""
        # Further lines hang under the text, never in the time column where a line
        # of its own would start.
        shown = [row.rstrip() for row in screen_text(app).splitlines()]
        assert shown[-2:] == ["      second point", "      third point"]
        await pilot.press(*"one", "ctrl+j", *"two")
        assert composer_text(app) == "one\ntwo"
        await pilot.press("enter")
        await wait_for(app, pilot, "two")
    await sync((fac, room))
    assert texts(fac, room)[-2:] == ["first point\nsecond point\nthird point", "one\ntwo"]


async def test_a_refused_send_keeps_its_text_and_says_why(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, room, ann, ann_room = pair
    app = ChatApp(ann, ann_room)
    long = "x" * 3000
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        app.post_message(events.Paste(long))
        await pilot.pause(0.2)
        await pilot.press("enter")
        await wait_for(app, pilot, "shorten it")
        # Nothing is lost: the text is still there to be cut down and sent again.
        assert composer_text(app) == long
        # A command that fails keeps its text too, to be corrected.
        set_composer(app, "/sidebar Nobody hi")
        await pilot.press("enter")
        await wait_for(app, pilot, "no member")
        assert composer_text(app) == "/sidebar Nobody hi"
    await sync((fac, room))
    assert long not in texts(fac, room)


async def test_a_send_while_disconnected_is_queued_and_goes_on_reconnect(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, room, ann, ann_room = pair
    app = ChatApp(ann, ann_room, connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await type_line(pilot, "are we on")
        await wait_for(app, pilot, "queued")
        await wait_for(app, pilot, "you: are we on")
        assert composer_text(app) == ""
        # A sidebar cannot be queued (it may need keys from the relay): kept, not lost.
        await type_line(pilot, "/sidebar Farida just us")
        await wait_for(app, pilot, "the sidebar was not sent")
        assert composer_text(app) == "/sidebar Farida just us"
    # The next connection, any command or screen, sends it first.
    await sync((ann, ann_room), (fac, room))
    assert "are we on" in [line.text for line in fac.lines(room)]


async def test_up_and_down_bring_back_earlier_sends(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    _fac, _room, ann, ann_room = pair
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        await connected(app, pilot)
        await type_line(pilot, "first")
        await type_line(pilot, "second")
        await wait_for(app, pilot, "you: second")
        await pilot.press(*"draft")
        await pilot.press("up")
        assert composer_text(app) == "second"
        await pilot.press("up")
        assert composer_text(app) == "first"
        await pilot.press("down", "down")
        assert composer_text(app) == "draft"
