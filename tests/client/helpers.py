"""Shared helpers for tests that drive the real client library against a relay."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from backchannel.client.core import Client, Room
from backchannel.client.store import Store
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from tests.server.helpers import FakeClock, RelayServer

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}


class People:
    def __init__(self, tmp_path: Path, relay: RelayServer, clock: FakeClock) -> None:
        self.tmp_path, self.relay, self.clock = tmp_path, relay, clock
        self.clients: list[Client] = []

    def new(self, name: str) -> Client:
        store = Store.create(self.tmp_path / name, "pw", **FAST)
        Client.init_profile(store, self.relay.url, name)
        client = Client(store, clock=self.clock)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
            client.store.close()


async def online(client: Client, room: Room) -> None:
    async with client.connect([room]) as sock:
        await client.pump(sock, [room], idle=0.05)
        await client.retry_stash(room)


async def say(client: Client, room: Room, text: str) -> None:
    async with client.connect([room]) as sock:
        await client.pump(sock, [room], idle=0.05)
        await client.send_text(sock, room, text)


def heard(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "message"]


async def room_with(people: People, *names: str, rules: L.Rules | None = None) -> Any:
    fac = people.new("fac")
    room = await fac.create_room("t", rules or L.Rules())
    joined = {}
    for name in names:
        client = people.new(name)
        code = await fac.invite(room, "participant", 3600, 1)
        joined[name] = (client, await client.join(code, accept_rules=lambda r: True))
    for client, r in [(fac, room), *joined.values(), (fac, room)]:
        await online(client, r)
    return fac, room, joined


class Switch(Protocol):
    on: bool


async def handle_next_message(client: Client, room: Room, counting: Switch) -> None:
    """Connect, handle frames up to the next room message, and handle that one with
    ``counting.on`` set (the store-row counters of the tests and the bench)."""
    async with client.connect([room]) as sock:
        frame = await sock.recv(timeout=10)
        while frame.type != "msg":
            await client.handle_frame(sock, {room.room_id: room}, frame)
            frame = await sock.recv(timeout=10)
        counting.on = True
        await client.handle_frame(sock, {room.room_id: room}, frame)
        counting.on = False
