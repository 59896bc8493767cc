"""A flaky link costs no message the relay still holds (issue 11, point 10).

The tampering relay plays a bad network for one reader: a third of the room
messages sent to it are dropped, damaged (a byte flipped) or delivered out of
order — the answers to its ``fetch`` requests too. The reader asks again for
what is missing or does not open, and ends up with every message, each shown
once, with no false alarm.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.adversarial.malicious import Conn, Frame, Tamper
from tests.client.helpers import People, heard, online, room_with, say


def flaky(tamper: Tamper, reader_key: bytes, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    held: list[Frame] = []
    done: Counter[str] = Counter()

    def hook(conn: Conn, f: Frame) -> list[Frame]:
        if f.get("t") != "msg" or reader_key not in conn.keys:
            return [f, *held_back()]
        roll = rng.random()
        if roll < 1 / 9:
            done["dropped"] += 1
            return []
        if roll < 2 / 9:
            done["damaged"] += 1
            data = bytearray(f["data"])
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            return [{**f, "data": bytes(data)}]
        if roll < 3 / 9:
            done["reordered"] += 1
            held.append(f)
            return []
        return [f, *held_back()]

    def held_back() -> list[Frame]:
        out = list(held)
        held.clear()
        return out

    tamper.server_frame = hook
    return done


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_reader_behind_a_flaky_link_gets_every_message_once(
    people: People, tamper: Tamper, seed: int
) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    sent = [f"message {i}" for i in range(30)]
    for text in sent:
        await say(fac, room, text)
    faults = flaky(tamper, ann_room.me, seed)
    for _ in range(3):  # a reconnection serves from the cursor, which never passes a gap
        await online(ann, ann_room)
        if sorted(heard(ann, ann_room)) == sorted(sent):
            break
    tamper.honest()
    shown = heard(ann, ann_room)
    assert sorted(shown) == sorted(sent), (faults, len(shown))
    assert len(shown) == len(set(shown))  # each once
    assert sum(faults.values()) >= 5, faults  # the link really was bad
    alarms = [line.text for line in ann.lines(ann_room) if line.kind == "warning"]
    assert not [a for a in alarms if "replayed" in a or "refused" in a], alarms
    # Nothing is shown again on a clean reconnection.
    await online(ann, ann_room)
    assert len(heard(ann, ann_room)) == len(sent)
