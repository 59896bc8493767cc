"""DESIGN §6 / issue #6 §2.1: the relay SIGKILLed at random points mid-conversation.

Three people talk through the real client library (each with its own reconnect loop)
to a real ``backchannel-relay serve`` process, which a seeded killer SIGKILLs several
times and restarts on the same port and data directory. Afterwards:

* every message a sender sealed (its own transcript line; sealed and queued in the outbox
  in one transaction) reached every other member exactly once, in the sender's order:
  acknowledged ones (``sent``) because the relay acknowledges only after its durable
  commit, unacknowledged ones because the outbox is resent on the next connection and
  the relay stores a retried ``cid`` once;
* the relay stored each sealed message exactly once, and no receiver saw a warning (a
  duplicate would show as "a replayed message ... was dropped").
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backchannel.client.core import Client, ClientError, Room
from backchannel.client.relay import RelayError
from backchannel.protocol import roomlog as L
from backchannel.protocol.envelope import RoomEnvelope

from .procs import (
    SOAK,
    RelayProcess,
    heard_from,
    key_reuse,
    my_sent,
    new_client,
    stored_envelopes,
    warnings,
)

SEED = int(os.environ.get("BACKCHANNEL_FAULT_SEED", "20240611"))
PER_SENDER = 400 if SOAK else 120
MIN_KILLS = 10 if SOAK else 3
MAX_KILLS = 30 if SOAK else 8


@dataclass
class Talker:
    name: str
    client: Client
    room: Room
    acked: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    connects: int = 0

    async def talk(self, count: int, rng: random.Random, deadline: float) -> None:
        i = 0
        while i < count:
            assert time.monotonic() < deadline, f"{self.name} made no progress in time"
            try:
                async with self.client.connect([self.room]) as sock:
                    self.connects += 1
                    await self.client.pump(sock, [self.room], idle=0.02)
                    while i < count:
                        text = f"{self.name} #{i:04d}"
                        i += 1  # a text is tried once; failed ones are simply never sealed
                        await self.client.send_text(sock, self.room, text)
                        self.acked.append(text)
                        if rng.random() < 0.2:
                            await self.client.pump(sock, [self.room], idle=0.005)
            except (RelayError, ClientError) as exc:
                code = getattr(exc, "code", type(exc).__name__)
                self.failures[code] = self.failures.get(code, 0) + 1
                await asyncio.sleep(0.05)


def unacked(t: Talker) -> int:
    return len(my_sent(t.client, t.room)) - len(t.acked)


async def catch_up(talkers: list[Talker]) -> None:
    """Everyone connects (flushing outboxes) and reads until nothing new arrives."""
    for _ in range(3):
        for t in talkers:
            async with t.client.connect([t.room]) as sock:
                await t.client.pump(sock, [t.room], idle=0.4)
                await t.client.retry_stash(t.room)


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = RelayProcess(
        tmp_path,
        rate_messages_per_second="100000",
        rate_burst="100000",
        key_burst="100000",
        frame_burst="100000",
        max_inflight_writes="100000",
        frame_rate_per_second="100000",
        key_messages_per_second="100000",
        purge_interval_seconds="3600",
    )
    proc.start()
    yield proc
    proc.stop()


async def test_relay_sigkilled_mid_conversation_loses_nothing(
    tmp_path: Path, relay: RelayProcess
) -> None:
    rng = random.Random(SEED)
    fac = new_client(tmp_path / "fac", relay.url, "fac")
    ann = new_client(tmp_path / "ann", relay.url, "ann")
    bob = new_client(tmp_path / "bob", relay.url, "bob")
    room = await fac.create_room("water talks", L.Rules())
    ann_room = await ann.join(await fac.invite(room, "participant", 3600, 1), accept_rules=bool)
    bob_room = await bob.join(await fac.invite(room, "participant", 3600, 1), accept_rules=bool)
    talkers = [Talker("fac", fac, room), Talker("ann", ann, ann_room), Talker("bob", bob, bob_room)]
    await catch_up(talkers)  # sender keys and profiles exchanged

    deadline = time.monotonic() + (600 if SOAK else 60)
    work = [
        asyncio.create_task(t.talk(PER_SENDER, random.Random(rng.random()), deadline))
        for t in talkers
    ]

    async def killer() -> None:
        while relay.kills < MAX_KILLS and not all(w.done() for w in work):
            await asyncio.sleep(rng.uniform(0.2, 1.2))
            if all(w.done() for w in work):
                break
            await asyncio.to_thread(relay.kill9)
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # clients meet a dead port
            await asyncio.to_thread(relay.start)
            # Go on (up to MAX_KILLS) until some kill hit a message between seal and ack.
            if relay.kills >= MIN_KILLS and any(unacked(t) for t in talkers):
                break

    try:
        await asyncio.gather(killer(), *work)
        await catch_up(talkers)
    finally:
        for w in work:
            w.cancel()

    summary = {
        t.name: {
            "acked": len(t.acked),
            "sealed": len(my_sent(t.client, t.room)),
            "sealed_unacked": unacked(t),
            "failures": t.failures,
            "connects": t.connects,
        }
        for t in talkers
    }
    print(f"kills={relay.kills} seed={SEED} {summary}")
    assert relay.kills >= MIN_KILLS, summary
    assert sum(len(t.acked) for t in talkers) >= 300, summary
    if relay.kills < MAX_KILLS:
        assert any(unacked(t) for t in talkers), "no kill hit a send in flight"

    total_sealed = 0
    for sender in talkers:
        sealed = my_sent(sender.client, sender.room)
        total_sealed += len(sealed)
        # Acknowledged is a subset of sealed, in the same order; attempts were in order.
        assert [s for s in sealed if s in set(sender.acked)] == sender.acked
        assert sealed == sorted(sealed)
        assert sender.client.outbox.pending() == []
        for receiver in talkers:
            if receiver is sender:
                continue
            got = heard_from(receiver.client, receiver.room, sender.room.me)
            assert got == sealed, (
                f"{receiver.name} heard from {sender.name}: "
                f"missing={sorted(set(sealed) - set(got))[:5]} "
                f"dups={len(got) - len(set(got))} in_order={got == sorted(got)}"
            )
    for t in talkers:
        assert warnings(t.client, t.room) == [], (t.name, warnings(t.client, t.room)[:3])

    relay.stop()
    rows = stored_envelopes(relay.db_path)
    assert len(rows) == total_sealed, "a retried cid was stored twice, or a message went missing"
    assert len({(a, c) for _, a, c, _ in rows}) == len(rows)
    assert [s for s, *_ in rows] == list(range(1, len(rows) + 1)), "seq numbers have gaps"
    assert key_reuse(d for *_, d in rows) == {}
    assert {RoomEnvelope.from_bytes(d).sender for *_, d in rows} == {t.room.me for t in talkers}

    for t in talkers:
        await t.client.aclose()
        t.client.store.close()
