"""Send times: lines are shown when they were sent, in that order, within bounds a
lying member cannot step outside (docs/client.md, "Send times")."""

from __future__ import annotations

from pathlib import Path

from backchannel.client.context import Context
from backchannel.client.core import Client, Room
from backchannel.client.records import LineRecord
from backchannel.client.store import Store
from backchannel.client.transcript import Transcript
from backchannel.protocol.encoding import encode
from tests.adversarial.spoiler import new_spoiler, seat
from tests.client.helpers import FAST, People, online, room_with, say
from tests.client.test_transcript import ANN, local_room
from tests.server.helpers import FakeClock


def spoken(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind in ("message", "sidebar")]


async def test_a_catch_up_shows_sidebars_among_room_messages_where_they_were_sent(
    people: People, clock: FakeClock
) -> None:
    _, _, joined = await room_with(people, "ann", "bob")
    ann, ann_room = joined["ann"]
    bob, bob_room = joined["bob"]
    await online(bob, bob_room)
    # Ann is offline from here on; what Bob says waits on the relay for her.
    await say(bob, bob_room, "one")
    await say(bob, bob_room, "two")
    async with bob.connect([bob_room]) as sock:
        await bob.pump(sock, [bob_room], idle=0.05)
        await bob.send_text(sock, bob_room, "between us", to=ann_room.me)
    clock.advance(1)
    await say(bob, bob_room, "three")
    await say(bob, bob_room, "four")
    await online(ann, ann_room)
    assert spoken(ann, ann_room) == ["one", "two", "between us", "three", "four"]
    # The sidebar was delivered first (the mailbox comes before the backlog): it is
    # shown at its sender's time, and the time it was received is kept too.
    lines = {line.text: line for line in ann.lines(ann_room)}
    assert lines["between us"].n < lines["one"].n
    assert lines["between us"].ts < lines["three"].ts <= lines["three"].received
    # A new process reads the same order from the store.
    assert spoken(ann, ann.room(ann_room.name)) == ["one", "two", "between us", "three", "four"]


async def test_a_liar_cannot_bury_or_pin_its_lines_beyond_the_bounds(
    people: People, clock: FakeClock
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    sam = new_spoiler(people, "sam")
    sam_room = await seat(people, fac, room, sam)
    for client, r in ((sam, sam_room), (fac, room), (ann, ann_room), (sam, sam_room)):
        await online(client, r)
    clock.advance(3600)
    await say(fac, room, "honest one")
    await online(ann, ann_room)
    seen_until = ann_room.floor  # Ann was caught up here at this moment
    clock.advance(60)
    now = int(clock())
    lies = {
        "from long ago": {"ts": 0},
        "backdated into what ann saw": {"ts": now - 1800},
        "not a time": {"ts": "yesterday", "ms": True},
        "absurd": {"ts": 1 << 62, "ms": 7},
        "from the future": {"ts": now + 86400},
    }
    async with sam.connect([sam_room]) as sock:
        await sam.pump(sock, [sam_room], idle=0.05)
        for text, when in lies.items():
            await sam.post(sock, sam_room, encode({"t": "text", "text": text, **when}))  # type: ignore[attr-defined]
        peer = sam_room.state.members[ann_room.me]
        await sam.senderkeys.distribute(sock, sam_room, sam.profile())
        await sam.sessions.send(
            sock, sam_room, peer.key, {"t": "sidebar", "text": "psst", "ts": now - 7200}
        )
    clock.advance(5)
    await say(fac, room, "honest two")
    clock.advance(5)
    await online(ann, ann_room)

    lines = {line.text: line for line in ann.lines(ann_room)}
    order = spoken(ann, ann_room)
    # Nothing Sam says lands before what Ann had already been shown...
    assert order[0] == "honest one"
    for text in [*lies, "psst"]:
        line = lines[text]
        assert seen_until <= line.sent_ms, text
        # ...nor after the moment it arrived (no line pinned below newer ones).
        assert line.ts <= line.received, text
    # A time in the future is the arrival time: after what was sent meanwhile.
    assert order.index("from the future") > order.index("honest two")
    # Backdated ones are shown at the floor, still in the order they were sent.
    assert order.index("from long ago") < order.index("backdated into what ann saw")
    assert order.index("backdated into what ann saw") < order.index("honest two")
    assert lines["honest two"].ts >= now + 5
    # Nothing raised: every lie is a line, and no warning blames anyone else.
    assert set(lies) | {"psst", "honest one", "honest two"} == set(order)
    # Whatever their clocks say, a member's room messages keep the order they were sent in.
    assert [text for text in order if text in lies] == list(lies)


def test_lines_stored_before_send_times_read_back_in_place(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Rows of earlier releases have no ``sent``: shown at the time they were recorded,
    and ordered among new rows by it."""
    t = Transcript(Context(Store.create(tmp_path, "pw", **FAST), clock=clock))
    room = local_room()
    now = int(clock())
    old = LineRecord(kind="message", text="from an older release", ts=now - 60, sender=ANN)
    assert b"sent" not in old.to_bytes()
    t.ctx.store.add_message(room.room_id, old.to_bytes(), now + 3600)
    bob = b"\xbb" * 32
    t.add(room, "message", "sent two minutes ago", sender=bob, sent=(now - 120) * 1000)
    t.add(room, "message", "just now", sender=bob)
    lines = t.lines(room)
    assert [x.text for x in lines] == ["sent two minutes ago", "from an older release", "just now"]
    assert (lines[1].ts, lines[1].received) == (now - 60, now - 60)
