"""The stable JSON schema of a transcript line, shared by ``read --json`` and the daemon.

One object per line (docs/client.md, "The daemon's JSON schema"). Every field
is always present (``null`` where it does not apply), so a script can index
without checking; fields are only ever added, never renamed or removed.
Strings a member chose (names, text) are exactly what was sent: the JSON
writer (:func:`~.render.json_text`) escapes what a terminal would act on.
"""

from __future__ import annotations

from typing import Any

from .core import Client, Line, Room, pseudonym
from .render import inert
from .transcript import message_id
from .views import line_mode, line_text, speaker

__all__ = ["SCHEMA", "line_event", "message_id"]

#: Bumped only if a field ever had to change meaning (it never should).
SCHEMA = 1


def line_event(c: Client, r: Room, line: Line) -> dict[str, Any]:
    tag = None if line.sender is None else c.tag(r, line.sender)
    member = None if line.sender is None else r.state.members.get(line.sender)
    # Said while the room was anonymous: a pseudonym, whatever names are known now.
    anonymous = line_mode(r, line) == "anonymous"
    peer = None
    if line.kind == "sidebar":
        other = (line.to if line.mine else line.sender) or b""
        peer = pseudonym(r.room_id, other) if anonymous else inert(c.display_name(r, other))
    mid = getattr(line, "mid", None)
    return {
        "schema": SCHEMA,
        "room": r.room_id.hex(),
        "room_name": r.name,
        "n": line.n,
        "id": None if mid is None else mid.hex(),
        "kind": line.kind,
        "from": speaker(c, r, line),
        "fingerprint": None if member is None else member.key.fingerprint().hex(),
        "mine": line.mine,
        "text": line_text(c, r, line),
        "ts": line.ts,
        "received": line.received,
        "sidebar_with": peer,
        # Never for our own lines: there is no safety number with oneself.
        "verified": tag is not None and tag.verified and not line.mine,
    }
