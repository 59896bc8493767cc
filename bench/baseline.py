"""The bare baseline: a minimal ``websockets`` broadcast server.

It neither authenticates, validates, stores on disk nor orders anything: the
ceiling for a Python relay on the machine at hand. Every scenario of
``bench/run.py`` runs against it as well as against the relay, and the relay's
figures are reported as ratios to it.

Protocol (all on ``ws://127.0.0.1:PORT/r/<room hex>?sub=0|1&keep=0|1&after=N``):

- a binary frame from a client is broadcast as is to every subscribed
  connection of the room (``sub=1``; the sender included when it subscribed,
  as on the relay), then a fixed ``sent`` frame goes back to the sender — the
  same flow control as the relay's acknowledgement, without the commit;
- ``keep=1`` also appends the frame to an in-memory list (at most
  ``KEEP_MAX`` per room), and a connection opened with ``after=N`` is first
  sent the kept frames from index N, then a ``synced`` frame: the ceiling for
  the catch-up scenario (frames pushed from memory, no query).

Run:  python -m bench.baseline [--port 0]   (prints ``baseline listening on PORT``)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from urllib.parse import parse_qs, urlsplit

import cbor2
import websockets
from websockets.asyncio.server import ServerConnection, serve

KEEP_MAX = 50_000
SENT = cbor2.dumps({"v": 1, "t": "sent"}, canonical=True)
SYNCED = cbor2.dumps({"v": 1, "t": "synced"}, canonical=True)

rooms: dict[str, set[ServerConnection]] = {}
kept: dict[str, list[bytes]] = {}


async def handler(ws: ServerConnection) -> None:
    url = urlsplit(ws.request.path if ws.request else "/")
    room = url.path.rsplit("/", 1)[-1]
    query = parse_qs(url.query)
    sub = query.get("sub", ["0"])[0] == "1"
    keep = query.get("keep", ["0"])[0] == "1"
    after = query.get("after", [None])[0]
    subscribers = rooms.setdefault(room, set())
    log = kept.setdefault(room, [])
    if after is not None:
        for frame in log[int(after) :]:
            await ws.send(frame)
        await ws.send(SYNCED)
    if sub:
        subscribers.add(ws)
    try:
        async for frame in ws:
            if keep and len(log) < KEEP_MAX:
                log.append(frame)  # type: ignore[arg-type]
            websockets.broadcast(subscribers, frame)
            await ws.send(SENT)
    except websockets.ConnectionClosed:
        pass
    finally:
        subscribers.discard(ws)


async def main(port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, max_size=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"baseline listening on {bound}", flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="bare websockets broadcast baseline")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop  # the relay runs on uvloop under uvicorn; so does the baseline
    except ImportError:  # pragma: no cover
        uvloop = None
    with contextlib.suppress(KeyboardInterrupt):
        if uvloop is not None:
            uvloop.run(main(args.port))
        else:
            asyncio.run(main(args.port))
    sys.exit(0)
