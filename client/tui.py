"""The interactive chat screen (Textual): scrollback, composer, members, rooms, rules in view.

Text from other members is shown through :func:`render.inert` inside Rich
``Text`` objects, never parsed as markup. The relay connection runs in a
worker; lines the client library records (messages, notices, warnings) are
posted to the screen as they are committed. The widgets are in
:mod:`.tui_widgets`, the slash commands in :mod:`.tui_commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import ClassVar

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Label, ListItem, ListView, Static

from .core import Client, ClientError, Line, NameTag, Room, pseudonym
from .relay import RelayError, RelaySocket
from .render import inert
from .tui_commands import HELP, Commands
from .tui_widgets import ChatLog, Composer, NewMarker
from .views import line_mode, line_text, mark

__all__ = ["HELP", "ChatApp", "run_chat"]

RULE_TEXT = {
    "chatham": "CHATHAM HOUSE — use what is said, never attribute it",
    "attributed": "ON THE RECORD — statements are attributed",
    "anonymous": "ANONYMOUS — speakers appear as pseudonyms",
}
TITLE = "backchannel"


class ChatApp(App[None]):
    CSS = """
    #rules { background: $warning 30%; color: $text; padding: 0 1; height: 1; }
    #body { height: 1fr; }
    #log { width: 1fr; border: round $primary; }
    #side { width: 30; }
    Screen.-medium #side { width: 22; }
    Screen.-narrow #side { display: none; }
    #members { height: 1fr; border: round $secondary; }
    #rooms { height: 10; border: round $secondary; }
    #status { height: 1; color: $text-muted; padding: 0 1; }
    #input { height: auto; max-height: 8; }
    """
    #: Below 80 columns the side panel gives its room to the log.
    HORIZONTAL_BREAKPOINTS = [  # noqa: RUF012 - Textual's class attribute
        (0, "-narrow"), (80, "-medium"), (110, "-wide"),
    ]
    # Ctrl+P would open Textual's command palette; here it goes to the previous room.
    ENABLE_COMMAND_PALETTE = False
    # Priority bindings act before the composer sees the key, so PageUp scrolls the
    # log and Ctrl+N changes room while the composer keeps focus.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "quit"),
        Binding("ctrl+n", "next_room(1)", "next room", priority=True),
        Binding("ctrl+p", "next_room(-1)", "previous room", priority=True),
        Binding("pageup", "scroll_log(-1)", "scroll up", show=False, priority=True),
        Binding("pagedown", "scroll_log(1)", "scroll down", show=False, priority=True),
        *(Binding(f"alt+{i}", f"room_at({i})", show=False, priority=True) for i in range(1, 10)),
    ]

    def __init__(self, client: Client, room: Room, *, connect: bool = True) -> None:
        super().__init__()
        self.client = client
        self.room = room
        self.connect_relay = connect
        self.sock: RelaySocket | None = None
        self.lock = asyncio.Lock()
        #: Messages you have not seen, per room (the current one too, while you read back).
        self.unread: dict[bytes, int] = {}
        self._first_unread: dict[bytes, int] = {}
        self._notify: dict[bytes, bool] = {}
        self._drafts: dict[bytes, str] = {}
        #: The rooms the live connection carries, as the objects it updates.
        self._live: dict[bytes, Room] = {}
        self._order: list[bytes] = []
        self._tags: dict[bytes, NameTag] | None = None
        self._question: tuple[str, Callable[[], Awaitable[None]]] | None = None
        self._mine = self._warnings = 0
        self.commands = Commands(self)

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
            yield ChatLog(self._render, id="log")
            with Vertical(id="side"):
                yield ListView(id="members")
                yield ListView(id="rooms")
        yield Static("connecting…", id="status")
        yield Composer(id="input", placeholder="message, or /help · Enter sends · Ctrl+J new line")
        yield Footer()

    @property
    def log_view(self) -> ChatLog:
        return self.query_one("#log", ChatLog)

    def _rules_line(self) -> Text:
        rules = self.room.state.rules
        title = inert(self.room.title or self.room.name, limit=40)
        days = rules.retention / 86400
        return Text(f"{title} · {RULE_TEXT[rules.mode]} · messages kept {days:g} d")

    async def on_mount(self) -> None:
        self.client.on_line = self._on_line
        self._load_log()
        self.refresh_members()
        self.refresh_rooms()
        self.query_one(Composer).focus()
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
        self._live = by_id = {r.room_id: r for r in rooms}
        async with self.client.connect(rooms) as sock:
            self.sock = sock
            self._status("connected")
            async with self.lock:
                await self.client.pump(sock, rooms, idle=0.05)
                for room in rooms:
                    await self.client.retry_stash(room)
            self.refresh_members()  # the catch-up may have brought members and profiles
            while True:
                frame = await sock.recv()
                async with self.lock:
                    await self.client.handle_frame(sock, by_id, frame)
                self.refresh_members()

    def _status(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.query_one("#status", Static).update(Text(text))

    # --- rooms -----------------------------------------------------------------------------

    async def switch_room(self, room: Room) -> None:
        if room.room_id == self.room.room_id:
            self.local(f"you are in {inert(room.name)} already")
            return
        composer = self.query_one(Composer)
        # A draft stays with its room, so it is never sent to the next one by mistake.
        self._drafts[self.room.room_id] = composer.text
        self._question = None
        reconnect = room.status == "active" and (
            room.relay != self.room.relay or room.room_id not in self._live
        )
        self.room = self._live.get(room.room_id, room)
        composer.set_text(self._drafts.pop(room.room_id, ""))
        self._tags = None
        self._load_log()
        self.refresh_members()
        self.refresh_rooms()
        composer.focus()
        if reconnect and self.connect_relay:
            self.sock = None
            self._status("connecting…")
            self.pump()

    async def action_next_room(self, step: int) -> None:
        rooms = self.client.rooms()
        ids = [r.room_id for r in rooms]
        if len(rooms) > 1 and self.room.room_id in ids:
            await self.switch_room(rooms[(ids.index(self.room.room_id) + step) % len(rooms)])

    async def action_room_at(self, number: int) -> None:
        rooms = self.client.rooms()
        if number <= len(rooms):
            await self.switch_room(rooms[number - 1])

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        if event.list_view.id != "rooms" or event.list_view.index is None:
            return
        index = event.list_view.index
        rooms = {r.room_id: r for r in self.client.rooms()}
        if index < len(self._order) and self._order[index] in rooms:
            await self.switch_room(rooms[self._order[index]])

    # --- what you have seen, and notices of what you have not -----------------------------

    def _looking(self) -> bool:
        return self.log_view.following and self.app_focus

    def _seen(self) -> None:
        rid = self.room.room_id
        if self.unread.pop(rid, 0):
            self._first_unread.pop(rid, None)
            self.refresh_rooms()
            self._update_title()

    def on_chat_log_reached(self, _event: ChatLog.Reached) -> None:
        if self.app_focus:
            self._seen()

    def watch_app_focus(self, focus: bool) -> None:
        if focus and self.log_view.following:
            self._seen()

    def notify_enabled(self, room: Room) -> bool:
        # Off by default where speakers are anonymous: a beep or a window title
        # announcing activity is what a bystander would notice.
        return bool(self._notify.get(room.room_id, room.state.rules.mode != "anonymous"))

    def set_notify(self, room: Room, on: bool) -> None:
        self._notify[room.room_id] = on
        self._update_title()

    def _update_title(self) -> None:
        # Only counts: nothing a member wrote reaches the terminal's title.
        total = sum(
            n for r in self.client.rooms() if self.notify_enabled(r)
            for n in [self.unread.get(r.room_id, 0)]
        )
        title = f"{TITLE} ({total} new)" if total else TITLE
        if title != self.title:
            self.title = title
            if not self.is_headless and self._driver is not None:
                self._driver.write(f"\x1b]2;{title}\x07")

    # --- display ---------------------------------------------------------------------------

    def _on_line(self, room: Room, line: Line) -> None:
        rid = room.room_id
        here = rid == self.room.room_id
        counts = line.kind in ("message", "sidebar") and not line.mine
        if here:
            self._mine += line.mine
            self._warnings += line.kind == "warning"
        if counts and not (here and self._looking()):
            if rid not in self._first_unread:
                self._first_unread[rid] = line.n
                if here:
                    self.log_view.mark_new()
            self.unread[rid] = self.unread.get(rid, 0) + 1
            # Once per burst: the first line you have not seen rings, the rest do not.
            if self.unread[rid] == 1 and self.notify_enabled(room):
                self.bell()
            self._update_title()
            self.refresh_rooms()
        if here:
            self.log_view.add(line)

    def _load_log(self) -> None:
        first = self._first_unread.get(self.room.room_id)
        entries: list[Line | Text | NewMarker] = []
        for line in self.client.lines(self.room):
            if first is not None and line.n >= first:
                entries.append(NewMarker())
                first = None
            entries.append(line)
        self.log_view.load(entries)
        self.query_one("#rules", Static).update(self._rules_line())
        if self.app_focus:
            self._seen()

    def _who(self, line: Line, sign: bytes) -> str:
        # Said while the room was anonymous, shown under a pseudonym even after a rule
        # change, as `read` and exports do (views.line_mode).
        if sign != self.room.me and line_mode(self.room, line) == "anonymous":
            return pseudonym(self.room.room_id, sign)
        return self.client.display_name(self.room, sign)

    def _render(self, line: Line) -> RenderableType:
        stamp = Text(datetime.fromtimestamp(line.ts).strftime("%H:%M "), style="dim")
        text = Text()
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
                other = (line.to if line.mine else line.sender) or b""
                way = "to" if line.mine else "from"
                text.append(f"[sidebar {way} {self._who(line, other)}] ", style="magenta")
            # The mark comes before the name, where a name cannot put a fake one.
            badge = mark(line, tag)
            text.append(f"{badge} ", style={"✓": "bold green", "?": "yellow"}.get(badge, "dim"))
            text.append(f"{self._who(line, line.sender or b'')}: ", style="bold")
            text.append(body)
        # A hanging indent: every wrapped or further line of a message starts under
        # the text, never in the time column, so no message can draw a line that
        # passes for one of its own.
        grid = Table.grid()
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row(stamp, text)
        return grid

    def refresh_members(self) -> None:
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
            self.log_view.redraw()
        self._tags = tags
        # The rules may have changed with the log.
        self.query_one("#rules", Static).update(self._rules_line())

    def refresh_rooms(self) -> None:
        view = self.query_one("#rooms", ListView)
        view.clear()
        rooms = self.client.rooms()
        self._order = [r.room_id for r in rooms]
        for i, r in enumerate(rooms, 1):
            count = self.unread.get(r.room_id, 0)
            here = "▶" if r.room_id == self.room.room_id else " "
            badge = f" ({count})" if count else ""
            key = f"{i} " if i < 10 else "  "
            view.append(ListItem(Label(Text(f"{here}{key}{inert(r.name, limit=20)}{badge}"))))

    def action_scroll_log(self, direction: int) -> None:
        log = self.log_view
        (log.scroll_page_down if direction > 0 else log.scroll_page_up)(animate=False)

    # --- input -----------------------------------------------------------------------------

    def ask(self, question: str, then: Callable[[], Awaitable[None]]) -> None:
        """Put a yes/no question; the next Enter answers it (y or yes goes ahead)."""
        self._question = (question, then)
        self.local(question)

    async def on_composer_submitted(self, event: Composer.Submitted) -> None:
        composer = event.composer
        text = event.text.strip()
        if self._question is not None:
            _question, then = self._question
            self._question = None
            answer = text.lower()
            if answer in ("y", "yes"):
                composer.clear()
                await self._attempt(then())
                return
            self.local("cancelled; nothing was done")
            if answer in ("", "n", "no"):
                composer.clear()
            return
        if not text:
            return
        action = self.commands.run(text) if text.startswith("/") else self.send(text)
        # The text leaves the composer only once it went (or was queued): a refused
        # send or a mistyped command stays there to be fixed.
        if await self._attempt(action):
            composer.remember(text)
            composer.clear()

    async def _attempt(self, action: Awaitable[None]) -> bool:
        try:
            await action
        except ClientError as exc:
            self.local(inert(f"! {exc}" + (f" — {exc.hint}" if exc.hint else "")))
            return False
        except RelayError as exc:
            self.local(inert(f"! not sent: {exc}"))
            return False
        return True

    def local(self, text: str) -> None:
        self.log_view.add(Text(text, style="yellow"))

    async def send(self, text: str, to: bytes | None = None) -> None:
        if self.sock is None:
            if to is not None:
                # A sidebar may need the other member's keys from the relay first.
                raise ClientError(
                    "not connected to the relay, so the sidebar was not sent",
                    hint="your text is kept; press Enter again once connected",
                )
            async with self.lock:
                # Sealed, shown and in the outbox: the next connection sends it first.
                self.client.queue_text(self.room, text)
            self.local("not connected: queued; it goes when the relay is reachable again")
            return
        mine, warnings = self._mine, self._warnings
        try:
            async with self.lock:
                await self.client.send_text(self.sock, self.room, text, to=to)
        except RelayError as exc:
            # Sealed and in the outbox, and not refused: it goes when the connection is back.
            if self._mine > mine and self._warnings == warnings and to is None:
                self.local(inert(f"queued: the relay did not confirm it ({exc}); it goes again"))
                return
            raise


def run_chat(client: Client, room: Room) -> None:
    ChatApp(client, room).run()
