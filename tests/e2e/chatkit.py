"""Shared by the chat screen's tests: a relay, two members in a room, and reading the screen.

``BACKCHANNEL_OLD_TUI=REV`` runs the tests against the chat screen of git
revision REV instead (loaded from git, nothing written to the tree), to check
that a test fails on the code it was written to fix.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

from textual.widgets import Label, RichLog

from backchannel.client.core import Client, Room
from backchannel.client.store import Store
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.server.config import Settings
from tests.server.helpers import RelayServer

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
ROOT = Path(__file__).resolve().parents[2]


def _chat_app() -> Any:
    rev = os.environ.get("BACKCHANNEL_OLD_TUI")
    if not rev:
        from backchannel.client.tui import ChatApp

        return ChatApp
    source = subprocess.run(
        ["git", "show", f"{rev}:client/tui.py"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    module = types.ModuleType("backchannel.client._old_tui")
    module.__package__ = "backchannel.client"
    sys.modules[module.__name__] = module
    exec(compile(source, "old_tui.py", "exec"), module.__dict__)
    return module.ChatApp


ChatApp = _chat_app()


def start_relay(tmp_path: Path, **settings: Any) -> RelayServer:
    return RelayServer(
        Settings(
            data_dir=tmp_path,
            database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db",
            **settings,
        )
    ).start()


def make_client(home: Path, relay: RelayServer, name: str) -> Client:
    store = Store.create(home, "pw", **FAST)
    Client.init_profile(store, relay.url, name)
    return Client(store)


async def sync(*pairs: tuple[Client, Room]) -> None:
    for client, r in pairs:
        async with client.connect([r]) as sock:
            await client.pump(sock, [r], idle=0.05)


async def add_member(
    fac: Client, room: Room, home: Path, relay: RelayServer, name: str
) -> tuple[Client, Room]:
    client = make_client(home, relay, name)
    joined = await client.join(
        await fac.invite(room, "participant", 3600, 1), accept_rules=lambda rules: True
    )
    await sync((client, joined), (fac, room))
    return client, joined


async def make_pair(
    tmp_path: Path, relay: RelayServer, rules: L.Rules | None = None
) -> tuple[Client, Room, Client, Room]:
    fac = make_client(tmp_path / "fac", relay, "Farida")
    ann = make_client(tmp_path / "ann", relay, "Ann")
    room = await fac.create_room("Water talks", rules or L.Rules(mode="chatham"))
    code = await fac.invite(room, "participant", 3600, 1)
    ann_room = await ann.join(code, accept_rules=lambda rules: True)
    # Both come online once so keys and profiles are exchanged.
    await sync((fac, room), (ann, ann_room), (fac, room))
    return fac, room, ann, ann_room


async def close(*clients: Client) -> None:
    for client in clients:
        await client.aclose()
        client.store.close()


def screen_text(app: Any) -> str:
    log = app.query_one("#log", RichLog)
    return "\n".join(strip.text for strip in log.lines)


def panel_text(app: Any, selector: str) -> str:
    return "\n".join(str(label.render()) for label in app.query_one(selector).query(Label))


def composer_text(app: Any) -> str:
    widget = app.query_one("#input")
    return widget.text if hasattr(widget, "document") else widget.value


def set_composer(app: Any, text: str) -> None:
    widget = app.query_one("#input")
    if hasattr(widget, "document"):
        widget.load_text(text)
    else:
        widget.value = text


async def wait_until(pilot: Any, check: Any, what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} never happened")
        await pilot.pause(0.1)


async def wait_for(app: Any, pilot: Any, needle: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while needle not in screen_text(app):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{needle!r} never appeared:\n{screen_text(app)}")
        await pilot.pause(0.1)


async def connected(app: Any, pilot: Any) -> None:
    await wait_until(pilot, lambda: app.sock is not None, "connecting")


async def type_line(pilot: Any, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")
