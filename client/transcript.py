"""The transcript: what the user is shown, one sealed row per line, under the room's retention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .context import Context
from .records import LineRecord
from .room import Room

Kind = Literal["message", "sidebar", "notice", "warning"]


@dataclass(frozen=True)
class Line:
    """One transcript entry as the user sees it."""

    n: int
    kind: str  # "message", "sidebar", "notice", "warning"
    sender: bytes | None
    text: str
    ts: int
    mine: bool = False
    to: bytes | None = None
    #: The member a notice or warning is about: ``text`` then has ``{who}`` for its name.
    about: bytes | None = None
    #: Room messages and sidebars: the id sender and receivers share (events.message_id).
    mid: bytes | None = None


class Transcript:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: Warnings of this process, newest last (tests and front ends read them).
        self.notices: list[tuple[bytes, str]] = []
        #: Called with each line once it is stored (inside the caller's transaction).
        self.on_line: Callable[[Room, Line], None] | None = None

    def add(
        self,
        room: Room,
        kind: Kind,
        text: str,
        *,
        sender: bytes | None = None,
        to: bytes | None = None,
        about: bytes | None = None,
        mid: bytes | None = None,
    ) -> None:
        now = self.ctx.now()
        record = LineRecord(
            kind=kind, text=text, ts=now, sender=sender, to=to, about=about, mid=mid
        )
        expires = now + room.state.rules.retention
        n = self.ctx.store.add_message(room.room_id, record.to_bytes(), expires)
        if self.on_line is not None:
            self.on_line(room, _line(n, record, room.me))

    def notice(self, room: Room, text: str, *, about: bytes | None = None) -> None:
        """``about``: the member concerned, named where ``text`` says ``{who}``."""
        self.add(room, "notice", text, about=about)

    def warn(self, room: Room, text: str, *, about: bytes | None = None) -> None:
        self.notices.append((room.room_id, text))
        self.add(room, "warning", text, about=about)

    def lines(self, room: Room, after: int = -1) -> list[Line]:
        self.ctx.store.purge_expired(self.ctx.now())
        return [
            _line(n, LineRecord.from_bytes(data), room.me)
            for n, data in self.ctx.store.messages(room.room_id, after=after)
        ]


def _line(n: int, record: LineRecord, me: bytes) -> Line:
    return Line(
        n=n,
        kind=record.kind,
        sender=record.sender,
        text=record.text,
        ts=record.ts,
        mine=record.sender is not None and record.sender == me,
        to=record.to,
        about=record.about,
        mid=record.mid,
    )
