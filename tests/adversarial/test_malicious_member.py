"""A spoiler in the room: attacks by a member, through the honest relay.

Every test seats a :class:`~tests.adversarial.spoiler.Spoiler` (the real client
with its checks removed) beside honest members, performs one attack, and
asserts that the honest members keep reading what is sent after it and see a
warning that names the sender.
"""

from __future__ import annotations

from backchannel.client.core import Client, Room
from backchannel.protocol.encoding import encode
from tests.adversarial.spoiler import new_spoiler, seat
from tests.client.helpers import People, heard, online, room_with, say


def warnings(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "warning"]


async def spoiler_room(people: People) -> tuple[Client, Room, Client, Room, Room, Client]:
    """A facilitator, an honest participant (Ann) and a spoiler (Sam), keys exchanged."""
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    sam = new_spoiler(people, "sam")
    sam_room = await seat(people, fac, room, sam)
    for client, r in ((sam, sam_room), (fac, room), (ann, ann_room), (sam, sam_room)):
        await online(client, r)
    return fac, room, ann, ann_room, sam_room, sam


async def test_unreadable_plaintext_does_not_silence_the_room(people: People) -> None:
    """Attack 1: a validly signed and sealed message whose plaintext is not CBOR
    (or not a message) used to raise out of the receive path and stop the room."""
    fac, room, ann, ann_room, sam_room, sam = await spoiler_room(people)
    async with sam.connect([sam_room]) as sock:
        for body in (b"\xff", encode([1, 2]), encode({"t": "text", "text": 7}), b""):
            await sam.post(sock, sam_room, body)  # type: ignore[attr-defined]
    await say(fac, room, "still talking")
    for client, r in ((ann, ann_room), (fac, room)):
        await online(client, r)
        assert heard(client, r) == ["still talking"]
        refused = [w for w in warnings(client, r) if "unreadable message from sam" in w]
        assert len(refused) == 4
    # The cursor moved past them: nothing is redelivered, nothing is warned twice.
    await online(ann, ann_room)
    assert len([w for w in warnings(ann, ann_room) if "unreadable" in w]) == 4
    assert ann.room(ann_room.name).cursor == ann_room.cursor > 0
