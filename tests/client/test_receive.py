"""The receive path: room messages waiting for their key, the cursor, redelivered
pairwise items."""

from __future__ import annotations

from backchannel.client.core import Client, Room
from backchannel.client.relay import Frame, RelaySocket
from backchannel.client.store import Store
from backchannel.protocol import roomlog as L
from tests.client.helpers import People, heard, online, room_with, say
from tests.server.helpers import RelayServer


def warnings(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "warning"]


async def test_a_message_before_its_key_is_stashed_then_shown_in_order(
    people: People, relay: RelayServer
) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    ann = people.new("ann")
    ann_room = await ann.join(
        await fac.invite(room, "participant", 3600, 1), accept_rules=lambda r: True
    )
    texts = ["first", "second", "third", "fourth", "fifth"]
    for text in texts:
        await say(fac, room, text)  # hands Ann our key (in her mailbox), then speaks
    stored = relay.call(relay.store.room_messages_after(room.room_id, 0, 100))
    assert len(stored) == 5
    # The relay delivers the room messages before Ann's mailbox, and out of order.
    for m in (stored[n] for n in (4, 0, 3, 1, 2)):
        await ann.receiver.on_room_message(ann_room, m.seq, m.data)
    assert heard(ann, ann_room) == []
    assert ann_room.cursor == stored[4].seq  # moved past all of them, stashed or not
    await online(ann, ann_room)  # the key arrives over the pairwise channel
    assert heard(ann, ann_room) == texts
    assert warnings(ann, ann_room) == []
    # The stash is empty once the key came: retrying again shows nothing twice.
    await ann.retry_stash(ann_room)
    assert heard(ann, ann_room) == texts
    assert warnings(ann, ann_room) == []


async def test_the_cursor_advances_and_is_persisted(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    before = ann_room.cursor
    await say(fac, room, "one")
    await say(fac, room, "two")
    await online(ann, ann_room)
    assert ann_room.cursor == before + 2
    assert ann.room(ann_room.name).cursor == ann_room.cursor
    # A restarted client reads on from there: nothing is shown twice.
    await ann.aclose()
    ann.store.close()
    reopened = Client(Store.open(people.tmp_path / "ann", "pw"), clock=people.clock)
    people.clients[people.clients.index(ann)] = reopened
    again = reopened.room(ann_room.name)
    assert again.cursor == ann_room.cursor
    await say(fac, room, "three")
    await online(reopened, again)
    assert heard(reopened, again) == ["one", "two", "three"]
    assert again.cursor == before + 3
    assert warnings(reopened, again) == []


async def test_a_redelivered_pairwise_item_is_processed_once(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    async with fac.connect([room]) as sock:
        await fac.send_text(sock, room, "just between us", to=ann_room.me)
    frames: list[Frame] = []
    real = ann.receiver.handle_frame

    async def recording(sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        if frame.type == "pmsg":
            frames.append(frame)
        await real(sock, rooms, frame)

    ann.receiver.handle_frame = recording  # type: ignore[method-assign]
    async with ann.connect([ann_room]) as sock:
        await ann.pump(sock, [ann_room], idle=0.05)
        (frame,) = frames
        # Our ack was lost; the relay delivers the same item again.
        await real(sock, {ann_room.room_id: ann_room}, frame)
    sidebars = [x for x in ann.lines(ann_room) if x.kind == "sidebar"]
    assert [(x.text, x.sender, x.to) for x in sidebars] == [
        ("just between us", room.me, ann_room.me)
    ]
    assert warnings(ann, ann_room) == []



async def test_no_lost_messages_warning_for_a_backlog_still_on_its_way(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob_room = joined["bob"][1]
    await say(fac, room, "one")
    await say(fac, room, "two")
    await fac.remove(room, bob_room.me)
    await online(fac, room)  # generation 1, which says two were sent under generation 0
    await online(ann, ann_room)  # ... and both arrive, right after it
    assert heard(ann, ann_room) == ["one", "two"]
    assert not [w for w in warnings(ann, ann_room) if "never arrived" in w]
