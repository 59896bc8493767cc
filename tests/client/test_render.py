"""Other people's text is inert: no terminal control, no bidi tricks, no markup."""

from __future__ import annotations

import unicodedata

import pytest
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


INVISIBLE = (
    "\u2028\u2029"  # line and paragraph separators
    "\u2061\u2062\u2063\u2064"  # invisible operators
    "\u206a\u206b\u206c\u206d\u206e\u206f"  # deprecated format controls
    "\U000e0001\U000e0041\U000e007f"  # tag characters
    "\ufff9\ufffa\ufffb"  # interlinear annotation
    "\u115f\u1160\u3164\uffa0\u2800"  # Hangul fillers, blank Braille
)


def test_every_invisible_or_line_breaking_character_is_marked() -> None:
    out = inert("a" + "b".join(INVISIBLE) + "c")
    for ch in INVISIBLE:
        assert ch not in out
        assert f"<U+{ord(ch):04X}>" in out
    assert "\u2028" not in inert("one\u2028two", multiline=True)


@given(st.text())
def test_no_control_or_format_character_survives(text: str) -> None:
    out = inert(text)
    for ch in out:
        assert unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"), repr(ch)
        assert ch not in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f"


def test_newlines_only_where_allowed() -> None:
    assert "\n" not in inert("a\nb")
    assert inert("a\nb", multiline=True) == "a\nb"


def test_limit_truncates_visibly() -> None:
    assert inert("x" * 50, limit=10) == "x" * 9 + "…"


def test_markdown_is_escaped() -> None:
    out = markdown_escape("[link](http://evil) ![img](x) <script> *bold* # head")
    assert "\\[link\\](http://evil)" in out  # no link without its brackets
    assert "\\<script>" in out
    assert "\\*bold\\*" in out
    assert "# head" in out  # not at the start of a line: no heading to escape


def test_a_relays_error_detail_reaches_the_terminal_inert(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A hostile relay's ``detail`` could clear the screen, fake a "delivered" line,
    retitle the window or write the clipboard (OSC 52); the one error line marks it."""
    import typer

    from backchannel.client.cli import errors
    from backchannel.client.relay import RelayError

    detail = "\x1b[2J\x1b]0;title\x07\x1b]52;c;ZXZpbA==\x07\u2028delivered \u202e"
    with pytest.raises(typer.Exit), errors():
        raise RelayError("refused", detail)
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1  # one line, no hint for this code
    for bad in ("\x1b", "\x07", "\u2028", "\u202e"):
        assert bad not in printed
    assert printed.startswith("error: <U+001B>[2J")


def test_json_output_is_inert_on_a_terminal_and_decodes_to_the_exact_text() -> None:
    """The JSON outputs (``read --json``, ``export --format json``, whose title is a
    member's text) keep every string exactly as sent, yet ``cat`` of the file acts on
    no terminal: C1 controls, bidi overrides, line separators, tag characters and
    fillers are written as ``\\u`` escapes."""
    import json

    from backchannel.client.render import json_text

    hostile = "T\u009b2J\u202eitle\u2028\U000e0041\u3164\x1b]52;c;eA==\x07 ok é"
    out = json_text({"title": hostile, "n": [1, 2]}, indent=1)
    assert json.loads(out) == {"title": hostile, "n": [1, 2]}
    assert all(inert(ch) == ch for ch in out if ch != "\n"), out
    assert "é" in out  # ordinary text stays readable
