"""The stable JSON schema of a transcript line, shared by ``read --json`` and the daemon.

One object per line (docs/client.md, "The daemon's JSON schema"). Every field
is always present (``null`` where it does not apply), so a script can index
without checking; fields are only ever added, never renamed or removed.
Strings a member chose (names, text) are exactly what was sent: the JSON
writer (:func:`~.render.json_text`) escapes what a terminal would act on.
"""

from __future__ import annotations

from typing import Any

from backchannel.protocol import primitives as P

from .core import Client, Line, Room
from .render import inert
from .views import line_text

#: Bumped only if a field ever had to change meaning (it never should).
SCHEMA = 1
_LABEL_ID = b"bc-message-id"
ID_SIZE = 16


def message_id(ciphertext: bytes) -> bytes:
    """What sender and receivers both call one message: a digest of the exact bytes
    that went through the relay (a room envelope, or a pairwise message)."""
    return P.hash_bytes(_LABEL_ID, ciphertext, ID_SIZE)


def line_event(c: Client, r: Room, line: Line) -> dict[str, Any]:
    tag = None if line.sender is None else c.tag(r, line.sender)
    member = None if line.sender is None else r.state.members.get(line.sender)
    peer = None
    if line.kind == "sidebar":
        peer = inert(c.display_name(r, (line.to if line.mine else line.sender) or b""))
    mid = getattr(line, "mid", None)
    return {
        "schema": SCHEMA,
        "room": r.room_id.hex(),
        "room_name": r.name,
        "n": line.n,
        "id": None if mid is None else mid.hex(),
        "kind": line.kind,
        "from": None if tag is None else inert(tag.name),
        "fingerprint": None if member is None else member.key.fingerprint().hex(),
        "mine": line.mine,
        "text": line_text(c, r, line),
        "ts": line.ts,
        "received": line.received,
        "sidebar_with": peer,
        # Never for our own lines: there is no safety number with oneself.
        "verified": tag is not None and tag.verified and not line.mine,
    }
