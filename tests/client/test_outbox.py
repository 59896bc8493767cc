"""The outbox: sealed room messages kept until the relay acknowledges them, sent in
the order they were sealed."""

from __future__ import annotations

from pathlib import Path

from backchannel.client.core import Client, Room
from backchannel.client.outbox import Outbox
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import encode
from backchannel.protocol.envelope import RoomEnvelope
from backchannel.server.config import Settings
from tests.client.helpers import People, heard, online, room_with
from tests.server.helpers import FakeClock, RelayServer


def seal(client: Client, room: Room, text: str) -> bytes:
    with client.store.transaction():
        body = encode({"t": "text", "text": text, "ts": client.now()})
        return client.senderkeys.seal(room, body)


def stored_on_relay(relay: RelayServer, room: Room) -> list[bytes]:
    return [m.data for m in relay.call(relay.store.room_messages_after(room.room_id, 0, 100))]


async def test_pending_is_per_room_and_overall(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    other = await fac.create_room("u", L.Rules())
    assert fac.outbox.pending() == []
    cids = [P.random_bytes(16) for _ in range(3)]
    fac.outbox.queue(room, cids[0], seal(fac, room, "a"))
    fac.outbox.queue(room, cids[1], seal(fac, room, "b"))
    fac.outbox.queue(other, cids[2], seal(fac, other, "c"))
    assert {i.cid for i in fac.outbox.pending(room)} == {cids[0], cids[1]}
    assert {i.room for i in fac.outbox.pending(room)} == {room.room_id}
    assert [i.cid for i in fac.outbox.pending(other)] == [cids[2]]
    assert {i.cid for i in fac.outbox.pending()} == set(cids)
    # Queued means stored: a restarted client still has them.
    assert len(Outbox(fac.ctx, fac.transcript).pending()) == 3


async def test_flush_sends_in_sealing_order_and_empties_the_outbox(
    people: People, relay: RelayServer
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    other = await fac.create_room("u", L.Rules())
    texts = [f"m{n}" for n in range(5)]
    async with fac.connect([room]) as sock:
        sealed = [seal(fac, room, t) for t in texts[:3]]
        with fac.store.transaction():
            fac.senderkeys.rotate(room, since=room.state.pos)
        # Handed out before use: a key is handed out at its current index.
        await fac.senderkeys.distribute(sock, room, fac.profile())
        sealed += [seal(fac, room, t) for t in texts[3:]]
        order = [(e.generation, e.index) for e in map(RoomEnvelope.from_bytes, sealed)]
        assert order == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
        # Queued out of order (and their row keys are hashed, so no order survives anyway).
        for n in (4, 1, 3, 0, 2):
            fac.outbox.queue(room, P.random_bytes(16), sealed[n])
        fac.outbox.queue(other, P.random_bytes(16), seal(fac, other, "elsewhere"))
        assert len(fac.outbox.pending()) == 6
        await fac.outbox.flush(sock, [room])
        assert fac.outbox.pending(room) == []
        assert len(fac.outbox.pending(other)) == 1  # only the rooms asked for
        assert stored_on_relay(relay, room) == sealed
        await fac.outbox.flush(sock, [room])  # nothing left to resend
    assert stored_on_relay(relay, room) == sealed
    await online(ann, ann_room)
    assert heard(ann, ann_room) == texts
    assert not [w for w in ann.lines(ann_room) if w.kind == "warning" and "replayed" in w.text]


async def test_a_loaded_relay_is_waited_for_not_given_up_on(tmp_path: Path) -> None:
    """Past the relay's send budget the relay answers `rate_limited` (and with a
    full write queue `busy`): the outbox waits, with jitter, and tries again, so a
    burst well past the budget all arrives, in order."""
    clock = FakeClock()
    relay = RelayServer(
        Settings(
            data_dir=tmp_path,
            database_url=f"sqlite+aiosqlite:///{tmp_path}/loaded.db",
            key_burst=3,
            key_messages_per_second=10.0,
        ),
        clock,
    ).start()
    people = People(tmp_path, relay, clock)
    try:
        fac = people.new("fac")
        room = await fac.create_room("t", L.Rules())
        async with fac.connect([room]) as sock:
            sealed = [seal(fac, room, f"m{n}") for n in range(12)]
            for data in sealed:
                cid = P.random_bytes(16)
                fac.outbox.queue(room, cid, data)
                await fac.outbox.send(sock, room, cid, data)
        assert stored_on_relay(relay, room) == sealed
        assert fac.outbox.pending() == []
    finally:
        await people.close()
        relay.stop()
