"""What both front ends show: rules text, --json shapes, transcript lines and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backchannel.client.core import Client, Room
from backchannel.client.peers import pseudonym
from backchannel.client.store import Store
from backchannel.client.views import (
    describe_rules,
    format_line,
    member_json,
    render_export,
    room_json,
    when,
)
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import MemberKeyPair
from tests.server.helpers import FakeClock

FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}
NOW = 1_800_000_000

# docs/client.md, "--json formats (stable)"
READ_KEYS = {"n", "kind", "from", "mine", "text", "ts", "sidebar_with", "verified"}
ROOM_KEYS = {
    "name", "title", "id", "rules", "retention_seconds", "status", "problem", "members", "role",
}
MEMBER_KEYS = {"name", "affiliation", "role", "fingerprint", "verified", "me"}
EXPORT_KEYS = {"rules", "notice", "title", "messages"}


def client(tmp_path: Path) -> Client:
    store = Store.create(tmp_path / "fac", "pw", **FAST)
    Client.init_profile(store, "http://127.0.0.1:1", "fac")
    return Client(store, clock=FakeClock())


def room_of(mode: L.Mode, retention: int = L.DEFAULT_RETENTION) -> tuple[Room, bytes]:
    """A locally validated room (our view, as its facilitator) with one more member."""
    fac, ann = MemberKeyPair.generate(), MemberKeyPair.generate()
    create = L.make_create(fac, L.Rules(mode=mode, retention=retention), NOW)
    log = L.validate_log([create])
    invite, seed = L.make_invite(fac, log.state, "participant", NOW + 3600, 1, NOW)
    log.append(invite)
    log.append(L.make_join(ann, seed, log.state, NOW))
    room = Room(
        room_id=L.event_hash(create), name="talks", title="Border *talks*",
        relay="http://127.0.0.1:1", key=fac, log=log,
    )
    return room, ann.public.sign


@pytest.mark.parametrize(
    ("mode", "retention", "says", "kept"),
    [
        ("chatham", 7 * 86_400, "never attributed", "7 days"),
        ("attributed", 36 * 3600, "On the record", "1.5 days"),
        ("anonymous", 90 * 60, "pseudonyms", "1.5 hours"),
    ],
)
def test_describe_rules_per_mode(mode: L.Mode, retention: int, says: str, kept: str) -> None:
    text = describe_rules(L.Rules(mode=mode, retention=retention))
    first, second = text.split("\n")
    assert first.startswith("rules: ")
    assert says in first
    for other in ("never attributed", "On the record", "pseudonyms"):
        if other != says:
            assert other not in first
    assert second == f"messages are deleted after {kept}."


def test_format_line_json_and_text(tmp_path: Path) -> None:
    c = client(tmp_path)
    room, ann = room_of("chatham")
    c.peers.learn(room, ann, "Ann\x1b[31m", None)
    c.transcript.add(room, "message", "hello\nthere", sender=ann)
    c.transcript.add(room, "sidebar", "psst", sender=room.me, to=ann)
    c.transcript.add(room, "sidebar", "psst back", sender=ann, to=room.me)
    c.transcript.notice(room, "Ann joined")
    c.transcript.warn(room, "a replayed message from Ann was dropped")
    lines = c.lines(room)
    shown = [json.loads(format_line(c, room, line, True)) for line in lines]
    assert all(set(s) == READ_KEYS for s in shown)
    ann_name = "Ann<U+001B>[31m"  # other members' text is made inert
    assert [(s["n"], s["kind"], s["from"], s["mine"], s["sidebar_with"]) for s in shown] == [
        (0, "message", ann_name, False, None),
        (1, "sidebar", "you", True, ann_name),
        (2, "sidebar", ann_name, False, ann_name),
        (3, "notice", None, False, None),
        (4, "warning", None, False, None),
    ]
    assert not any(s["verified"] for s in shown)  # no safety number compared yet
    assert shown[0]["text"] == "hello\nthere"  # exactly what was sent
    assert shown[0]["ts"] == lines[0].ts
    stamp = f"[{when(lines[0].ts)}]"
    assert [format_line(c, room, line, False) for line in lines] == [
        # A further line of a message is indented under it; "?": not verified.
        f"{stamp} ? {ann_name}: hello\n    there",
        # Whose sidebar it is, either way.
        f"{stamp} (sidebar to {ann_name}) • you: psst",
        f"{stamp} (sidebar from {ann_name}) ? {ann_name}: psst back",
        f"{stamp} * Ann joined",
        f"{stamp} ! a replayed message from Ann was dropped",
    ]


@pytest.mark.parametrize("fmt", ["md", "json"])
def test_chatham_exports_carry_no_names(tmp_path: Path, fmt: str) -> None:
    c = client(tmp_path)
    room, ann = room_of("chatham")
    c.peers.learn(room, ann, "Ann Aldridge", "Institute for Regional Studies")
    c.transcript.add(room, "message", "a phased withdrawal", sender=ann)
    c.transcript.add(room, "message", "agreed in principle", sender=room.me)
    c.transcript.add(room, "sidebar", "off the record", sender=ann, to=room.me)
    c.transcript.notice(room, "Ann Aldridge joined")
    out = render_export(c, room, fmt)
    assert "a phased withdrawal" in out
    assert "agreed in principle" in out
    names = ("Ann", "Aldridge", "Institute", "you", pseudonym(room.room_id, ann))
    for leak in (*names, "off the record"):
        assert leak not in out
    for key in (ann, room.me):
        assert key.hex() not in out
    if fmt == "json":
        export = json.loads(out)
        assert set(export) == EXPORT_KEYS
        assert export["rules"] == "chatham"
        assert export["title"] == "Border *talks*"
        assert [set(m) for m in export["messages"]] == [{"time", "text"}] * 2
        assert export["messages"][0]["time"].endswith(":00")
    else:
        assert out.startswith("# Border \\*talks\\*\n")
        assert "Chatham House rule" in out


def test_attributed_exports_keep_names(tmp_path: Path) -> None:
    c = client(tmp_path)
    room, ann = room_of("attributed")
    c.peers.learn(room, ann, "Ann Aldridge", None)
    c.transcript.add(room, "message", "on the record", sender=ann)
    c.transcript.add(room, "message", "noted", sender=room.me)
    md = render_export(c, room, "md")
    assert "**Ann Aldridge**: on the record" in md
    # Our own lines carry our profile's name: "you" would mean someone else to a reader.
    assert "**fac**: noted" in md
    assert "**you**" not in md
    export = json.loads(render_export(c, room, "json"))
    assert export["rules"] == "attributed"
    assert [(m["from"], m["text"]) for m in export["messages"]] == [
        ("Ann Aldridge", "on the record"),
        ("fac", "noted"),
    ]


def test_room_and_member_json_keys(tmp_path: Path) -> None:
    c = client(tmp_path)
    room, ann = room_of("anonymous", retention=3600)
    shown = room_json(room)
    assert set(shown) == ROOM_KEYS
    assert shown == {
        "name": "talks",
        "title": "Border *talks*",
        "id": room.room_id.hex(),
        "rules": "anonymous",
        "retention_seconds": 3600,
        "status": "active",
        "problem": None,
        "members": 2,
        "role": "facilitator",
    }
    members = [member_json(m) for m in c.members(room)]
    assert all(set(m) == MEMBER_KEYS for m in members)
    me, other = members
    # Our own label, as the others see us (here our pseudonym); "me" says it is ours.
    assert (me["name"], me["role"], me["me"], me["verified"]) == (
        pseudonym(room.room_id, room.me),
        "facilitator",
        True,
        False,
    )
    assert other == {
        "name": pseudonym(room.room_id, ann),
        "affiliation": None,
        "role": "participant",
        "fingerprint": room.state.members[ann].key.fingerprint().hex(),
        "verified": False,
        "me": False,
    }
    json.dumps(members)  # serialisable as printed
