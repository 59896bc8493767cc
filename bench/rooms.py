"""Room set-up over the relay's REST API, with the protocol's own builders.

The same steps a facilitator's client takes (create, invite, join), as in
tests/server/helpers.py, but without importing the tests.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

import httpx

from backchannel.protocol import roomlog
from backchannel.protocol.keys import MemberKeyPair


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class BenchRoom:
    room_id: bytes
    #: Ed25519 seeds of the members (the facilitator first).
    seeds: list[bytes]


async def _append(http: httpx.AsyncClient, log: roomlog.RoomLog, event: bytes) -> None:
    r = await http.post(f"/v1/rooms/{log.room_id.hex()}/events", json={"event": b64e(event)})
    if r.status_code != 201:
        raise RuntimeError(f"append refused: {r.status_code} {r.text}")
    log.append(event)


async def make_room(http: httpx.AsyncClient, members: int) -> BenchRoom:
    """A room with a facilitator and ``members - 1`` participants."""
    now = int(time.time())
    fac = MemberKeyPair.generate()
    create = roomlog.make_create(fac, roomlog.Rules(retention=86_400), now)
    r = await http.post("/v1/rooms", json={"event": b64e(create)})
    if r.status_code != 201:
        raise RuntimeError(f"create refused: {r.status_code} {r.text}")
    log = roomlog.RoomLog()
    log.append(create)
    seeds = [fac.sign_seed]
    if members > 1:
        event, seed = roomlog.make_invite(
            fac, log.state, "participant", now + 3600, members - 1, now
        )
        await _append(http, log, event)
        for _ in range(members - 1):
            member = MemberKeyPair.generate()
            await _append(http, log, roomlog.make_join(member, seed, log.state, int(time.time())))
            seeds.append(member.sign_seed)
    return BenchRoom(log.room_id, seeds)


async def make_rooms(
    base_url: str, count: int, members: int, parallel: int = 16
) -> list[BenchRoom]:
    gate = asyncio.Semaphore(parallel)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:

        async def one() -> BenchRoom:
            async with gate:
                return await make_room(http, members)

        return list(await asyncio.gather(*(one() for _ in range(count))))


def fake_rooms(count: int, members: int) -> list[BenchRoom]:
    """Rooms for the baseline, which knows no rooms: random ids, no keys."""
    import os

    return [BenchRoom(os.urandom(32), [b""] * members) for _ in range(count)]
