"""Other people's text is inert: no terminal control, no bidi tricks, no markup."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from backchannel.client.render import inert, markdown_escape

HOSTILE = (
    "\x1b[2J\x1b]0;pwned\x07evil\x1b[31m red \x08\x08\r overwritten \u202egnp.exe\u202c"
    " zero\u200bwidth [link](http://x) <b>bold</b> [bold red]rich[/]"
)


def test_escape_sequences_and_bidi_overrides_become_visible_marks() -> None:
    out = inert(HOSTILE)
    for bad in ("\x1b", "\x07", "\x08", "\r", "\u202e", "\u202c", "\u200b"):
        assert bad not in out
    assert "<U+001B>[2J" in out
    assert "<U+202E>gnp.exe<U+202C>" in out
    assert "<U+200B>" in out


@given(st.text())
def test_no_control_or_format_character_survives(text: str) -> None:
    out = inert(text)
    for ch in out:
        assert unicodedata.category(ch) not in ("Cc", "Cs", "Co", "Cn"), repr(ch)
        assert ch not in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"


def test_newlines_only_where_allowed() -> None:
    assert "\n" not in inert("a\nb")
    assert inert("a\nb", multiline=True) == "a\nb"


def test_limit_truncates_visibly() -> None:
    assert inert("x" * 50, limit=10) == "x" * 9 + "…"


def test_markdown_is_escaped() -> None:
    out = markdown_escape("[link](http://evil) ![img](x) <script> *bold* # head")
    assert "\\[link\\]\\(http://evil\\)" in out
    assert "\\<script\\>" in out
    assert "\\*bold\\*" in out
