"""A joiner learns the room's title as soon as the facilitator sees it join, and its
local name follows the title once (docs/client.md, "Room titles")."""

from __future__ import annotations

import asyncio
import contextlib

from backchannel.client.core import Client, Room
from backchannel.protocol import roomlog as L
from tests.client.helpers import People, online


async def stay_online(client: Client, room: Room) -> None:
    async with client.connect([room]) as sock:
        await client.pump(sock, [room], forever=True)


async def until_titled(client: Client, room: Room) -> Room:
    for _ in range(40):
        await online(client, room)
        if client.room(room.room_id.hex()[:8]).title:
            break
        await asyncio.sleep(0.05)
    return client.room(room.room_id.hex()[:8])


async def test_the_title_reaches_a_joiner_while_the_facilitator_stays_silent(
    people: People,
) -> None:
    fac = people.new("fac")
    room = await fac.create_room("Water Talks", L.Rules())
    code = await fac.invite(room, "participant", 3600, 1)
    # The facilitator is online (as in the chat screen) and never speaks.
    live = asyncio.create_task(stay_online(fac, room))
    await asyncio.sleep(0.3)
    try:
        ann = people.new("ann")
        joined = await ann.join(code, accept_rules=lambda r: True)
        placeholder = joined.name
        assert placeholder.startswith("room-")
        assert joined.title == ""
        titled = await until_titled(ann, joined)
    finally:
        live.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await live
    assert titled.title == "Water Talks"
    # Named after the title, once; the name `join` printed still finds the room.
    assert titled.name == "water-talks"
    assert ann.room(placeholder).room_id == titled.room_id
    assert ann.room("water-talks").room_id == titled.room_id
    notices = [line.text for line in ann.lines(titled) if line.kind == "notice"]
    assert "this room is now called water-talks here (" + placeholder + " still works)" in notices


async def test_a_name_the_user_chose_is_kept_when_the_title_arrives(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("Water Talks", L.Rules())
    code = await fac.invite(room, "participant", 3600, 1)
    ann = people.new("ann")
    joined = await ann.join(code, accept_rules=lambda r: True)
    joined.name = "my-dialogue"
    ann.room_store.save(joined)
    await online(ann, joined)
    await online(fac, room)  # hands out its key and the title
    await online(ann, joined)
    found = ann.room("my-dialogue")
    assert found.title == "Water Talks"
    assert found.alias is None
    assert found.name == "my-dialogue"
