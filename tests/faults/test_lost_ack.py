"""Issue #6 §2.2 (a targeted case): the client crashes between committing what a
pairwise message carried and acknowledging it to the relay.

The relay keeps a mailbox item until it is acknowledged and sends it again on the next
connection, so after such a crash the client meets the same ciphertext twice. The first
delivery was fully processed (its ratchet step, the sender key or sidebar it carried, all
in one transaction); the second must be recognised as already handled: acknowledged and
dropped quietly. What must not happen: a "refused" warning in the transcript (a false
alarm the user cannot tell from an attack) or the payload processed twice.

Made deterministic with the real relay process: the item is read from the socket, the
relay is SIGKILLed, the client processes the item (commit succeeds, the ``ack`` fails),
and the relay is started again on the same port and data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from backchannel.client.core import Client, Room
from backchannel.client.relay import Frame, RelayError, RelaySocket
from backchannel.protocol import roomlog as L

from .procs import RelayProcess, new_client, warnings


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    proc = RelayProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


async def next_pmsg(sock: RelaySocket) -> Frame:
    for _ in range(50):
        frame = await sock.recv(timeout=5)
        if frame.type == "pmsg":
            return frame
    raise AssertionError("no pmsg arrived")


async def crash_after_commit(client: Client, room: Room, relay: RelayProcess, skip: int) -> None:
    """Process pairwise items normally, then the ``skip``-th one with its ack lost."""
    async with client.connect([room]) as sock:
        for _ in range(skip):
            await client.handle_frame(sock, {room.room_id: room}, await next_pmsg(sock))
        frame = await next_pmsg(sock)
        relay.kill9()  # before the ack is written: the relay never sees it
        with contextlib.suppress(RelayError):
            # The state commits; the ack goes nowhere (or the send fails).
            await client.handle_frame(sock, {room.room_id: room}, frame)
    relay.start()
    async with client.connect([room]) as sock:
        await client.pump(sock, [room], idle=0.5)


async def setup(tmp_path: Path, relay: RelayProcess) -> tuple[Client, Room, Client, Room]:
    fac = new_client(tmp_path / "fac", relay.url, "fac")
    ann = new_client(tmp_path / "ann", relay.url, "ann")
    room = await fac.create_room("lost ack", L.Rules())
    ann_room = await ann.join(await fac.invite(room, "participant", 3600, 1), accept_rules=bool)
    # fac's first pairwise item to ann opens the session and carries fac's sender key;
    # the second is a sidebar on the same session.
    async with fac.connect([room]) as sock:
        await fac.pump(sock, [room], idle=0.3)
        await fac.send_text(sock, room, "private word", to=ann_room.me)
    return fac, room, ann, ann_room


def sidebars(client: Client, room: Room) -> list[str]:
    return [line.text for line in client.lines(room) if line.kind == "sidebar"]


@pytest.mark.parametrize("skip", [0, 1], ids=["session-opening item", "later sidebar"])
async def test_redelivered_pairwise_item_is_not_a_false_alarm(
    tmp_path: Path, relay: RelayProcess, skip: int
) -> None:
    _fac, _room, ann, ann_room = await setup(tmp_path, relay)
    await crash_after_commit(ann, ann_room, relay, skip)
    assert sidebars(ann, ann_room) == ["private word"]
    assert warnings(ann, ann_room) == []


@pytest.mark.parametrize("skip", [0, 1], ids=["session-opening item", "later sidebar"])
async def test_redelivered_pairwise_item_is_not_processed_twice(
    tmp_path: Path, relay: RelayProcess, skip: int
) -> None:
    """The payload is applied once and the session still works."""
    fac, room, ann, ann_room = await setup(tmp_path, relay)
    await crash_after_commit(ann, ann_room, relay, skip)
    assert sidebars(ann, ann_room) == ["private word"]
    # The item was acknowledged the second time: nothing is left to deliver.
    async with ann.connect([ann_room]) as sock:
        await ann.pump(sock, [ann_room], idle=0.3)
    assert sidebars(ann, ann_room) == ["private word"]
    # And the session is in step: both directions still decrypt.
    async with ann.connect([ann_room]) as sock:
        await ann.pump(sock, [ann_room], idle=0.2)
        await ann.send_text(sock, ann_room, "reply", to=room.me)
        await ann.send_text(sock, ann_room, "to the room")
    async with fac.connect([room]) as sock:
        await fac.pump(sock, [room], idle=0.3)
        await fac.send_text(sock, room, "second word", to=ann_room.me)
    async with ann.connect([ann_room]) as sock:
        await ann.pump(sock, [ann_room], idle=0.3)
    assert "reply" in sidebars(fac, room)
    assert "to the room" in [line.text for line in fac.lines(room) if line.kind == "message"]
    assert sidebars(ann, ann_room) == ["private word", "reply", "second word"]
    for c in (fac, ann):
        await c.aclose()
        c.store.close()
