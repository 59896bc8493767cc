"""A client process for the client-kill test: ``python -m tests.faults.client_worker HOME COUNT``.

Opens the profile in HOME (passphrase ``pw``), connects to its one room and, with a
reconnect loop, alternates between reading and sending ``"<name> #NNNN"`` until it has
sealed COUNT messages of its own. Prints ``ACK <text>`` after the relay acknowledged a
send and ``DONE`` at the end. The test SIGKILLs it at random points and starts it again.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from backchannel.client.core import Client, ClientError
from backchannel.client.relay import RelayError
from backchannel.client.store import Store


def sealed(client: Client, room) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for line in client.lines(room) if line.kind == "message" and line.mine)


async def main(home: Path, count: int) -> None:
    store = Store.open(home, "pw")
    client = Client(store)
    name = client.profile().name
    room = client.rooms()[0]
    try:
        while True:
            try:
                async with client.connect([room]) as sock:
                    await client.pump(sock, [room], idle=0.05)
                    await client.retry_stash(room)
                    while (n := sealed(client, room)) < count:
                        text = f"{name} #{n:04d}"
                        await client.send_text(sock, room, text)
                        print("ACK", text, flush=True)
                        await client.pump(sock, [room], idle=0.02)
                    await client.pump(sock, [room], idle=0.5)
                    await client.retry_stash(room)
                print("DONE", flush=True)
                return
            except (RelayError, ClientError) as exc:
                print("RETRY", exc, flush=True)
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()
        store.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
