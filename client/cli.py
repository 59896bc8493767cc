"""The ``backchannel`` command.

Output rules (docs/client.md): results go to stdout and nothing else does when
stdout is not a terminal, so commands compose in scripts; notices, prompts and
errors go to stderr. Every error a user can cause prints one ``error:`` line
(and, where it helps, a ``hint:`` line) and exits non-zero; no tracebacks.
Text written by other members passes through :func:`render.inert` everywhere.
"""

from __future__ import annotations

import io
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import platformdirs
import typer

from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.errors import ProtocolError

from .cli_via import (
    NOT_RUNNING,
    daemon_answer,
    follow_every_room,
    follow_via_daemon,
    line_output,
    print_members,
    print_rooms,
)
from .cliutil import (
    DURATION_HELP,
    OPTS,
    Exit,
    check_name,
    check_proxy,
    checked_relay,
    confirm,
    duration,
    err,
    errors,
    is_tty,
    note,
    passphrase,
    run,
    until_wiped,
)
from .core import Client, ClientError, Line, MemberView, Room
from .relay import Unreachable
from .render import inert
from .store import ProfileInUse, Store, hold, wipe
from .views import describe_rules, member_json, render_export, room_json

__all__ = ["OPTS", "app", "err", "errors", "note", "passphrase"]

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
    # Plain help: Rich's shows a type for every option, "<bool>" even for flags.
    rich_markup_mode=None,
)
room_app = typer.Typer(help="Create and manage rooms.", no_args_is_help=True)
app.add_typer(room_app, name="room")

ROOM_HELP = "The room's local name, title or id prefix."
MEMBER_HELP = "A display name as `members` shows it, or a fingerprint prefix."
#: On stderr when a command shows local state because the relay cannot be reached.
OFFLINE = "relay unreachable — showing what is stored locally"
RoomArg = Annotated[str, typer.Argument(metavar="ROOM", help=ROOM_HELP)]
MemberArg = Annotated[str, typer.Argument(metavar="MEMBER", help=MEMBER_HELP)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (docs/client.md).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"backchannel {metadata.version('backchannel')}")
        raise typer.Exit()


@app.callback()
def main_options(
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="BACKCHANNEL_HOME",
            metavar="DIR",
            help="Directory holding your encrypted state.",
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file", metavar="FILE", help="Read the passphrase from FILE (scripts)."
        ),
    ] = None,
    proxy: Annotated[
        str | None,
        typer.Option(
            "--proxy",
            envvar="BACKCHANNEL_PROXY",
            metavar="URL",
            help="Reach relays through this SOCKS5 proxy, e.g. socks5://127.0.0.1:9050 (Tor).",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    OPTS.home = home or Path(platformdirs.user_data_dir("backchannel", appauthor=False))
    OPTS.passphrase_file = passphrase_file
    OPTS.proxy = None if proxy is None else check_proxy(proxy)


# --- commands ----------------------------------------------------------------------------


@app.command()
def init(
    relay: Annotated[
        str, typer.Option("--relay", metavar="URL", help="The relay's URL, from your organiser.")
    ],
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="How others in your rooms see you.")
    ],
    affiliation: Annotated[
        str | None,
        typer.Option(
            "--affiliation", metavar="TEXT", help="Optional; never shared in anonymous rooms."
        ),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Create it without checking that the relay answers.")
    ] = False,
) -> None:
    """Create your encrypted profile.

    Example: backchannel init --relay https://relay.example.org --name "Leila"
    """
    with errors():
        if Store.exists(OPTS.home):
            err(f"a profile already exists in {OPTS.home}", hint="use --home for another one")
        # Before the passphrase: a mistyped URL should not cost a profile made in vain.
        relay = checked_relay(relay, offline=offline)
        name = check_name(name)
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


@app.command()
def profile(
    relay: Annotated[
        str | None,
        typer.Option("--relay", metavar="URL", help="The relay new rooms are created on."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", metavar="NAME", help="Your new display name.")
    ] = None,
    affiliation: Annotated[
        str | None,
        typer.Option("--affiliation", metavar="TEXT", help='Your affiliation ("" clears it).'),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Do not check that the new relay answers.")
    ] = False,
) -> None:
    """Show your profile, or change your name, affiliation or relay."""
    if relay is not None:
        relay = checked_relay(relay, offline=offline)
    if name is not None:
        name = check_name(name)

    async def work(c: Client) -> tuple[str, str, str | None]:
        if relay is name is affiliation is None:
            found = c.profile()
        else:
            found = c.update_profile(name=name, relay=relay, affiliation=affiliation)
        return found.name, found.relay, found.affiliation

    shown = run(work)
    typer.echo(f"name\t{inert(shown[0])}\nrelay\t{shown[1]}\naffiliation\t{inert(shown[2] or '')}")
    if name is not None or affiliation is not None:
        note("your rooms see the change after your next read, send or chat in each")
    if relay is not None:
        note("new rooms are created there; rooms you have stay on their own relay")


@room_app.command("create")
def room_create(
    title: Annotated[
        str,
        typer.Argument(
            metavar="TITLE", help="The room's title (encrypted; never sent to the relay)."
        ),
    ],
    rules: Annotated[
        str,
        typer.Option(
            "--rules",
            metavar="chatham|attributed|anonymous",
            help="Chatham House (default), on the record, or pseudonymous.",
        ),
    ] = "chatham",
    retention: Annotated[
        str,
        typer.Option(
            "--retention", metavar="DURATION", help=f"How long messages are kept: {DURATION_HELP}."
        ),
    ] = "7d",
    token: Annotated[
        str | None,
        typer.Option("--token", metavar="T", help="Room-creation token, if the relay needs one."),
    ] = None,
) -> None:
    """Create an invite-only room; prints its local name."""
    if rules not in L.MODES:
        err(
            f"unknown rules {rules!r}", hint="use chatham, attributed or anonymous", code=Exit.USAGE
        )
    seconds = duration(retention, "the retention")
    try:
        room_rules = L.Rules(mode=rules, retention=seconds)  # type: ignore[arg-type]
    except ProtocolError:
        err("the retention must be between 1 minute and 10 years", code=Exit.USAGE)
    room = run(lambda c: c.create_room(title, room_rules, token=token))
    typer.echo(room.name)
    if is_tty():
        note(
            f"created {rules} room; messages kept {retention}. Next: backchannel invite {room.name}"
        )


@app.command()
def invite(
    room: RoomArg,
    role: Annotated[
        str,
        typer.Option(
            "--role",
            metavar="participant|observer|facilitator",
            help="What the invited person may do.",
        ),
    ] = "participant",
    expires: Annotated[
        str,
        typer.Option(
            "--expires", metavar="DURATION", help=f"How long the code works: {DURATION_HELP}."
        ),
    ] = "2d",
    uses: Annotated[
        int, typer.Option("--uses", min=1, metavar="N", help="How many people it admits.")
    ] = 1,
) -> None:
    """Make an invite code (and, on a terminal, a QR code) for ROOM."""
    if role not in L.ROLES:
        err(f"unknown role {role!r}", hint="participant, observer or facilitator", code=Exit.USAGE)
    seconds = duration(expires, "the invite's lifetime")

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
    code: Annotated[
        list[str],
        typer.Argument(
            metavar="[RELAY-URL] CODE",
            help="The invite you were given: the relay's address and a bcinv2 code "
            "(quoted or not; the address may be left out if it is your own relay), "
            "or an older bcinv1 code.",
        ),
    ],
    accept_rules: Annotated[
        bool, typer.Option("--accept-rules", help="Accept the room's rules without asking.")
    ] = False,
) -> None:
    """Join a room with an invite code, after checking the room and its rules."""

    def accept(rules: L.Rules) -> bool:
        note(describe_rules(rules))
        if accept_rules:
            return True
        if not sys.stdin.isatty():
            err("the rules must be accepted", hint="pass --accept-rules in scripts")
        return confirm("Do you accept these rules?")

    room = run(lambda c: c.join(" ".join(code), accept_rules=accept))
    typer.echo(room.name)


@app.command()
def rooms(as_json: JsonFlag = False) -> None:
    """List your rooms."""

    async def work(c: Client) -> list[Room]:
        return c.rooms()

    with errors():
        answer = daemon_answer("rooms")
    if answer is NOT_RUNNING:
        answer = [room_json(r) for r in run(work)]
    print_rooms(answer, as_json, note)


@app.command()
def members(room: RoomArg, as_json: JsonFlag = False) -> None:
    """List a room's members, their roles and whether you verified them."""

    async def work(c: Client) -> list[MemberView]:
        r = c.room(room)
        if r.status == "active":
            try:
                await c.sync_log(r)
            except Unreachable:
                note(OFFLINE)
        return c.members(r)

    with errors():
        answer = daemon_answer("members", room=room)
    if answer is NOT_RUNNING:
        answer = [member_json(m) for m in run(work)]
    print_members(answer, as_json)


@app.command()
def send(
    room: RoomArg,
    text: Annotated[
        str | None,
        typer.Argument(metavar="TEXT", help="The message; read from stdin if absent."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="MEMBER", help="Send a private sidebar to MEMBER."),
    ] = None,
) -> None:
    """Send a message to ROOM (or a private sidebar with --to)."""
    body = text if text is not None else sys.stdin.read()
    body = body.rstrip("\n")
    if not body:
        err("nothing to send", code=Exit.USAGE)
    yourself = ClientError("a sidebar goes to another member, not to you")

    async def work(c: Client) -> bytes:
        r = c.room(room)
        online = False
        try:
            async with c.connect([r]) as sock:
                online = True
                await c.pump(sock, [r], idle=0.05)
                target = None if to is None else c.member(r, to, yourself=yourself).key.sign
                return await c.send_text(sock, r, body, to=target)
        except Unreachable:
            # Only if nothing of this message was sealed yet; a sidebar needs a session.
            if online or to is not None or r.status != "active":
                raise
            mid = c.queue_text(r, body)
            note("relay unreachable — queued; will be sent when the relay is reachable")
            return mid

    with errors():
        answer = daemon_answer("send", room=room, text=body, to=to)
    # The message's id, as every member's `read --json` and the daemon show it.
    typer.echo(run(work).hex() if answer is NOT_RUNNING else answer["id"])


@app.command()
def read(
    room: Annotated[
        str | None,
        typer.Argument(metavar="[ROOM]", help=ROOM_HELP + " Without it, --follow follows all."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new messages (Ctrl-C stops).")
    ] = False,
) -> None:
    """Fetch new messages and print the room's transcript (or follow every room)."""
    if room is None and not follow:
        err("name a room, or pass --follow to follow every room", code=Exit.USAGE)
    with errors():
        if follow_via_daemon(room, as_json, follow):
            return

    async def work(c: Client) -> None:
        if room is None:
            await until_wiped(follow_every_room(c, as_json), OPTS.home)
            return
        r = c.room(room)

        def show(lines: list[Line]) -> None:
            for line in lines:
                typer.echo(line_output(c, r, line, as_json))

        online = False
        if r.status == "active":
            try:
                async with c.connect([r]) as sock:
                    online = True
                    await c.pump(sock, [r], idle=0.1)
                    await c.retry_stash(r)
                    show(c.lines(r))
                    if follow:
                        c.on_line = lambda _room, line: show([line])
                        # A wipe elsewhere (`wipe --force`) ends this at once, with one line.
                        await until_wiped(c.pump(sock, [r], forever=True), OPTS.home)
            except Unreachable:
                if online:
                    raise
                note(OFFLINE)
                show(c.lines(r))
                if follow:
                    raise
        else:
            show(c.lines(r))

    run(work)


@app.command()
def verify(
    room: RoomArg,
    member: MemberArg,
    confirm_: Annotated[
        bool, typer.Option("--confirm", help="Record that the numbers matched.")
    ] = False,
) -> None:
    """Show the safety number you share with MEMBER; compare it out of band."""
    yourself = ClientError(
        "you cannot verify yourself: a safety number is compared with another member",
        hint="name another member; `backchannel members ROOM` lists them",
    )

    async def work(c: Client) -> tuple[str, str, bool]:
        r = c.room(room)
        m = c.member(r, member, yourself=yourself)
        number = c.safety(r, m)
        agreed = confirm_
        if not confirm_ and sys.stdin.isatty():
            note("\n".join(number.lines()))
            agreed = confirm("Did you compare this number with them and does it match?")
        if agreed:
            c.mark_verified(r, m)
        return m.name, number.text(), agreed

    name, number, agreed = run(work)
    typer.echo(number)
    if agreed:
        note(f"{inert(name)} is now marked verified")


@app.command()
def remove(room: RoomArg, member: MemberArg) -> None:
    """Remove MEMBER from ROOM (facilitators); everyone's keys rotate."""
    yourself = ClientError("you cannot remove yourself", hint="use `backchannel leave ROOM`")

    async def work(c: Client) -> str:
        r = c.room(room)
        m = c.member(r, member, yourself=yourself)
        await c.remove(r, m.key.sign)
        return m.name

    name = run(work)
    note(f"removed {inert(name)}")


@app.command()
def leave(
    room: RoomArg,
    force: Annotated[
        bool, typer.Option("--force", help="Leave even as the room's only facilitator.")
    ] = False,
) -> None:
    """Leave ROOM."""

    async def work(c: Client) -> None:
        await c.leave(c.room(room), force=force)

    run(work)
    note("you left the room")


@app.command()
def export(
    room: RoomArg,
    fmt: Annotated[
        str, typer.Option("--format", metavar="md|json", help="Markdown or JSON.")
    ] = "md",
    output: Annotated[
        Path | None, typer.Option("-o", metavar="FILE", help="Write to FILE (mode 600).")
    ] = None,
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
        return
    try:
        # Private from the first byte: a transcript is no less sensitive out of the store.
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    except OSError as exc:
        err(f"cannot write {output}: {exc.strerror}", hint="check that the folder exists")
    note(f"wrote {output}")


@app.command("wipe")
def wipe_cmd(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Wipe even while another backchannel process has it open."),
    ] = False,
) -> None:
    """Destroy all local state (keys, transcripts) at once. Cannot be undone."""
    with errors():
        if not yes:
            if not sys.stdin.isatty():
                err("wipe needs confirmation", hint="pass --yes in scripts")
            if not confirm(f"Destroy everything in {OPTS.home}?"):
                err("nothing was wiped")
        if not Store.exists(OPTS.home):
            note("nothing to wipe")
            return
        try:
            lock = hold(OPTS.home)
        except ProfileInUse as exc:
            if not force:
                # Pulled from under it, the other process would fail at its next read.
                err(
                    f"{exc}; nothing was wiped",
                    hint="close it first, or pass --force to wipe now (it then stops)",
                )
            lock = None
        try:
            wipe(OPTS.home)
        finally:
            if lock is not None:
                lock.close()
    note("local state destroyed")
