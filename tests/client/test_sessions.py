"""Pairwise sessions: a payload opens once for its peer, and processed mailbox items
are remembered in a bounded ring."""

from __future__ import annotations

from typing import Any

import pytest

from backchannel.client.relay import Frame, RelaySocket
from backchannel.client.sessions import MAX_PROCESSED, Sessions
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import decode
from backchannel.protocol.errors import DuplicateMessage
from tests.client.helpers import People, room_with


def record_psend(sock: RelaySocket) -> list[bytes]:
    """What ``sock`` puts in mailboxes (the frames still go to the relay)."""
    sent: list[bytes] = []
    real = sock.request

    async def recording(kind: str, **fields: Any) -> Frame:
        if kind == "psend":
            sent.append(fields["data"])
        return await real(kind, **fields)

    sock.request = recording  # type: ignore[method-assign]
    return sent


async def test_a_pairwise_payload_opens_once_for_its_peer(people: People) -> None:
    fac, room, joined = await room_with(people, "ann")
    ann, ann_room = joined["ann"]
    ann_key = room.state.members[ann_room.me].key
    fac_key = ann_room.state.members[room.me].key
    payload = {"t": "sidebar", "text": "between us", "ts": 1}
    async with fac.connect([room]) as sock:
        sent = record_psend(sock)
        await fac.sessions.send(sock, room, ann_key, payload)  # type: ignore[arg-type]
    (data,) = sent
    assert b"between us" not in data
    with ann.store.transaction():
        assert decode(ann.sessions.decrypt(ann_room, fac_key, data)) == payload
    # The same ciphertext again is a replay, not a new session.
    with pytest.raises(DuplicateMessage), ann.store.transaction():
        ann.sessions.decrypt(ann_room, fac_key, data)
    # The session state was committed: a restarted client refuses it too.
    again = Sessions(ann.ctx, ann.prekeys, ann.peers, ann.transcript)
    with pytest.raises(DuplicateMessage), ann.store.transaction():
        again.decrypt(ann_room, fac_key, data)


async def test_processed_marks_are_remembered_in_a_bounded_ring(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    other = await fac.create_room("u", L.Rules())
    sessions = fac.sessions
    marks = [Sessions.mark(item, b"data %d" % item) for item in range(MAX_PROCESSED + 1)]
    # The relay may reuse an id once acknowledged: only id and bytes together are the same item.
    assert Sessions.mark(1, b"data 1") == marks[1]
    assert Sessions.mark(1, b"other bytes") != marks[1]
    assert Sessions.mark(2, b"data 1") != marks[1]
    with fac.store.transaction():
        sessions.remember(other, marks[0])
        for mark in marks[:MAX_PROCESSED]:
            sessions.remember(room, mark)
    assert sessions.seen(room, marks[0])
    assert sessions.seen(room, marks[MAX_PROCESSED - 1])
    assert not sessions.seen(room, marks[MAX_PROCESSED])
    assert not sessions.seen(room, Sessions.mark(1, b"other bytes"))
    with fac.store.transaction():
        sessions.remember(room, marks[MAX_PROCESSED])
    assert sessions.seen(room, marks[MAX_PROCESSED])
    assert not sessions.seen(room, marks[0])  # the oldest went
    assert sessions.seen(room, marks[1])
    assert sessions.seen(other, marks[0])  # another room's ring is its own
    assert not sessions.seen(other, marks[1])
