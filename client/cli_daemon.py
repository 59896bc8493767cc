"""``backchannel daemon``: start (in the foreground) or stop the profile's daemon."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from .cli import OPTS, app, err, errors, note, passphrase
from .core import Client
from .rpc import DaemonClient
from .rpcwire import socket_path
from .store import Store


@app.command()
def daemon(
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop the daemon running for this profile.")
    ] = False,
) -> None:
    """Unlock the profile once and serve scripts and commands on a local socket.

    Runs in the foreground until stopped (Ctrl-C, SIGTERM or `daemon --stop`).
    While it runs, `send`, `read`, `members` and `rooms` go through it: no
    passphrase, no new connection. See docs/client.md, "The daemon".
    """
    if stop:
        with errors():
            found = DaemonClient.connect(OPTS.home, timeout=10)
            if found is None:
                err("no daemon is running for this profile")
            with found:
                found.call("stop")
        note("daemon stopped")
        return
    with errors():
        store = Store.open(OPTS.home, passphrase())
        client = Client(store, proxy=OPTS.proxy)
        from .daemon import Daemon  # only this command runs one

        server = Daemon(client, socket_path(OPTS.home))
        server.on_ready = lambda: note(f"daemon ready: {server.path}")

        async def go() -> None:
            try:
                await server.run()
            finally:
                await client.aclose()

        try:
            asyncio.run(go())
        finally:
            store.close()
