"""The Markdown export, read by a real Markdown parser: every message is one list item
whose text comes out exactly as sent (no link, image, HTML, heading, table, emphasis
or code made of it), and only what Markdown would act on is escaped."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from backchannel.client.render import markdown_escape
from backchannel.client.views import render_export
from tests.client.test_views import client, room_of

HOSTILE = [
    "# a heading\n## another\n====\n----\n***\n___",
    "[a link](http://evil.example) ![an image](http://evil.example/x.png) [ref]\n"
    "[ref]: http://evil.example",
    "<script>alert(1)</script> <b>bold</b> <!-- hidden --> <http://evil.example> <a@b.example>",
    "&#x1b;[2J &amp; &lt;b&gt; &copy;",
    "*emphasis* _emphasis_ **strong** ~~struck~~ `code`\n```\nfenced\n```\n~~~\nfenced\n~~~",
    "| a | b |\n|---|---|\n| c | d |",
    "> quoted\n- a new item?\n+ another\n1. ordered\n2) ordered too\n   indented\n\n\nafter blanks",
    "\n\nstarts with blank lines",
    "        deep indent, not code\n\tand a tab",
    "ends with a backslash \\\nand two spaces  \nhere",
]
PLAIN = [
    "CANARY-ONE (v1.2) - the plan. Ready? Yes! 3+4=7 {ok} #hashtag a_b_c",
    "1.5 million; 20-30 people; e-mail: x@y.example; 50% off; a < b > c; x - y",
]

PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"])


def inline_text(tokens: list) -> str:  # type: ignore[type-arg]
    """What a reader sees in a run of inline tokens (line breaks as newlines); only the
    speaker's name, at the start, is bold."""
    out = []
    for i, token in enumerate(tokens):
        if token.type in ("strong_open", "strong_close") and i < 4:
            assert [t.type for t in tokens[:3]] == ["text", "strong_open", "text"]
            continue
        if token.type == "text":
            out.append(token.content)
        elif token.type in ("softbreak", "hardbreak"):
            out.append("\n")
        else:
            raise AssertionError(f"Markdown made a {token.type} of a message: {token}")
    return "".join(out)


def items(md: str) -> list[str]:
    """The text of each list item, checking that nothing else came of the messages."""
    tokens = PARSER.parse(md)
    kinds = [t.type for t in tokens]
    # The title, the rules' quote, one bullet list: nothing else at the top.
    assert kinds[:3] == ["heading_open", "inline", "heading_close"]
    assert kinds.count("heading_open") == 1
    assert kinds.count("bullet_list_open") == 1
    assert "ordered_list_open" not in kinds
    assert "table_open" not in kinds
    for bad in ("html_block", "code_block", "fence", "hr"):
        assert bad not in kinds, bad
    out, paragraphs = [], []
    depth = 0
    for token in tokens:
        if token.type == "list_item_open":
            depth += 1
            assert depth == 1, "a list inside a message"
            paragraphs = []
        elif token.type == "list_item_close":
            depth -= 1
            out.append("\n".join(paragraphs))
        elif token.type == "inline" and depth:
            paragraphs.append(inline_text(token.children or []))
    return out


@pytest.mark.parametrize("mode", ["attributed", "chatham"])
def test_messages_stay_in_their_items_and_read_exactly_as_sent(
    tmp_path: Path, mode: str
) -> None:
    c = client(tmp_path)
    room, ann = room_of(mode)  # type: ignore[arg-type]
    c.peers.learn(room, ann, "Ann [x](http://evil) *", None)
    for text in HOSTILE + PLAIN:
        c.transcript.add(room, "message", text, sender=ann)
    md = render_export(c, room, "md")
    assert "\x1b" not in md
    shown = items(md)
    assert len(shown) == len(HOSTILE + PLAIN)
    prefix = "**Ann \\[x\\](http://evil) \\***: " if mode == "attributed" else ""
    for text, item in zip(HOSTILE + PLAIN, shown, strict=True):
        # The time and (attributed) the speaker, then the text as sent: blank lines
        # separate paragraphs, leading spaces become no-break spaces, tabs four spaces.
        head, _, said = item.partition(" —")
        assert head.endswith(":00")
        said = said.lstrip(" \n")
        if mode == "attributed":
            assert said.startswith("Ann [x](http://evil) *:")  # the name, inert too
            said = said.removeprefix("Ann [x](http://evil) *:").lstrip(" \n")
        expected = [line.replace("\t", "    ").strip(" ") for line in text.split("\n")]
        got = [line.replace("\u00a0", " ").strip(" ") for line in said.split("\n")]
        assert [e for e in expected if e] == [g for g in got if g], (text, item)
    assert prefix in md


def test_what_markdown_would_not_act_on_is_not_escaped() -> None:
    for text in PLAIN:
        assert markdown_escape(text, indent="  ") == text
    assert markdown_escape("CANARY-ONE") == "CANARY-ONE"
    assert markdown_escape("a\n- b\n1. c\n# d", indent="  ") == "a\n  \\- b\n  1\\. c\n  \\# d"
    assert markdown_escape("two\nlines") == "two<U+000A>lines"  # a title stays one line
