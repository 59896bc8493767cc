"""Making other people's text inert before it reaches a terminal, a file or the chat screen.

Everything another member wrote (messages, display names, affiliations, room
titles) is untrusted. Before it is shown it passes through :func:`inert`:

* C0 and C1 control characters (ESC, BEL, CR, backspace, ...) and DEL, which
  could move the cursor, recolour, retitle the window or hide text, become
  visible ``<U+001B>`` marks; a line feed is kept only where the caller allows
  multi-line text;
* Unicode bidirectional controls (LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI,
  LRM, RLM, ALM), which can make text read differently from its bytes (the
  "Trojan Source" trick), become visible marks as well;
* every other format character (Unicode category Cf: zero-width spaces and
  joiners, the BOM, invisible operators U+2061-2064, deprecated format controls
  U+206A-206F, tag characters U+E0000-E007F, interlinear annotation U+FFF9-FFFB),
  the line and paragraph separators U+2028/U+2029, and letters that render as
  nothing (the Hangul fillers, the blank Braille pattern) are marked, so text
  cannot hide, break lines where the caller forbade it, or make two names look alike.

Markup is not interpreted anywhere: the chat screen renders with Rich/Textual
``Text`` objects built from plain strings (never ``markup=True``), and the
Markdown export escapes what Markdown would act on.
"""

from __future__ import annotations

import json
import re
import unicodedata

_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u115f\u1160\u3164\uffa0\u2800")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
#: Markdown acts on these wherever they stand (emphasis, code, links, tables, strikethrough).
_MD_ALWAYS = frozenset("\\`*_[]~|")
#: ``&`` only starts an entity (``&#x1b;``); ``<`` starts a tag, comment or autolink
#: unless a space, digit, ``=``, ``-`` or ``<`` follows, or it opens one of our marks.
_MD_ENTITY = re.compile(r"&(?=#?\w+;)")
_MD_TAG = re.compile(r"<(?![\s\d=<-]|$|U\+[0-9A-F]{4,6}>)")
#: What makes a block at the start of a line: heading, quote, list item, setext
#: underline or thematic break (``*`` and ``_`` are escaped everywhere already).
_MD_BLOCK = re.compile(
    r"^(?P<lead> {0,3})(?P<token>#{1,6}(?=\s|$)|>|[-+](?=\s|$)|-+ *$|=+ *$|\d{1,9}(?=[.)](?:\s|$)))"
)


def _mark(ch: str) -> str:
    return f"<U+{ord(ch):04X}>"


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or ch in _INVISIBLE or unicodedata.category(ch) in _UNSAFE_CATEGORIES


def json_text(value: object, *, indent: int | None = None) -> str:
    """``value`` as JSON whose bytes are inert on a terminal and whose strings still
    decode to exactly what was sent: every character :func:`inert` would mark is
    written as a ``\\uXXXX`` escape (they occur only inside strings, so the
    document stays valid JSON)."""
    raw = json.dumps(value, ensure_ascii=False, indent=indent)
    out = []
    for ch in raw:
        # A raw newline can only be the indentation's: json.dumps escapes those in strings.
        if ch != "\n" and _unsafe(ch):
            code = ord(ch)
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def inert(text: str, *, multiline: bool = False, limit: int | None = None) -> str:
    """``text`` with every character that could act on a terminal made visible."""
    out = []
    for ch in text:
        if ch == "\n" and multiline:
            out.append(ch)
        elif ch == "\t":
            out.append("    ")
        elif _unsafe(ch):
            out.append(_mark(ch))
        else:
            out.append(ch)
    result = "".join(out)
    if limit is not None and len(result) > limit:
        result = result[: limit - 1] + "…"
    return result


def _md_inline(line: str) -> str:
    out = []
    for i, ch in enumerate(line):
        # "_" inside a word (snake_case) is no emphasis: only at a word's edge is it.
        inside = 0 < i < len(line) - 1 and line[i - 1].isalnum() and line[i + 1].isalnum()
        inside = inside and ch == "_"
        out.append("\\" + ch if ch in _MD_ALWAYS and not inside else ch)
    line = "".join(out)
    line = _MD_ENTITY.sub(r"\\&", line)
    return _MD_TAG.sub(r"\\<", line)


def _md_line_start(line: str) -> str:
    match = _MD_BLOCK.match(line)
    if match is None:
        return line
    if match["token"][0].isdigit():  # "1." and "1)" start an ordered list: escape the mark
        return line[: match.end()] + "\\" + line[match.end() :]
    return match["lead"] + "\\" + line[len(match["lead"]) :]


def markdown_escape(text: str, *, indent: str | None = None) -> str:
    """Inert text that Markdown renders literally: no heading, link, image, HTML,
    emphasis, code, table or list can come of it, and only what Markdown would act
    on where it stands is escaped (``CANARY-ONE`` stays as it is).

    Without ``indent`` the text is one line at an inline position (a title, a
    name); line breaks show as marks. With ``indent`` line breaks are kept and
    each further line starts with ``indent`` (a list item's content indent, so
    the text stays inside its item) and is escaped for the start of a line.
    """
    if indent is None:
        return _md_inline(inert(text))
    first, *rest = inert(text, multiline=True).split("\n")
    out = [_md_inline(first)]
    for line in rest:
        body = line.lstrip(" ")
        # No-break spaces keep the indentation visible without making a code block.
        lead = "\u00a0" * (len(line) - len(body))
        out.append(indent + lead + _md_line_start(_md_inline(body)) if line else "")
    return "\n".join(out)
