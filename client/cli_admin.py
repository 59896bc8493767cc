"""``backchannel role``, ``rules``, ``invites`` and ``revoke``: a facilitator's levers
(docs/client.md, "Roles and rule changes"). The work is the library's
(:mod:`.admin`); this module only reads arguments and prints results, under the
output rules of :mod:`.cli`.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer

from backchannel.protocol import roomlog as L

from .cli import app
from .cliutil import DURATION_HELP, Exit, duration, err, is_tty, note, run
from .core import Client, ClientError, InviteView
from .render import inert
from .rulechanges import ROLE_MEANS, kept_for
from .views import describe_rules, when

RoomArg = Annotated[
    str, typer.Argument(metavar="ROOM", help="The room's local name, title or id prefix.")
]


class Role(StrEnum):
    facilitator = "facilitator"
    participant = "participant"
    observer = "observer"


class Mode(StrEnum):
    chatham = "chatham"
    attributed = "attributed"
    anonymous = "anonymous"


def _role(text: str) -> Role:
    # Typer's own refusal is a usage box; every mistake here is one `error:` line.
    if text not in Role.__members__:
        err(f"unknown role {text!r}", hint="participant, observer or facilitator", code=Exit.USAGE)
    return Role(text)


def _mode(text: str) -> Mode:
    if text not in Mode.__members__:
        err(f"unknown mode {text!r}", hint="chatham, attributed or anonymous", code=Exit.USAGE)
    return Mode(text)


@app.command()
def role(
    room: RoomArg,
    member: Annotated[
        str,
        typer.Argument(
            metavar="MEMBER",
            help="A display name as `members` shows it, a fingerprint prefix, or `you`.",
        ),
    ],
    new_role: Annotated[
        Role,
        typer.Argument(
            metavar="ROLE", parser=_role, help="What MEMBER may do from now on in ROOM."
        ),
    ],
) -> None:
    """Make MEMBER a facilitator, participant or observer (facilitators only).

    Observers read but do not post. No keys rotate: nobody gains or loses reading.
    """

    async def work(c: Client) -> str:
        r = c.room(room)
        own = ClientError("you")  # stepping down is allowed: it is not an error here
        try:
            found = c.member(r, member, yourself=own)
            target, name = found.key.sign, found.name
        except ClientError as exc:
            if exc is not own:
                raise
            target, name = r.me, "you"
        await c.set_role(r, target, new_role.value)  # type: ignore[arg-type]
        return name

    name = run(work)
    verb = "are" if name == "you" else "is"
    note(f"{inert(name)} {verb} now {ROLE_MEANS[new_role.value]}")


@app.command()
def rules(
    room: RoomArg,
    mode: Annotated[
        Mode | None,
        typer.Option("--mode", parser=_mode, help="Chatham House, on the record, or pseudonymous."),
    ] = None,
    retention: Annotated[
        str | None,
        typer.Option(
            "--retention", metavar="DURATION", help=f"How long messages are kept: {DURATION_HELP}."
        ),
    ] = None,
) -> None:
    """Show ROOM's rules, or change them for everyone (facilitators only).

    Every member is told. What was said before a change keeps the stricter of the
    old and the new mode; a shorter retention applies to messages already kept.
    """
    seconds = None if retention is None else duration(retention, "the retention")
    if seconds is not None and not L.MIN_RETENTION <= seconds <= L.MAX_RETENTION:
        err("the retention must be between 1 minute and 10 years", code=Exit.USAGE)

    async def work(c: Client) -> tuple[L.Rules, bool]:
        r = c.room(room)
        if r.status == "active":
            await c.sync_log(r)
        if mode is None and seconds is None:
            return r.state.rules, False
        current = r.state.rules
        wanted = L.Rules(
            mode=current.mode if mode is None else mode.value,  # type: ignore[arg-type]
            retention=current.retention if seconds is None else seconds,
        )
        await c.set_rules(r, wanted)
        return wanted, True

    shown, changed = run(work)
    typer.echo(f"mode\t{shown.mode}\nretention\t{kept_for(shown.retention)}")
    if changed:
        note("rules changed; every member is told\n" + describe_rules(shown))
    elif is_tty():
        note(describe_rules(shown))


def _invite_json(i: InviteView) -> dict[str, object]:
    return {
        "id": i.id,
        "key": i.key.hex(),
        "role": i.role,
        "uses_left": i.uses_left,
        "expires": i.expires,
    }


@app.command()
def invites(
    room: RoomArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (docs/client.md).")] = False,
) -> None:
    """List ROOM's open invites: id, role, uses left, expiry (revoke one by its id)."""

    async def work(c: Client) -> list[InviteView]:
        return await c.invites(c.room(room))

    found = run(work)
    if as_json:
        typer.echo(json.dumps([_invite_json(i) for i in found]))
        return
    if not found:
        note("no open invites")
    for i in found:
        left = f"{i.uses_left} use{'' if i.uses_left == 1 else 's'} left"
        typer.echo(f"{i.id}\t{i.role}\t{left}\texpires {when(i.expires)} UTC")


@app.command()
def revoke(
    room: RoomArg,
    invite_id: Annotated[
        str, typer.Argument(metavar="INVITE-ID", help="The id `invites` shows (4+ hex digits).")
    ],
) -> None:
    """Withdraw an open invite of ROOM (facilitators only): its code admits nobody."""

    async def work(c: Client) -> InviteView:
        return await c.revoke_invite(c.room(room), invite_id)

    gone = run(work)
    note(f"invite {gone.id} revoked: its code admits nobody now")
