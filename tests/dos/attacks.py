"""Attacks the DoS suite runs in a process of their own: ``python -m tests.dos.attacks NAME JSON``.

Each attack runs for ``seconds`` and prints, as its last line, a JSON object
counting what the relay answered (error codes, closes), so the test can check
that the attacker got a typed error or a close rather than service.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import websockets

from backchannel.protocol.encoding import decode, encode

Counts = collections.Counter[str]
ATTACKS: dict[str, Callable[..., Awaitable[None]]] = {}


def attack(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    ATTACKS[fn.__name__] = fn
    return fn


def frame(t: str, **fields: Any) -> bytes:
    return encode({"v": 1, "t": t, **fields})


def note(counts: Counts, raw: Any) -> None:
    """Count a frame the relay sent: its error code, or its type."""
    if not isinstance(raw, bytes):
        counts["text"] += 1
        return
    try:
        value = decode(raw, max_size=1 << 24)
    except Exception:
        counts["undecodable"] += 1
        return
    if isinstance(value, dict):
        counts[f"error:{value.get('code')}" if value.get("t") == "error" else str(value.get("t"))] += 1


async def drain(ws: Any, counts: Counts) -> None:
    try:
        async for raw in ws:
            note(counts, raw)
    except websockets.ConnectionClosed as exc:
        counts[f"close:{exc.rcvd.code if exc.rcvd else 'none'}"] += 1
    except Exception as exc:
        counts[f"exc:{type(exc).__name__}"] += 1


@attack
async def idle(counts: Counts, **_: Any) -> None:
    """No attack: the harness's own check."""
    await asyncio.sleep(3600)


@attack
async def ack_flood(counts: Counts, ws_url: str, origin: str, **_: Any) -> None:
    """A throwaway key, no room: ``ack`` frames as fast as the socket takes them."""
    from backchannel.protocol import relayauth
    from backchannel.protocol.keys import MemberKeyPair

    async def one() -> None:
        key = MemberKeyPair.generate()
        async with websockets.connect(ws_url, max_size=None) as ws:
            challenge = decode(await ws.recv(), max_size=1 << 20)
            sig = relayauth.sign_challenge(key.sign_seed, origin, challenge["nonce"])
            await ws.send(frame("auth", keys=[{"key": key.public.sign, "sig": sig}]))
            reader = asyncio.create_task(drain(ws, counts))
            ids = list(range(1, 1025))
            try:
                while not reader.done():
                    await ws.send(frame("ack", ids=ids))
                    counts["sent"] += 1
            except websockets.ConnectionClosed:
                pass
            await reader

    await asyncio.gather(*(one() for _ in range(4)), return_exceptions=True)


def main() -> None:
    name, raw = sys.argv[1], sys.argv[2]
    params = json.loads(raw)
    counts: Counts = collections.Counter()
    started = time.monotonic()

    async def run() -> None:
        try:
            async with asyncio.timeout(params["seconds"]):
                await ATTACKS[name](counts=counts, **params)
        except TimeoutError:
            pass

    asyncio.run(run())
    counts["elapsed_ms"] = int((time.monotonic() - started) * 1000)
    print(json.dumps(dict(counts)))


if __name__ == "__main__":
    main()
