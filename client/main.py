"""The ``backchannel`` command's entry point: the command-line front end plus the chat screen.

The command (:mod:`.cli`) and the chat screen (:mod:`.tui`) do not import each
other; this module puts them together, so ``backchannel chat`` opens the screen.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import (
    cli_admin,  # noqa: F401 - registers `role`, `rules`, `invites`, `revoke`
    cli_daemon,  # noqa: F401 - registers `daemon` on the app
)
from .cli import OPTS, app
from .cliutil import err, errors, passphrase
from .core import Client
from .store import Store


@app.command()
def chat(
    room: Annotated[
        str, typer.Argument(metavar="ROOM", help="The room's local name, title or id prefix.")
    ],
) -> None:
    """Open the interactive chat screen for ROOM."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Full-screen output into a pipe or a file is escape codes, not a transcript.
        err(
            "chat needs a terminal",
            hint="use `backchannel read ROOM --follow` to watch and `backchannel send ROOM` "
            "to write",
        )
    # Imported here: the screen (Textual) is a seventh of every other command's start-up.
    from .tui import run_chat

    with errors():
        store = Store.open(OPTS.home, passphrase())
        try:
            client = Client(store, proxy=OPTS.proxy)
            run_chat(client, client.room(room))
        finally:
            store.close()


def main() -> None:
    app()
