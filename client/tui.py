"""The interactive chat screen (Textual): scrollback, input line, members, rules always visible.

Text from other members is shown through :func:`render.inert` inside Rich
``Text`` objects, never parsed as markup. The relay connection runs in a
worker; lines the client library records (messages, notices, warnings) are
posted to the screen as they are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

from rich.text import Text
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input, Label, ListItem, ListView, RichLog, Static

from .core import Client, ClientError, Line, NameTag, Room
from .relay import RelayError, RelaySocket
from .render import inert
from .views import describe_rules, line_text, mark, render_export

HELP = """commands:
  /who                     list members (verified or not)
  /verify NAME             show the safety number you share with NAME
  /sidebar NAME TEXT       a private message to NAME only
  /rules                   show the room's rules
  /export FILE             export the transcript as Markdown (honours the rules)
  /leave                   leave the room
  /help                    this text
Ctrl+Q quits."""

RULE_TEXT = {
    "chatham": "CHATHAM HOUSE — use what is said, never attribute it",
    "attributed": "ON THE RECORD — statements are attributed",
    "anonymous": "ANONYMOUS — speakers appear as pseudonyms",
}


class ChatApp(App[None]):
    CSS = """
    #rules { background: $warning 30%; color: $text; padding: 0 1; height: 1; }
    #body { height: 1fr; }
    #log { width: 1fr; border: round $primary; }
    #side { width: 30; }
    #members { height: 1fr; border: round $secondary; }
    #rooms { height: 10; border: round $secondary; }
    #status { height: 1; color: $text-muted; padding: 0 1; }
    """
    BINDINGS = [Binding("ctrl+q", "quit", "quit")]  # noqa: RUF012 - Textual's class attribute

    def __init__(self, client: Client, room: Room, *, connect: bool = True) -> None:
        super().__init__()
        self.client = client
        self.room = room
        self.connect_relay = connect
        self.sock: RelaySocket | None = None
        self.unread: dict[bytes, int] = {}
        self._lock = asyncio.Lock()
        #: What the log shows, in order, so it can be drawn again when names change.
        self._entries: list[Line | Text] = []
        self._tags: dict[bytes, NameTag] | None = None

    def _fatal_error(self) -> None:
        # Textual's own crash display prints every frame's local variables:
        # decrypted text, room ids, member keys. One line says enough.
        self.bell()
        error = self._exception
        name = type(error).__name__ if error is not None else "error"
        self._exit_renderables.append(
            Text(f"error: the chat screen stopped ({name})\nhint: run it again; "
                 "`backchannel read ROOM` shows the transcript")
        )
        self._close_messages_no_wait()

    def compose(self) -> ComposeResult:
        yield Static(self._rules_line(), id="rules")
        with Horizontal(id="body"):
            yield RichLog(id="log", wrap=True, markup=False, highlight=False)
            with Vertical(id="side"):
                yield ListView(id="members")
                yield ListView(id="rooms")
        yield Static("connecting…", id="status")
        yield Input(placeholder="message, or /help", id="input")
        yield Footer()

    def _rules_line(self) -> Text:
        rules = self.room.state.rules
        title = inert(self.room.title or self.room.name, limit=40)
        days = rules.retention / 86400
        return Text(f"{title} · {RULE_TEXT[rules.mode]} · messages kept {days:g} d")

    async def on_mount(self) -> None:
        self.client.on_line = self._on_line
        for line in self.client.lines(self.room):
            self._show(line)
        self._refresh_members()
        self._refresh_rooms()
        self.query_one(Input).focus()
        if self.connect_relay:
            self.pump()
        else:
            self._status("offline")

    # --- relay ---------------------------------------------------------------------------

    @work(exclusive=True)
    async def pump(self) -> None:
        """Stay connected: on any drop, reconnect with exponential backoff (capped at
        30 s) and catch up from the room's cursor."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=1, min=1, max=30),
            retry=retry_if_exception_type((RelayError, OSError)),
            before_sleep=self._disconnected,
        )
        async for attempt in retrying:
            with attempt:
                await self._session()

    def _disconnected(self, state: RetryCallState) -> None:
        self.sock = None
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        self._status(f"disconnected ({inert(str(error), limit=60)}); retrying in {wait:.0f}s")

    def _rooms_on_this_relay(self) -> list[Room]:
        # One connection per relay carries every active room there, so unread
        # counts of the other rooms stay current.
        others = [
            r
            for r in self.client.rooms()
            if r.relay == self.room.relay
            and r.status == "active"
            and r.room_id != self.room.room_id
        ]
        return [self.room, *others]

    async def _session(self) -> None:
        rooms = self._rooms_on_this_relay()
        by_id = {r.room_id: r for r in rooms}
        async with self.client.connect(rooms) as sock:
            self.sock = sock
            self._status("connected")
            async with self._lock:
                await self.client.pump(sock, rooms, idle=0.05)
                for room in rooms:
                    await self.client.retry_stash(room)
            self._refresh_members()  # the catch-up may have brought members and profiles
            while True:
                frame = await sock.recv()
                async with self._lock:
                    await self.client.handle_frame(sock, by_id, frame)
                self._refresh_members()

    def _status(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.query_one("#status", Static).update(Text(text))

    # --- display ---------------------------------------------------------------------------

    def _on_line(self, room: Room, line: Line) -> None:
        if room.room_id == self.room.room_id:
            self._show(line)
        elif line.kind in ("message", "sidebar") and not line.mine:
            self.unread[room.room_id] = self.unread.get(room.room_id, 0) + 1
            self._refresh_rooms()

    def _show(self, line: Line) -> None:
        self._entries.append(line)
        self.query_one("#log", RichLog).write(self._render(line))

    def _render(self, line: Line) -> Text:
        stamp = datetime.fromtimestamp(line.ts).strftime("%H:%M")
        text = Text(f"{stamp} ", style="dim")
        # Names are filled in now, so a notice recorded before a profile arrived
        # names the member once it has (and again after a redraw).
        body = inert(line_text(self.client, self.room, line), multiline=True)
        if line.kind == "notice":
            text.append(f"* {body}", style="italic")
        elif line.kind == "warning":
            text.append(f"! {body}", style="bold red")
        else:
            # Labels are inert and bounded already; cutting one could drop its suffix.
            tag = self.client.tag(self.room, line.sender or b"")
            if line.kind == "sidebar":
                other = line.to if line.mine else line.sender
                peer = self.client.display_name(self.room, other or b"")
                text.append(f"[sidebar with {peer}] ", style="magenta")
            # The mark comes before the name, where a name cannot put a fake one.
            badge = mark(line, tag)
            text.append(f"{badge} ", style={"✓": "bold green", "?": "yellow"}.get(badge, "dim"))
            text.append(f"{tag.name}: ", style="bold")
            text.append(body)
        return text

    def _redraw(self) -> None:
        log = self.query_one("#log", RichLog)
        log.clear()
        for entry in self._entries:
            log.write(self._render(entry) if isinstance(entry, Line) else entry)

    def _refresh_members(self) -> None:
        view = self.query_one("#members", ListView)
        view.clear()
        for m in self.client.members(self.room):
            badge = "✓" if m.verified else ("•" if m.me else "?")
            aff = f" ({inert(m.affiliation, limit=20)})" if m.affiliation else ""
            # Not cut to the panel's width: the suffix at the end is what tells
            # two members apart (the label wraps instead).
            view.append(ListItem(Label(Text(f"{badge} {m.name}{aff} [{m.role}]"))))
        # A profile that arrived, a member who joined or a safety number compared
        # changes how lines already on screen should read: draw them again.
        tags = self.client.tags(self.room)
        if self._tags is not None and tags != self._tags:
            self._redraw()
        self._tags = tags

    def _refresh_rooms(self) -> None:
        view = self.query_one("#rooms", ListView)
        view.clear()
        for r in self.client.rooms():
            count = self.unread.get(r.room_id, 0)
            here = "▶ " if r.room_id == self.room.room_id else "  "
            badge = f" ({count})" if count else ""
            view.append(ListItem(Label(Text(f"{here}{inert(r.name, limit=20)}{badge}"))))

    # --- input -----------------------------------------------------------------------------

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        if not text:
            return
        try:
            if text.startswith("/"):
                await self._command(text)
            else:
                await self._send(text)
        except ClientError as exc:
            self._local(inert(f"! {exc}" + (f" — {exc.hint}" if exc.hint else "")))
        except RelayError as exc:
            self._local(inert(f"! not sent: {exc}"))

    def _local(self, text: str) -> None:
        entry = Text(text, style="yellow")
        self._entries.append(entry)
        self.query_one("#log", RichLog).write(entry)

    async def _send(self, text: str, to: bytes | None = None) -> None:
        if self.sock is None:
            raise ClientError("not connected to the relay yet")
        async with self._lock:
            await self.client.send_text(self.sock, self.room, text, to=to)

    async def _command(self, text: str) -> None:
        name, _, rest = text[1:].partition(" ")
        rest = rest.strip()
        if name == "help":
            self._local(HELP)
        elif name == "who":
            for m in self.client.members(self.room):
                state = "you" if m.me else ("verified" if m.verified else "NOT verified")
                self._local(f"{inert(m.name)} — {m.role}, {state}, {m.fingerprint[:16]}")
        elif name == "rules":
            self._local(describe_rules(self.room.state.rules))
        elif name == "verify":
            member = self.client.member(self.room, rest)
            number = self.client.safety(self.room, member)
            self._local(f"safety number with {inert(member.name)}:\n" + "\n".join(number.lines()))
            self._local("compare it out of band, then run `backchannel verify ROOM NAME --confirm`")
        elif name == "sidebar":
            who, _, message = rest.partition(" ")
            if not message:
                raise ClientError("usage: /sidebar NAME TEXT")
            member = self.client.member(self.room, who)
            await self._send(message, to=member.key.sign)
        elif name == "export":
            if not rest:
                raise ClientError("usage: /export FILE")
            with open(rest, "w") as fh:
                fh.write(render_export(self.client, self.room, "md"))
            self._local(f"exported to {rest}")
        elif name == "leave":
            async with self._lock:
                await self.client.leave(self.room)
            self._local("you left the room")
        else:
            raise ClientError(f"unknown command /{name}", hint="/help lists them")


def run_chat(client: Client, room: Room) -> None:
    ChatApp(client, room).run()
