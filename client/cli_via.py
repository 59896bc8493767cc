"""The commands' side of the daemon: ask it when it runs, and print what both paths print.

``send``, ``read``, ``members`` and ``rooms`` call :func:`daemon_answer` first;
when no daemon runs for the profile they open it themselves. Either way the
same printers below write the output, so a script cannot tell which path ran.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import typer

from .cliutil import OPTS
from .core import Client, ClientError, Line, Room
from .events import line_event
from .render import inert, json_text
from .rpc import NOT_RUNNING, DaemonClient, ask
from .views import format_line

__all__ = [
    "NOT_RUNNING",
    "daemon_answer",
    "follow_every_room",
    "follow_via_daemon",
    "line_output",
    "print_members",
    "print_rooms",
]


def daemon_answer(method: str, **params: Any) -> Any:
    """The daemon's answer, or :data:`NOT_RUNNING` (the caller opens the profile)."""
    return ask(OPTS.home, method, **params)


def print_members(found: Iterable[dict[str, Any]], as_json: bool) -> None:
    found = list(found)
    if as_json:
        typer.echo(json_text(found))
        return
    for m in found:
        mark = "you" if m["me"] else ("verified" if m["verified"] else "unverified")
        aff = f" ({inert(m['affiliation'], limit=40)})" if m["affiliation"] else ""
        # Not cut: the fingerprint suffix at the end of a label tells lookalikes apart.
        typer.echo(f"{inert(m['name'])}{aff}\t{m['role']}\t{mark}\t{m['fingerprint'][:16]}")


def print_rooms(found: Iterable[dict[str, Any]], as_json: bool, note: Any) -> None:
    found = list(found)
    if as_json:
        typer.echo(json_text(found))
        return
    if not found:
        # On stderr: a script reading stdout sees no rooms, not a sentence.
        note("no rooms yet: create one with `backchannel room create TITLE`, or join one")
    for r in found:
        typer.echo(
            f"{inert(r['name'])}\t{inert(r['title'], limit=40)}\t{r['rules']}\t{r['status']}"
            f"\t{r['members']} members\t{r['id'][:12]}"
        )


def _print_event(event: dict[str, Any], as_json: bool, every_room: bool) -> None:
    if as_json:
        event = {k: v for k, v in event.items() if k != "line"}
        typer.echo(json_text(event))
        return
    line = str(event.get("line", ""))
    typer.echo(f"[{inert(str(event['room_name']))}] {line}" if every_room else line)


def follow_via_daemon(room: str | None, as_json: bool, follow: bool) -> bool:
    """``read`` through the daemon; False when none runs. Subscribes before reading
    back, so nothing that arrives in between is missed (or printed twice)."""
    found = DaemonClient.connect(OPTS.home)
    if found is None:
        return False
    fmt = "json" if as_json else "text"
    with found:
        if follow:
            found.call("subscribe", room=room, format="text")
        shown: set[tuple[str, int]] = set()
        if room is not None:
            for event in found.call("read", room=room, format=fmt):
                _print_event(event, as_json, every_room=False)
                shown.add((event["room"], event["n"]))
        if follow:
            with contextlib.suppress(KeyboardInterrupt):
                for event in found.notifications():
                    if (event["room"], event["n"]) in shown:
                        continue
                    _print_event(event, as_json, every_room=room is None)
    return True


def line_output(c: Client, r: Room, line: Line, as_json: bool) -> str:
    """One line as ``read`` prints it: the line object (docs/client.md) or plain text."""
    return json_text(line_event(c, r, line)) if as_json else format_line(c, r, line, False)


async def follow_every_room(c: Client, as_json: bool) -> None:
    """``read --follow`` without a room and without a daemon: every active room, one
    connection per relay, new lines only (each prefixed by its room when plain)."""

    def show(r: Room, line: Line) -> None:
        text = line_output(c, r, line, as_json)
        typer.echo(text if as_json else f"[{inert(r.name)}] {text}")

    rooms = [r for r in c.rooms() if r.status == "active"]
    if not rooms:
        raise ClientError("no active rooms to follow")

    async def one_relay(group: list[Room]) -> None:
        async with c.connect(group) as sock:
            await c.pump(sock, group, idle=0.1)
            c.on_line = show
            await c.pump(sock, group, forever=True)

    relays = sorted({r.relay for r in rooms})
    await asyncio.gather(*(one_relay([r for r in rooms if r.relay == x]) for x in relays))
