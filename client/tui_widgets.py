"""The chat screen's own widgets: the log that keeps your place, and the composer.

Neither knows about relays or commands; :mod:`.tui` wires them to the client.
Text from other members reaches them already inert, in Rich ``Text`` objects.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime

from rich.console import RenderableType
from rich.text import Text
from textual import events
from textual.message import Message
from textual.widgets import RichLog, TextArea

from .transcript import Line

#: Keys that put a line break in the composer instead of sending. Shift+Enter
#: reaches the screen only from terminals with the kitty keyboard protocol (kitty,
#: foot, WezTerm, Ghostty, recent iTerm2); everywhere else it arrives as a plain
#: Enter. Ctrl+J sends a line feed in every terminal, so it always works.
NEWLINE_KEYS = frozenset({"shift+enter", "ctrl+j", "alt+enter"})
#: How many of your own sends Up and Down can bring back.
HISTORY = 100


class NewMarker:
    """Where the lines you have not seen yet begin."""

    text = "──── new since you last looked ────"


class ChatLog(RichLog):
    """The scrollback: keeps what it shows so it can wrap it again at a new width,
    stays where you are while you read back, and marks days and unseen lines."""

    class Reached(Message):
        """The reader is at the newest line again."""

    def __init__(self, render: Callable[[Line], RenderableType], *, id: str | None = None) -> None:
        # Wrapped to the widget's width, however narrow: RichLog's default of 78
        # columns would make a narrow terminal scroll sideways instead.
        super().__init__(
            wrap=True, markup=False, highlight=False, auto_scroll=False, min_width=10, id=id
        )
        self.render_entry = render
        self.entries: list[Line | Text | NewMarker] = []
        #: Whether the newest line is in view; new lines scroll only then.
        self.following = True
        self._starts: list[int] = []
        self._day: date | None = None
        self._width = 0
        self._redrawing = False

    def load(self, entries: list[Line | Text | NewMarker]) -> None:
        self.entries = list(entries)
        self.following = True
        self.redraw()

    def add(self, entry: Line | Text | NewMarker) -> None:
        self.entries.append(entry)
        self._write(entry, scroll=self.following)

    def mark_new(self) -> None:
        """Put the marker here, after what is shown; one marker per view."""
        if any(isinstance(e, NewMarker) for e in self.entries):
            self.entries = [e for e in self.entries if not isinstance(e, NewMarker)]
            self.redraw()
        self.add(NewMarker())

    def redraw(self) -> None:
        """Draw every entry again (names changed, or the width did), keeping the
        line at the top of the view there unless the reader was at the end."""
        top = None if self.following else self._entry_at(round(self.scroll_y))
        self._redrawing = True
        try:
            self.clear()
            self._starts, self._day = [], None
            for entry in self.entries:
                self._write(entry, scroll=False)
            if top is None:
                self.scroll_end(animate=False, immediate=True)
            else:
                self.scroll_to(y=self._starts[top], animate=False, immediate=True)
        finally:
            self._redrawing = False
        self.following = top is None or self.scroll_y >= self.max_scroll_y

    def _entry_at(self, y: int) -> int | None:
        found = None
        for i, start in enumerate(self._starts):
            if start > y:
                break
            found = i
        return found

    def _write(self, entry: Line | Text | NewMarker, *, scroll: bool) -> None:
        self._starts.append(len(self.lines))
        if isinstance(entry, Line):
            day = datetime.fromtimestamp(entry.ts).date()
            if day != self._day:
                self._day = day
                self.write(day_separator(day), scroll_end=scroll)
            self.write(self.render_entry(entry), scroll_end=scroll)
        elif isinstance(entry, NewMarker):
            self.write(Text(entry.text, style="bold red"), scroll_end=scroll)
        else:
            self.write(entry, scroll_end=scroll)

    def on_resize(self, event: events.Resize) -> None:
        super().on_resize(event)
        if event.size.width != self._width:
            self._width = event.size.width
            self.redraw()

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self._redrawing:
            return
        was, self.following = self.following, new_value >= self.max_scroll_y
        if self.following and not was:
            self.post_message(self.Reached())


def day_separator(day: date) -> Text:
    return Text(f"──── {day:%A} {day.day} {day:%B %Y} ────", style="dim")


class Composer(TextArea):
    """Multi-line input: Enter sends, Shift+Enter or Ctrl+J starts a new line, a paste
    keeps its line breaks; Up and Down bring back earlier sends while the text is one
    line."""

    class Submitted(Message):
        def __init__(self, composer: Composer, text: str) -> None:
            super().__init__()
            self.composer = composer
            self.text = text

    def __init__(self, *, id: str | None = None, placeholder: str = "") -> None:
        super().__init__(soft_wrap=True, tab_behavior="focus", id=id, placeholder=placeholder)
        self.sent: list[str] = []
        self._recalled: int | None = None
        self._draft = ""

    def remember(self, text: str) -> None:
        if not self.sent or self.sent[-1] != text:
            self.sent = [*self.sent, text][-HISTORY:]
        self._recalled = None

    def set_text(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            result = self.replace("\n", *self.selection, maintain_selection_offset=False)
            self.move_cursor(result.end_location)
            return
        await super()._on_key(event)

    def action_cursor_up(self, select: bool = False) -> None:
        # Multi-line text needs Up to move between its lines.
        if select or "\n" in self.text or not self.sent or self._recalled == 0:
            super().action_cursor_up(select)
            return
        if self._recalled is None:
            self._draft = self.text
            self._recalled = len(self.sent)
        self._recalled -= 1
        self.set_text(self.sent[self._recalled])

    def action_cursor_down(self, select: bool = False) -> None:
        if select or "\n" in self.text or self._recalled is None:
            super().action_cursor_down(select)
            return
        self._recalled += 1
        if self._recalled >= len(self.sent):
            self._recalled = None
            self.set_text(self._draft)
        else:
            self.set_text(self.sent[self._recalled])
