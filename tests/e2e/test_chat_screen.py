"""The chat screen, driven headlessly against a real relay: typing, sending,
receiving, slash commands, rules always visible, hostile text inert."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from textual.widgets import RichLog, Static

from backchannel.client.core import Client, Room
from backchannel.client.store import Store
from backchannel.client.tui import ChatApp
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.server.config import Settings
from tests.server.helpers import RelayServer

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(data_dir=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db")
    ).start()
    yield server
    server.stop()


def make_client(home: Path, relay: RelayServer, name: str) -> Client:
    store = Store.create(home, "pw", **FAST)
    Client.init_profile(store, relay.url, name)
    return Client(store)


@pytest.fixture
async def pair(
    tmp_path: Path, relay: RelayServer
) -> AsyncIterator[tuple[Client, Room, Client, Room]]:
    fac = make_client(tmp_path / "fac", relay, "Farida")
    ann = make_client(tmp_path / "ann", relay, "Ann")
    room = await fac.create_room("Water talks", L.Rules(mode="chatham"))
    code = await fac.invite(room, "participant", 3600, 1)
    ann_room = await ann.join(code, accept_rules=lambda rules: True)
    # Both come online once so keys and profiles are exchanged.
    for client, r in ((fac, room), (ann, ann_room), (fac, room)):
        async with client.connect([r]) as sock:
            await client.pump(sock, [r], idle=0.05)
    yield fac, room, ann, ann_room
    for client in (fac, ann):
        await client.aclose()
        client.store.close()


def screen_text(app: ChatApp) -> str:
    log = app.query_one("#log", RichLog)
    return "\n".join(strip.text for strip in log.lines)


async def wait_for(app: ChatApp, pilot, needle: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while needle not in screen_text(app):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{needle!r} never appeared:\n{screen_text(app)}")
        await pilot.pause(0.1)


async def test_type_send_receive_and_slash_commands(
    pair: tuple[Client, Room, Client, Room],
) -> None:
    fac, room, ann, ann_room = pair
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        rules = app.query_one("#rules", Static)
        assert "CHATHAM HOUSE" in str(rules.render())
        await wait_for(app, pilot, "")
        while app.sock is None:
            await pilot.pause(0.1)

        await pilot.click("#input")
        await pilot.press(*"a phased approach could work")
        await pilot.press("enter")
        await wait_for(app, pilot, "you: a phased approach could work")

        # The facilitator, on its own connection, receives it attributed to Ann.
        async with fac.connect([room]) as sock:
            await fac.pump(sock, [room], idle=0.1)
            await fac.send_text(sock, room, "\x1b[2J\u202eagreed in principle")
        got = [(line.text, fac.display_name(room, line.sender or b"")) for line in fac.lines(room)]
        assert ("a phased approach could work", "Ann") in got

        # The reply arrives live; escape sequences and bidi overrides are inert.
        await wait_for(app, pilot, "agreed in principle")
        shown = screen_text(app)
        assert "\x1b" not in shown
        assert "\u202e" not in shown
        assert "<U+001B>[2J<U+202E>agreed in principle" in shown
        assert "Farida: " in shown

        await pilot.press(*"/who")
        await pilot.press("enter")
        await wait_for(app, pilot, "Farida — facilitator")
        await pilot.press(*"/rules")
        await pilot.press("enter")
        await wait_for(app, pilot, "never attributed")
        await pilot.press(*"/nonsense")
        await pilot.press("enter")
        await wait_for(app, pilot, "unknown command /nonsense")


async def test_unread_counts_for_other_rooms(pair: tuple[Client, Room, Client, Room]) -> None:
    fac, _room, ann, ann_room = pair
    other = await fac.create_room("Second track", L.Rules())
    ann_other = await ann.join(
        await fac.invite(other, "participant", 3600, 1), accept_rules=lambda rules: True
    )
    for client, r in ((ann, ann_other), (fac, other)):
        async with client.connect([r]) as sock:
            await client.pump(sock, [r], idle=0.05)
    app = ChatApp(ann, ann_room)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.sock is None:
            await pilot.pause(0.1)
        async with fac.connect([other]) as sock:
            await fac.pump(sock, [other], idle=0.05)
            await fac.send_text(sock, other, "over in the other room")
        deadline = asyncio.get_running_loop().time() + 10
        while app.unread.get(ann_other.room_id) != 1:
            assert asyncio.get_running_loop().time() < deadline, app.unread
            await pilot.pause(0.1)
        assert "over in the other room" not in screen_text(app)
