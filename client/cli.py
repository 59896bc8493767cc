"""The ``backchannel`` command.

Output rules (docs/client.md): results go to stdout and nothing else does when
stdout is not a terminal, so commands compose in scripts; notices, prompts and
errors go to stderr. Every error a user can cause prints one ``error:`` line
(and, where it helps, a ``hint:`` line) and exits non-zero; no tracebacks.
Text written by other members passes through :func:`render.inert` everywhere.
"""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import platformdirs
import typer

from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.errors import ProtocolError

from .core import Client, ClientError, Line, MemberView, Room
from .relay import RelayError
from .render import inert
from .store import ProfileInUse, Store, StoreError, wipe
from .views import describe_rules, format_line, member_json, render_export, room_json

T = TypeVar("T")


class Exit(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    RELAY = 3
    REFUSED = 4


KDF_PROFILES = {
    "moderate": (P.ARGON2_OPSLIMIT_DEFAULT, P.ARGON2_MEMLIMIT_DEFAULT),
    # For test suites only: makes a passphrase guessable quickly.
    "test-insecure": (P.ARGON2_OPSLIMIT_MIN, P.ARGON2_MEMLIMIT_MIN),
}

app = typer.Typer(
    name="backchannel",
    help="End-to-end encrypted back-channel for Track II dialogues.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
room_app = typer.Typer(help="Create and manage rooms.", no_args_is_help=True)
app.add_typer(room_app, name="room")


class Options:
    home: Path
    passphrase_file: Path | None = None
    proxy: str | None = None


OPTS = Options()


@app.callback()
def main_options(
    home: Annotated[
        Path | None,
        typer.Option(
            "--home", envvar="BACKCHANNEL_HOME", help="Directory holding your encrypted state."
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option("--passphrase-file", help="Read the passphrase from this file (scripts)."),
    ] = None,
    proxy: Annotated[
        str | None,
        typer.Option("--proxy", envvar="BACKCHANNEL_PROXY", help="e.g. socks5://127.0.0.1:9050"),
    ] = None,
) -> None:
    OPTS.home = home or Path(platformdirs.user_data_dir("backchannel", appauthor=False))
    OPTS.passphrase_file = passphrase_file
    OPTS.proxy = proxy


# --- plumbing ----------------------------------------------------------------------------


def err(message: str, hint: str | None = None, code: Exit = Exit.ERROR) -> NoReturn:
    # Inert: a relay's error detail (or a name in a message) may carry escape sequences.
    typer.echo(f"error: {inert(message)}", err=True)
    if hint:
        typer.echo(f"hint: {inert(hint)}", err=True)
    raise typer.Exit(int(code))


def note(message: str) -> None:
    typer.echo(message, err=True)


def is_tty() -> bool:
    return sys.stdout.isatty()


def passphrase(*, confirm: bool = False) -> str:
    if OPTS.passphrase_file is not None:
        try:
            return OPTS.passphrase_file.read_text().rstrip("\n")
        except OSError as exc:
            err(f"cannot read the passphrase file: {exc.strerror}")
    env = os.environ.get("BACKCHANNEL_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        err(
            "no passphrase",
            hint="set BACKCHANNEL_PASSPHRASE or use --passphrase-file when not on a terminal",
        )
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        err("the passphrases differ")
    return first


@contextmanager
def errors() -> Iterator[None]:
    """Map every error a user can cause to one clear line."""
    try:
        yield
    except ClientError as exc:
        err(str(exc), exc.hint)
    except ProfileInUse as exc:
        err(str(exc), "close the other window, or wait for it to finish")
    except StoreError as exc:
        err(str(exc), "check --home and the passphrase")
    except RelayError as exc:
        code = Exit.RELAY if exc.code in ("unreachable", "disconnected") else Exit.REFUSED
        hint = "is the relay running, and the URL right?" if exc.code == "unreachable" else None
        err(str(exc), hint, code)
    except ProtocolError as exc:
        err(f"refused: {exc} ({exc.code})", code=Exit.REFUSED)
    except KeyboardInterrupt:
        err("interrupted")


def run(work: Callable[[Client], Awaitable[T]]) -> T:
    with errors():
        store = Store.open(OPTS.home, passphrase())
        client = Client(store, proxy=OPTS.proxy)

        async def go() -> T:
            try:
                return await work(client)
            finally:
                await client.aclose()

        try:
            return asyncio.run(go())
        finally:
            store.close()


DURATION = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> int:
    match = DURATION.match(text.strip())
    if not match:
        err(f"not a duration: {text!r}", hint="use e.g. 90m, 12h, 7d or 2w")
    return int(match.group(1)) * UNITS[match.group(2)]


# --- commands ----------------------------------------------------------------------------


@app.command()
def init(
    relay: Annotated[str, typer.Option("--relay", help="The relay's URL, from your organiser.")],
    name: Annotated[str, typer.Option("--name", help="How others in your rooms see you.")],
    affiliation: Annotated[
        str | None, typer.Option("--affiliation", help="Optional; never shared in anonymous rooms.")
    ] = None,
) -> None:
    """Create your encrypted profile.

    Example: backchannel init --relay https://relay.example.org --name "Leila"
    """
    with errors():
        if Store.exists(OPTS.home):
            err(f"a profile already exists in {OPTS.home}", hint="use --home for another one")
        ops, mem = KDF_PROFILES.get(
            os.environ.get("BACKCHANNEL_KDF_PROFILE", "moderate"), KDF_PROFILES["moderate"]
        )
        secret = passphrase(confirm=True)
        store = Store.create(OPTS.home, secret, opslimit=ops, memlimit=mem)
        try:
            Client.init_profile(store, relay, name, affiliation)
        except ClientError:
            store.close()
            wipe(OPTS.home)
            raise
        store.close()
    note(f"profile created in {OPTS.home}")


@room_app.command("create")
def room_create(
    title: Annotated[
        str, typer.Argument(help="The room's title (encrypted; never sent to the relay).")
    ],
    rules: Annotated[
        str, typer.Option("--rules", help="chatham, attributed or anonymous")
    ] = "chatham",
    retention: Annotated[
        str, typer.Option("--retention", help="How long messages are kept.")
    ] = "7d",
    token: Annotated[
        str | None, typer.Option("--token", help="Room-creation token, if the relay needs one.")
    ] = None,
) -> None:
    """Create an invite-only room; prints its local name."""
    if rules not in L.MODES:
        err(
            f"unknown rules {rules!r}", hint="use chatham, attributed or anonymous", code=Exit.USAGE
        )
    seconds = duration(retention)
    try:
        room_rules = L.Rules(mode=rules, retention=seconds)  # type: ignore[arg-type]
    except ProtocolError:
        err("retention must be between 1 minute and 10 years")
    room = run(lambda c: c.create_room(title, room_rules, token=token))
    typer.echo(room.name)
    if is_tty():
        note(
            f"created {rules} room; messages kept {retention}. Next: backchannel invite {room.name}"
        )


@app.command()
def invite(
    room: Annotated[str, typer.Argument(help="Local name, title or id prefix.")],
    role: Annotated[str, typer.Option("--role")] = "participant",
    expires: Annotated[str, typer.Option("--expires")] = "2d",
    uses: Annotated[int, typer.Option("--uses", min=1)] = 1,
) -> None:
    """Make an invite code (and, on a terminal, a QR code) for ROOM."""
    if role not in L.ROLES:
        err(f"unknown role {role!r}", hint="participant, observer or facilitator", code=Exit.USAGE)
    seconds = duration(expires)

    async def work(c: Client) -> str:
        return await c.invite(c.room(room), role, seconds, uses)  # type: ignore[arg-type]

    code = run(work)
    typer.echo(code)
    if is_tty():
        import segno

        buf = io.StringIO()
        segno.make(code, error="m").terminal(out=buf, compact=True)
        note(buf.getvalue())
        note(f"send this code privately; it admits {uses} person(s) as {role} for {expires}")


@app.command()
def join(
    code: Annotated[str, typer.Argument(help="The invite code you were given.")],
    accept_rules: Annotated[
        bool, typer.Option("--accept-rules", help="Accept without asking.")
    ] = False,
) -> None:
    """Join a room with an invite code, after checking the room and its rules."""

    def accept(rules: L.Rules) -> bool:
        note(describe_rules(rules))
        if accept_rules:
            return True
        if not sys.stdin.isatty():
            err("the rules must be accepted", hint="pass --accept-rules in scripts")
        return typer.confirm("Do you accept these rules?", err=True)

    room = run(lambda c: c.join(code, accept_rules=accept))
    typer.echo(room.name)


@app.command()
def rooms(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List your rooms."""

    async def work(c: Client) -> list[Room]:
        return c.rooms()

    found = run(work)
    if as_json:
        typer.echo(json.dumps([room_json(r) for r in found], indent=None))
        return
    for r in found:
        typer.echo(
            f"{r.name}\t{inert(r.title, limit=40)}\t{r.state.rules.mode}\t{r.status}"
            f"\t{len(r.state.members)} members\t{r.room_id.hex()[:12]}"
        )


@app.command()
def members(
    room: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List a room's members, their roles and whether you verified them."""

    async def work(c: Client) -> list[MemberView]:
        r = c.room(room)
        if r.status == "active":
            await c.sync_log(r)
        return c.members(r)

    found = run(work)
    if as_json:
        typer.echo(
            json.dumps([member_json(m) for m in found])
        )
        return
    for m in found:
        mark = "you" if m.me else ("verified" if m.verified else "unverified")
        aff = f" ({inert(m.affiliation, limit=40)})" if m.affiliation else ""
        # Not cut: the fingerprint suffix at the end of a label tells lookalikes apart.
        typer.echo(f"{m.name}{aff}\t{m.role}\t{mark}\t{m.fingerprint[:16]}")


@app.command()
def send(
    room: Annotated[str, typer.Argument()],
    text: Annotated[
        str | None, typer.Argument(help="The message; read from stdin if absent.")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="A member: sends a private sidebar.")
    ] = None,
) -> None:
    """Send a message to ROOM (or a private sidebar with --to)."""
    body = text if text is not None else sys.stdin.read()
    body = body.rstrip("\n")
    if not body:
        err("nothing to send", code=Exit.USAGE)

    async def work(c: Client) -> None:
        r = c.room(room)
        async with c.connect([r]) as sock:
            await c.pump(sock, [r], idle=0.05)
            target = None if to is None else c.member(r, to).key.sign
            await c.send_text(sock, r, body, to=target)

    run(work)


@app.command()
def read(
    room: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new messages.")
    ] = False,
) -> None:
    """Fetch new messages and print the room's transcript."""

    async def work(c: Client) -> None:
        r = c.room(room)
        shown = -1

        def show(lines: list[Line]) -> None:
            nonlocal shown
            for line in lines:
                typer.echo(format_line(c, r, line, as_json))
                shown = max(shown, line.n)

        if r.status == "active":
            async with c.connect([r]) as sock:
                await c.pump(sock, [r], idle=0.1)
                await c.retry_stash(r)
                show(c.lines(r))
                if follow:
                    c.on_line = lambda _room, line: show([line])
                    await c.pump(sock, [r], forever=True)
        else:
            show(c.lines(r))

    run(work)


@app.command()
def verify(
    room: Annotated[str, typer.Argument()],
    member: Annotated[str, typer.Argument(help="Display name or fingerprint prefix.")],
    confirm: Annotated[
        bool, typer.Option("--confirm", help="Record that the numbers matched.")
    ] = False,
) -> None:
    """Show the safety number you share with MEMBER; compare it out of band."""

    async def work(c: Client) -> tuple[str, str, bool]:
        r = c.room(room)
        m = c.member(r, member)
        number = c.safety(r, m)
        agreed = confirm
        if not confirm and sys.stdin.isatty():
            note("\n".join(number.lines()))
            agreed = typer.confirm(
                "Did you compare this number with them and does it match?", err=True
            )
        if agreed:
            c.mark_verified(r, m)
        return m.name, number.text(), agreed

    name, number, agreed = run(work)
    typer.echo(number)
    if agreed:
        note(f"{inert(name)} is now marked verified")


@app.command()
def remove(
    room: Annotated[str, typer.Argument()], member: Annotated[str, typer.Argument()]
) -> None:
    """Remove MEMBER from ROOM (facilitators); everyone's keys rotate."""

    async def work(c: Client) -> str:
        r = c.room(room)
        m = c.member(r, member)
        await c.remove(r, m.key.sign)
        return m.name

    name = run(work)
    note(f"removed {inert(name)}")


@app.command()
def leave(room: Annotated[str, typer.Argument()]) -> None:
    """Leave ROOM."""

    async def work(c: Client) -> None:
        await c.leave(c.room(room))

    run(work)
    note("you left the room")


@app.command()
def export(
    room: Annotated[str, typer.Argument()],
    fmt: Annotated[str, typer.Option("--format", help="md or json")] = "md",
    output: Annotated[Path | None, typer.Option("-o", help="Write to this file.")] = None,
) -> None:
    """Export the transcript, honouring the room's rules (no attribution under chatham)."""
    if fmt not in ("md", "json"):
        err("the format is md or json", code=Exit.USAGE)

    async def work(c: Client) -> str:
        r = c.room(room)
        return render_export(c, r, fmt)

    text = run(work)
    if output is None:
        typer.echo(text)
    else:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        note(f"wrote {output}")


@app.command("wipe")
def wipe_cmd(yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Destroy all local state (keys, transcripts) at once. Cannot be undone."""
    if not yes:
        if not sys.stdin.isatty():
            err("wipe needs confirmation", hint="pass --yes in scripts")
        typer.confirm(f"Destroy everything in {OPTS.home}?", abort=True, err=True)
    if wipe(OPTS.home):
        note("local state destroyed")
    else:
        note("nothing to wipe")
