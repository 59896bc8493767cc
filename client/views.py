"""What both front ends show: rules text, room and member lists, transcript lines, exports.

Neither the command (:mod:`.cli`) nor the chat screen (:mod:`.tui`) owns this;
both import it, and neither imports the other. Text that came from other
members or the relay passes through :func:`~.render.inert` before it is shown.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from backchannel.protocol import roomlog as L

from .core import Client, Line, MemberView, NameTag, Room, pseudonym
from .render import inert, json_text, markdown_escape
from .room import stricter

#: Where the second and later lines of a multi-line message start in plain ``read``.
CONTINUATION = " " * 4


def when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def describe_rules(rules: L.Rules) -> str:
    what = {
        "chatham": "Chatham House: what is said may be used, but never attributed. Exports "
        "carry no names.",
        "attributed": "On the record: exports keep speakers' names.",
        "anonymous": "Anonymous: speakers appear as pseudonyms; names and affiliations are "
        "never shared.",
    }[rules.mode]
    hours = rules.retention / 3600
    amount, unit = (hours / 24, "day") if hours >= 24 else (hours, "hour")
    kept = f"{amount:g} {unit}" + ("" if amount == 1 else "s")
    return f"rules: {what}\nmessages are deleted after {kept}."


def room_json(r: Room) -> dict[str, Any]:
    return {
        "name": r.name,
        "title": r.title,
        "id": r.room_id.hex(),
        "rules": r.state.rules.mode,
        "retention_seconds": r.state.rules.retention,
        "status": r.status,
        "problem": r.problem,
        "members": len(r.state.members),
        "role": r.state.role_of(r.me),
    }


def member_json(m: MemberView) -> dict[str, Any]:
    return {
        "name": m.name,
        "affiliation": m.affiliation,
        "role": m.role,
        "fingerprint": m.fingerprint,
        "verified": m.verified,
        "me": m.me,
    }


def line_mode(r: Room, line: Line) -> str:
    """The rules a line is shown and exported under: the stricter of the room's mode
    when it was recorded and now, so a rule change never exposes what was said before."""
    now = r.state.rules.mode
    return stricter(line.mode or now, now)


def speaker(c: Client, r: Room, line: Line, *, as_you: bool = True) -> str | None:
    if line.sender is None:
        return None
    if line_mode(r, line) == "anonymous" and not (line.mine and as_you):
        return pseudonym(r.room_id, line.sender)
    # Labels come inert and bounded (names.unique_names); cutting one here could
    # cut off the suffix that tells two members apart.
    return inert(c.display_name(r, line.sender, as_you=as_you))


def line_text(c: Client, r: Room, line: Line) -> str:
    """What a line says; a notice about a member names it as it is shown now."""
    if line.about is None:
        return line.text
    return line.text.replace("{who}", c.display_name(r, line.about))


def mark(line: Line, tag: NameTag) -> str:
    """Before the speaker's name, where no name can reach: a name such as "Ann ✓" still
    shows as "? Ann ✓"."""
    if line.mine:
        return "•"
    return "✓" if tag.verified else "?"


def format_line(c: Client, r: Room, line: Line, as_json: bool) -> str:
    # One look-up per line for both the name and the mark.
    tag = None if line.sender is None else c.tag(r, line.sender)
    who = None if tag is None else inert(tag.name)
    if who is not None and not line.mine and line_mode(r, line) == "anonymous":
        who = pseudonym(r.room_id, line.sender or b"")  # said while the room was anonymous
    if as_json:
        return json_text(
            {
                "n": line.n,
                "kind": line.kind,
                "from": who,
                "mine": line.mine,
                "text": line_text(c, r, line),
                "ts": line.ts,
                "sidebar_with": None
                if line.kind != "sidebar"
                else inert(c.display_name(r, line.to if line.mine else line.sender or b"")),
                # Never for our own lines: there is no safety number with oneself.
                "verified": tag is not None and tag.verified and not line.mine,
            },
        )
    if line.kind == "notice":
        return f"[{when(line.ts)}] * {inert(line_text(c, r, line))}"
    if line.kind == "warning":
        return f"[{when(line.ts)}] ! {inert(line_text(c, r, line))}"
    prefix = ""
    if line.kind == "sidebar":
        # Whose sidebar it is: ours name the other end, or a reader could not tell to whom.
        if line.mine:
            prefix = f"(sidebar to {inert(c.display_name(r, line.to or b''))}) "
        else:
            prefix = f"(sidebar from {who}) "
    badge = "?" if tag is None else mark(line, tag)
    # Continuation lines are indented, so no line of a message can pass for a line of its
    # own (every real one starts with its time); what they hold is inert all the same.
    text = inert(line_text(c, r, line), multiline=True).replace("\n", "\n" + CONTINUATION)
    return f"[{when(line.ts)}] {prefix}{badge} {who}: {text}"


def render_export(c: Client, r: Room, fmt: str) -> str:
    mode = r.state.rules.mode
    lines = [line for line in c.lines(r) if line.kind == "message"]
    named = {line.n for line in lines if line_mode(r, line) == "attributed"}
    header = {
        "chatham": "Chatham House rule: this record may be used, but no statement may be "
        "attributed to a speaker or their affiliation.",
        "anonymous": "Anonymous room: speakers are not identified.",
        "attributed": "On the record: statements are attributed.",
    }[mode]
    if mode == "attributed" and len(named) < len(lines):
        header += " Statements made before the room went on the record are not attributed."
    if fmt == "json":
        return json_text(
            {
                "rules": mode,
                "notice": header,
                "title": r.title,
                "messages": [
                    {
                        "time": when(line.ts)[:13] + ":00",
                        "text": line.text,
                        **({"from": speaker(c, r, line, as_you=False)} if line.n in named else {}),
                    }
                    for line in lines
                ],
            },
            indent=1,
        )
    out = [f"# {markdown_escape(r.title or 'Untitled dialogue')}", "", f"> {header}", ""]
    for line in lines:
        # Named as the others see us: "you" means someone else to every other reader.
        attributed = line.n in named
        name = speaker(c, r, line, as_you=False) if attributed else None
        who = f"**{markdown_escape(name or '')}**: " if attributed else ""
        # Further lines indented by the item's content indent ("- "), so they stay in it.
        text = markdown_escape(line.text, indent="  ")
        out.append(f"- {when(line.ts)[:13]}:00 — {who}{text}")
    return "\n".join(out) + "\n"
