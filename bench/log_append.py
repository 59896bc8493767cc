"""What one room-log append costs the relay, at 100 and at 2,500 events.

Run:  .venv/bin/python -m bench.log_append [--lengths 100,2500] [--appends 40]

For each length a room is built offline with the protocol's own builders (a
facilitator and that many invites, each invite growing the state every later
event is checked against) and written straight into a fresh SQLite database,
so building it costs the same whatever the relay under test does. Then the
relay's own store appends ``--appends`` more invites one at a time, as the REST
route does (HTTP is left out: on loopback its fixed cost would hide the
difference): printed are the first append (no validated state in memory yet:
the stored one is decoded), the median of the rest, wall clock (it includes the
commit's fsync) and CPU (what holds the event loop). Beside them, the
protocol-level parts of the old append path, all linear in the state's size:
``RoomState.from_bytes``, ``apply_event`` and ``RoomState.to_bytes``.

Before issue 12 every append did from_bytes + apply_event + to_bytes; after,
the relay keeps the validated state in memory and applies the event to it, so
the warm median should not grow with the length. Run the same module against
an older checkout for its "before" figures (it uses only the store API and the
schema both share). Never part of the test suite: timings are not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import inspect, text

from backchannel.protocol import roomlog
from backchannel.protocol.keys import MemberKeyPair
from backchannel.server import logging as relay_logging
from backchannel.server.config import Settings
from backchannel.server.migrate import upgrade
from backchannel.server.rest.routes import log_limits
from backchannel.server.storage import Store, make_engine


def build(length: int) -> tuple[MemberKeyPair, roomlog.RoomLog]:
    fac = MemberKeyPair.generate()
    now = int(time.time())
    log = roomlog.RoomLog()
    log.append(roomlog.make_create(fac, roomlog.Rules(retention=86_400), now))
    while len(log) < length:
        event, _ = roomlog.make_invite(fac, log.state, "participant", now + 86_400, 1, now)
        log.append(event)
    return fac, log


async def store(url: str, fac: MemberKeyPair, log: roomlog.RoomLog) -> None:
    """Write the room as the relay would have stored it (its state at the head)."""
    engine = make_engine(url)
    try:
        await upgrade(engine)
        state = log.state
        async with engine.begin() as conn:
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("rooms")}
            )
            await conn.execute(
                text(
                    "INSERT INTO rooms (id, head, log_len, last_seq, retention_seconds, "
                    "created_at, state) VALUES (:id, :head, :len, 0, 86400, 0, :state)"
                ),
                {"id": log.room_id, "head": state.head, "len": len(log), "state": state.to_bytes()},
            )
            if "state_len" in columns:
                await conn.execute(text("UPDATE rooms SET state_len = log_len"))
            await conn.execute(
                text("INSERT INTO log_events (room_id, pos, hash, data) VALUES (:r, :p, :h, :d)"),
                [
                    {"r": log.room_id, "p": pos, "h": log.head_at(pos), "d": log.event(pos)}
                    for pos in range(len(log))
                ],
            )
            await conn.execute(
                text(
                    "INSERT INTO room_members (room_id, member, dh, role, left_pos) "
                    "VALUES (:r, :m, :dh, 'facilitator', NULL)"
                ),
                {"r": log.room_id, "m": fac.public.sign, "dh": fac.public.dh},
            )
    finally:
        await engine.dispose()


def timed(fn: Callable[[], object], repeats: int = 10) -> float:
    took = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        took.append(time.perf_counter() - start)
    return statistics.median(took) * 1000


async def measure(length: int, appends: int) -> dict[str, float]:
    fac, log = build(length)
    state = log.state
    blob = state.to_bytes()
    now = int(time.time())
    probe, _ = roomlog.make_invite(fac, state, "participant", now + 86_400, 1, now)
    parts = {
        "from_bytes": timed(lambda: roomlog.RoomState.from_bytes(blob)),
        "apply_event": timed(lambda: roomlog.apply_event(state, probe)),
        "to_bytes": timed(state.to_bytes),
    }
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/relay.db"
        await store(url, fac, log)
        relay = Store(make_engine(url), batch_window=0, batch_max=256)
        await relay.start()
        limits = log_limits(Settings(data_dir=Path(tmp)))
        wall, cpu = [], []
        try:
            for _ in range(appends):
                now = int(time.time())
                event, _ = roomlog.make_invite(fac, log.state, "participant", now + 86_400, 1, now)
                start, start_cpu = time.perf_counter(), time.process_time()
                await relay.append_event(log.room_id, event, limits=limits, skew=300)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
                log.append(event)
        finally:
            await relay.close()
    return {
        **parts,
        "first": wall[0] * 1000,
        "median": statistics.median(wall[1:]) * 1000,
        "cpu": statistics.median(cpu[1:]) * 1000,
        "state_kib": len(blob) / 1024,
    }


def main() -> None:
    relay_logging.configure("warning")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="100,2500")
    parser.add_argument("--appends", type=int, default=40)
    args = parser.parse_args()
    print(
        f"{'events':>7} {'state KiB':>9} {'from_bytes':>10} {'apply':>7} {'to_bytes':>8}"
        f" | {'append: first':>13} {'median':>7} {'median CPU':>10}   (ms)"
    )
    for length in (int(x) for x in args.lengths.split(",")):
        m = asyncio.run(measure(length, args.appends))
        print(
            f"{length:>7} {m['state_kib']:>9.0f} {m['from_bytes']:>10.1f} {m['apply_event']:>7.2f}"
            f" {m['to_bytes']:>8.1f} | {m['first']:>13.1f} {m['median']:>7.1f} {m['cpu']:>10.1f}"
        )


if __name__ == "__main__":
    main()
