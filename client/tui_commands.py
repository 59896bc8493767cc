"""The chat screen's slash commands: parsed here, carried out through the client façade.

The screen itself (:mod:`.tui`) hands every line that starts with ``/`` to
:meth:`Commands.run`; anything a member wrote that a command prints goes
through :func:`.render.inert`.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol

from backchannel.protocol import roomlog as L

from .core import Client, ClientError, MemberView, Room
from .render import inert
from .views import describe_rules, render_export

HELP = """commands:
  /who                       members, verified or not
  /verify NAME               the safety number you share with NAME; then y records a match
  /verify NAME confirm       record that it matched (after you saw it)
  /sidebar NAME TEXT         a private message to NAME only ("quote" names with spaces)
  /room NAME    /rooms       switch to another room; list them
  /notify on|off             bell and window title for new messages in this room
  /rules                     the room's rules
  /rules mode|retention V    facilitators: change them (e.g. /rules retention 7d)
  /invite [ROLE] [EXPIRES] [USES]   facilitators: an invite code (default participant 2d 1)
  /invites    /revoke ID     facilitators: open invites; withdraw one
  /role NAME ROLE            facilitators: make NAME a participant, observer or facilitator
  /remove NAME               facilitators: remove NAME (asks first)
  /export FILE [md|json]     export the transcript (honours the rules; mode 600)
  /leave                     leave the room (asks first)
  /help                      this text
keys: Enter sends · Shift+Enter or Ctrl+J new line · Up/Down earlier sends
      Ctrl+N/Ctrl+P or Alt+1..9 switch rooms · PageUp/PageDown scroll · Ctrl+Q quits"""

DURATION = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Longest-prefix matching tries at most this many words as a name.
NAME_WORDS = 8


class Screen(Protocol):
    """What the commands need of the chat screen."""

    client: Client
    room: Room
    lock: asyncio.Lock

    def local(self, text: str) -> None: ...

    def ask(self, question: str, then: Callable[[], Awaitable[None]]) -> None: ...

    async def send(self, text: str, to: bytes | None = None) -> None: ...

    async def switch_room(self, room: Room) -> None: ...

    def notify_enabled(self, room: Room) -> bool: ...

    def set_notify(self, room: Room, on: bool) -> None: ...

    def refresh_members(self) -> None: ...

    def refresh_rooms(self) -> None: ...


def duration(text: str) -> int:
    match = DURATION.match(text.strip())
    if not match:
        raise ClientError(f"not a duration: {text!r}", hint="use e.g. 90m, 12h, 7d or 2w")
    return int(match.group(1)) * UNITS[match.group(2)]


def take_member(
    client: Client, room: Room, rest: str, *, more: bool
) -> tuple[MemberView, str]:
    """The member ``rest`` starts with, and what follows it.

    A quoted name (``"Maria del Mar" hello``) is taken as quoted; otherwise the
    longest run of leading words that names a member wins, so names with spaces
    work unquoted. ``more``: something must follow the name.
    """
    rest = rest.strip()
    if not rest:
        raise ClientError("name a member", hint="/who lists them")
    if rest[0] in "\"'":
        lex = shlex.shlex(rest, posix=True)
        lex.whitespace_split, lex.commenters = True, ""
        try:
            name = lex.get_token() or ""
        except ValueError:
            raise ClientError("a quote is not closed", hint='e.g. "Maria del Mar"') from None
        after = lex.instream.read().strip()
        if more and not after:
            raise ClientError("nothing follows the name")
        return client.member(room, name), after
    words = list(re.finditer(r"\S+", rest))[:NAME_WORDS + 1]
    last = len(words) - 1 if more else len(words)
    if last < 1:
        raise ClientError("nothing follows the name")
    first_error: ClientError | None = None
    for k in range(min(last, NAME_WORDS), 0, -1):
        end = words[k - 1].end()
        try:
            return client.member(room, rest[:end]), rest[end:].strip()
        except ClientError as exc:
            # A longer run that names several members is the closer answer: say so
            # rather than silently picking a member a shorter run names.
            if "matches several" in str(exc):
                raise
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


class Commands:
    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        #: Members whose safety number was shown in this session (by room).
        self._shown: set[tuple[bytes, bytes]] = set()

    @property
    def client(self) -> Client:
        return self.screen.client

    @property
    def room(self) -> Room:
        return self.screen.room

    async def run(self, text: str) -> None:
        match = re.match(r"/(\S*)\s*(.*)", text, re.DOTALL)
        assert match is not None
        name, rest = match.group(1).lower(), match.group(2).strip()
        handler = getattr(self, "cmd_" + name, None) if name.isidentifier() else None
        if handler is None:
            raise ClientError(f"unknown command /{inert(name, limit=20)}", hint="/help lists them")
        await handler(rest)

    # --- reading ---------------------------------------------------------------------------

    async def cmd_help(self, rest: str) -> None:
        self.screen.local(HELP)

    async def cmd_who(self, rest: str) -> None:
        for m in self.client.members(self.room):
            state = "you" if m.me else ("verified" if m.verified else "NOT verified")
            self.screen.local(f"{inert(m.name)} — {m.role}, {state}, {m.fingerprint[:16]}")

    async def cmd_rules(self, rest: str) -> None:
        if not rest:
            self.screen.local(describe_rules(self.room.state.rules))
            return
        what, _, value = rest.partition(" ")
        current = self.room.state.rules
        if what == "mode" and value.strip() in L.MODES:
            rules = L.Rules(mode=value.strip(), retention=current.retention)  # type: ignore[arg-type]
        elif what == "retention" and value.strip():
            seconds = duration(value)
            if not L.MIN_RETENTION <= seconds <= L.MAX_RETENTION:
                raise ClientError("retention is at least 1 minute and at most 10 years")
            rules = L.Rules(mode=current.mode, retention=seconds)
        else:
            raise ClientError(
                "usage: /rules mode chatham|attributed|anonymous, or /rules retention 7d"
            )
        async def change() -> None:
            async with self.screen.lock:
                await self.client.set_rules(self.room, rules)
            self.screen.local("rules changed:\n" + describe_rules(rules))

        self.screen.ask(
            "change the rules for everyone to:\n" + describe_rules(rules) + "\n(y/n)", change
        )

    async def cmd_verify(self, rest: str) -> None:
        confirm = False
        words = rest.split()
        if len(words) > 1 and words[-1].lower() == "confirm":
            confirm, rest = True, rest[: rest.lower().rindex("confirm")]
        member, _ = take_member(self.client, self.room, rest, more=False)
        key = (self.room.room_id, member.key.sign)
        if confirm and key in self._shown:
            self._record(member)
            return
        number = self.client.safety(self.room, member)
        self._shown.add(key)
        self.screen.local(
            f"safety number with {inert(member.name)}:\n" + "\n".join(number.lines())
        )

        async def record() -> None:
            self._record(member)

        self.screen.ask(
            f"compare it with {inert(member.name)} out of band (in person, or a call). "
            "Does theirs read the same? y records it; anything else does not",
            record,
        )

    def _record(self, member: MemberView) -> None:
        self.client.mark_verified(self.room, member)
        self.screen.local(f"recorded: {inert(member.name)} is verified")
        self.screen.refresh_members()

    async def cmd_rooms(self, rest: str) -> None:
        for r in self.client.rooms():
            here = "▶" if r.room_id == self.room.room_id else " "
            self.screen.local(f"{here} {inert(r.name)} — {r.state.rules.mode}, {r.status}")

    # --- writing ---------------------------------------------------------------------------

    async def cmd_sidebar(self, rest: str) -> None:
        if not rest:
            raise ClientError('usage: /sidebar NAME TEXT (or /sidebar "NAME WITH SPACES" TEXT)')
        member, message = take_member(self.client, self.room, rest, more=True)
        await self.screen.send(message, to=member.key.sign)

    cmd_msg = cmd_sidebar

    async def cmd_export(self, rest: str) -> None:
        if not rest:
            raise ClientError("usage: /export FILE [md|json]")
        try:
            parts = shlex.split(rest)
        except ValueError:
            raise ClientError("a quote is not closed") from None
        fmt = parts[1] if len(parts) > 1 else ("json" if parts[0].endswith(".json") else "md")
        if fmt not in ("md", "json") or len(parts) > 2:
            raise ClientError("usage: /export FILE [md|json]")
        path = Path(parts[0]).expanduser()
        text = render_export(self.client, self.room, fmt)
        try:
            # Never readable by others, like the command's export, even if the file existed.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        except OSError as exc:
            raise ClientError(
                f"cannot write {inert(str(path))}: {exc.strerror or exc}"
            ) from None
        self.screen.local(f"exported to {inert(str(path))}")

    async def cmd_room(self, rest: str) -> None:
        if not rest:
            raise ClientError("usage: /room NAME", hint="/rooms lists them")
        await self.screen.switch_room(self.client.room(rest))

    async def cmd_notify(self, rest: str) -> None:
        if rest not in ("", "on", "off"):
            raise ClientError("usage: /notify on|off")
        if rest:
            self.screen.set_notify(self.room, rest == "on")
        state = "on" if self.screen.notify_enabled(self.room) else "off"
        self.screen.local(f"notifications (bell, window title) in this room: {state}")

    async def cmd_leave(self, rest: str) -> None:
        async def leave() -> None:
            async with self.screen.lock:
                await self.client.leave(self.room)
            self.screen.local("you left the room")
            self.screen.refresh_rooms()

        self.screen.ask("leave this room? You need a new invite to come back (y/n)", leave)

    # --- facilitating ----------------------------------------------------------------------

    async def cmd_invite(self, rest: str) -> None:
        role, expires, uses = "participant", "2d", 1
        for word in rest.split():
            if word in L.ROLES:
                role = word
            elif DURATION.match(word):
                expires = word
            elif word.isdigit() and int(word) >= 1:
                uses = int(word)
            else:
                raise ClientError(
                    "usage: /invite [participant|observer|facilitator] [EXPIRES] [USES]"
                )
        async with self.screen.lock:
            code = await self.client.invite(self.room, role, duration(expires), uses)  # type: ignore[arg-type]
        self.screen.local(
            f"invite code (send it privately; it admits {uses} person(s) as {role} for "
            f"{expires}):\n{code}"
        )

    async def cmd_invites(self, rest: str) -> None:
        async with self.screen.lock:
            found = await self.client.invites(self.room)
        if not found:
            self.screen.local("no open invites")
        for item in found:
            left = datetime.fromtimestamp(item.expires).strftime("%Y-%m-%d %H:%M")
            self.screen.local(
                f"{item.id} — {item.role}, {item.uses_left} use(s) left, until {left}"
            )

    async def cmd_revoke(self, rest: str) -> None:
        if not rest:
            raise ClientError("usage: /revoke ID", hint="/invites lists them")
        async with self.screen.lock:
            gone = await self.client.revoke_invite(self.room, rest)
        self.screen.local(f"invite {gone.id} revoked: it admits nobody now")

    async def cmd_role(self, rest: str) -> None:
        words = rest.split()
        if len(words) < 2 or words[-1] not in L.ROLES:
            raise ClientError("usage: /role NAME participant|observer|facilitator")
        role = words[-1]
        member, _ = take_member(self.client, self.room, rest[: rest.rindex(role)], more=False)
        async with self.screen.lock:
            await self.client.set_role(self.room, member.key.sign, role)  # type: ignore[arg-type]
        self.screen.local(f"{inert(member.name)} is now {role}")
        self.screen.refresh_members()

    async def cmd_remove(self, rest: str) -> None:
        member, _ = take_member(self.client, self.room, rest, more=False)
        if self.room.state.role_of(self.room.me) != "facilitator":
            raise ClientError("only a facilitator can remove members")

        async def remove() -> None:
            async with self.screen.lock:
                await self.client.remove(self.room, member.key.sign)
            self.screen.local(f"removed {inert(member.name)}")
            self.screen.refresh_members()

        self.screen.ask(
            f"remove {inert(member.name)} from the room? Everyone's keys rotate (y/n)", remove
        )
