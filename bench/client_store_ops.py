"""Store operations on the client's receive path of one room message.

A room with a facilitator and ``--members`` participants; everyone exchanges
sender keys, then ``--history`` messages are sent so that inbound keys, peers
and the transcript are populated as in a room that has been running a while.
Then one participant sends one message, and the facilitator handles that one
``msg`` frame while every call into its local store is counted (rows read,
rows written, bytes read and written).

The receive path should touch only the rows that message concerns: the figures
should not grow with the room's size or history. Run with two sizes and compare:

    .venv/bin/python -m bench.client_store_ops --members 2 --history 5
    .venv/bin/python -m bench.client_store_ops --members 12 --history 200
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from backchannel.client.core import Client
from backchannel.client.store import Store
from backchannel.protocol import roomlog as L
from backchannel.server.config import Settings
from tests.client.helpers import People, handle_next_message, online, say
from tests.server.helpers import FakeClock, RelayServer

READS = ("get", "values", "scan", "messages")
WRITES = ("put", "delete", "add_message", "delete_scope")


class Counting:
    """Wraps the store's public row methods and counts calls and bytes."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.on = False

    def install(self) -> None:
        for name in (*READS, *WRITES):
            original = getattr(Store, name, None)
            if original is not None:
                setattr(Store, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        counter = self

        def wrapper(store: Store, *args: Any, **kwargs: Any) -> Any:
            result = original(store, *args, **kwargs)
            if counter.on:
                counter.calls[name] += 1
                counter.bytes_in += _size(result)
                counter.bytes_out += sum(_size(a) for a in args)
            return result

        return wrapper


def _size(value: Any) -> int:
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, list | tuple):
        return sum(_size(v) for v in value)
    return 0


async def measure(members: int, history: int) -> Counting:
    counting = Counting()
    counting.install()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        relay = RelayServer(
            Settings(data_dir=root, database_url=f"sqlite+aiosqlite:///{root}/relay.db"),
            FakeClock(),
        ).start()
        people = People(root, relay, relay.clock)
        try:
            fac = people.new("fac")
            room = await fac.create_room("t", L.Rules())
            joined: list[tuple[Client, Any]] = []
            for i in range(members):
                client = people.new(f"p{i}")
                code = await fac.invite(room, "participant", 3600, 1)
                joined.append((client, await client.join(code, accept_rules=lambda r: True)))
            for client, r in [(fac, room), *joined, (fac, room), *joined]:
                await online(client, r)
            speaker, speaker_room = joined[0]
            for i in range(history):
                await say(joined[i % len(joined)][0], joined[i % len(joined)][1], f"m{i}")
            await online(fac, room)
            await say(speaker, speaker_room, "the one we measure")
            await handle_next_message(fac, room, counting)
            assert fac.lines(room)[-1].text == "the one we measure"
        finally:
            await people.close()
            relay.stop()
    return counting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=12)
    parser.add_argument("--history", type=int, default=200)
    args = parser.parse_args()
    c = asyncio.run(measure(args.members, args.history))
    reads = sum(c.calls[n] for n in READS)
    writes = sum(c.calls[n] for n in WRITES)
    print(
        f"members={args.members} history={args.history}: store calls {dict(c.calls)}; "
        f"{reads} reads, {writes} writes; {c.bytes_in} B read, {c.bytes_out} B written"
    )


if __name__ == "__main__":
    main()
