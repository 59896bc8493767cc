"""The transcript: sealed lines with sender, recipient and kind, under the room's retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from backchannel.client.context import Context
from backchannel.client.room import Room
from backchannel.client.store import Store
from backchannel.client.transcript import Line, Transcript
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import MemberKeyPair
from tests.server.helpers import FakeClock

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
ANN = b"\xaa" * 32
SECRET = "we could accept a phased withdrawal"


def local_room(retention: int = L.DEFAULT_RETENTION) -> Room:
    key = MemberKeyPair.generate()
    create = L.make_create(key, L.Rules(retention=retention), 1_800_000_000)
    return Room(
        room_id=L.event_hash(create), name="r", title="R", relay="http://127.0.0.1:1",
        key=key, log=L.validate_log([create]),
    )


def transcript(tmp_path: Path, clock: FakeClock) -> Transcript:
    return Transcript(Context(Store.create(tmp_path, "pw", **FAST), clock=clock))


def test_lines_are_stored_sealed_with_sender_to_and_kind(
    tmp_path: Path, clock: FakeClock
) -> None:
    t = transcript(tmp_path, clock)
    room = local_room()
    t.add(room, "message", SECRET, sender=ANN)
    t.add(room, "sidebar", "just between us", sender=room.me, to=ANN)
    t.notice(room, "ann joined")
    lines = t.lines(room)
    now = int(clock())
    assert [(x.n, x.kind, x.sender, x.to, x.text, x.mine) for x in lines] == [
        (0, "message", ANN, None, SECRET, False),
        (1, "sidebar", room.me, ANN, "just between us", True),
        (2, "notice", None, None, "ann joined", False),
    ]
    assert all(abs(x.ts - now) <= 1 for x in lines)
    assert [x.text for x in t.lines(room, after=0)] == ["just between us", "ann joined"]
    assert t.lines(local_room()) == []  # another room's transcript is its own
    # The text, the sender and the recipient are nowhere in the file in the clear.
    t.ctx.store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for needle in (SECRET.encode(), b"phased", b"between us", ANN, room.room_id):
        assert needle not in raw
    again = Transcript(Context(Store.open(tmp_path, "pw"), clock=clock))
    assert again.lines(room) == lines


def test_on_line_fires_with_the_stored_line(tmp_path: Path, clock: FakeClock) -> None:
    t = transcript(tmp_path, clock)
    room = local_room()
    seen: list[tuple[bytes, Line]] = []
    t.on_line = lambda r, line: seen.append((r.room_id, line))
    t.add(room, "message", "hello", sender=room.me)
    t.add(room, "sidebar", "psst", sender=ANN, to=room.me)
    assert [line for _, line in seen] == t.lines(room)
    assert {room_id for room_id, _ in seen} == {room.room_id}
    assert seen[0][1].mine
    assert not seen[1][1].mine


def test_warn_records_a_notice_and_a_warning_line(tmp_path: Path, clock: FakeClock) -> None:
    t = transcript(tmp_path, clock)
    room, other = local_room(), local_room()
    t.notice(room, "not a warning")
    t.warn(room, "a replayed message from ann was dropped")
    t.warn(other, "the relay reported: slow down (rate_limited)")
    assert t.notices == [
        (room.room_id, "a replayed message from ann was dropped"),
        (other.room_id, "the relay reported: slow down (rate_limited)"),
    ]
    assert [(x.kind, x.text) for x in t.lines(room)] == [
        ("notice", "not a warning"),
        ("warning", "a replayed message from ann was dropped"),
    ]


def test_lines_past_the_rooms_retention_are_purged(tmp_path: Path, clock: FakeClock) -> None:
    t = transcript(tmp_path, clock)
    short, long = local_room(retention=60), local_room(retention=3600)
    t.add(short, "message", "gone in a minute", sender=ANN)
    t.add(long, "message", "kept for an hour", sender=ANN)
    clock.advance(30)
    t.add(short, "message", "said later", sender=ANN)
    clock.advance(40)  # 70 s after the first line, 40 s after the second
    assert [x.text for x in t.lines(short)] == ["said later"]
    assert [x.text for x in t.lines(long)] == ["kept for an hour"]
    clock.advance(3600)
    assert t.lines(short) == []
    assert t.lines(long) == []
    # Purged means deleted from the file, not merely hidden.
    db = sqlite3.connect(Store.path(tmp_path))
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    db.close()
