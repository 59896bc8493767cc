"""Attacks with frames on the WebSocket, each against the same honest participant."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from .harness import RSS_BOUND, DosRelay, Honest, assert_holds, attack


async def test_ack_flood(dos_relay: DosRelay, honest: Honest) -> None:
    """Four connections with throwaway keys send 1,024-id ``ack`` frames as fast as
    they can; before the fix the relay spawned a task per frame (RSS +1.7 GB in 20 s)."""
    base = await honest.probe()
    idle = dos_relay.rss()
    async with attack("ack_flood", dos_relay, seconds=4) as attacker:
        during = await honest.probe(n=30)
        grown = dos_relay.rss() - idle
        report = await attacker.report()
    print(report, f"rss +{grown >> 20} MiB")
    assert_holds(base, during)
    assert grown < RSS_BOUND
    assert report.get("error:rate_limited", 0) > 0, report


async def test_auth_amplification(dos_relay: DosRelay, honest: Honest) -> None:
    """One signature repeated 1,024 times per ``auth`` frame on four connections;
    before the fix each frame cost 1,024 verifications (honest p50 13 → 700 ms)."""
    base = await honest.probe()
    async with attack("auth_amplification", dos_relay, seconds=4) as attacker:
        during = await honest.probe(n=30)
        report = await attacker.report()
    print(report)
    assert_holds(base, during)
    # Refused unread: before authentication only a small frame is read at all.
    assert report.get("error:frame_too_large", 0) > 0, report


async def test_connection_fill(dos_relay_factory: Callable[..., DosRelay]) -> None:
    """1,600 connections with throwaway keys from 100 addresses (more than
    max_connections here), held and re-opened:
    they fit only the small unsettled budget, the oldest make room for new ones,
    and all are closed after the set-up window, so an honest member still
    connects and sends (before: every participant got `too_many_connections`)."""
    relay = dos_relay_factory(
        max_connections=1500, max_unsettled_connections=400, setup_window_seconds=3
    )
    honest = await Honest.open(relay)
    base = await honest.probe(n=20)
    idle = relay.rss()
    async with attack("connection_fill", relay, seconds=7, connections=1600) as attacker:
        await asyncio.sleep(3.5)
        # A member arriving now still gets in: the budget only members reach is free.
        late = await Honest.open(relay)
        during = await late.probe(n=15) + await honest.probe(n=15)
        grown = relay.rss() - idle
        report = await attacker.report()
    print(report, f"rss +{grown >> 20} MiB")
    await late.close()
    await honest.close()
    assert_holds(base, during)
    assert grown < RSS_BOUND
    # Answered: the oldest evicted (`too_many_connections`) or, if they outlived the
    # window, closed as `not_a_member` (each tested alone in test_ws_budgets.py).
    assert report.get("error:too_many_connections", 0) > 0, report


async def test_slow_readers(dos_relay_factory: Callable[..., DosRelay]) -> None:
    """Members subscribe from the start of a room holding 7 MiB and never read;
    before the fix each pinned a whole catch-up page (≈26 MiB) for as long as it
    stayed, and the keepalive did not reap it."""
    relay = dos_relay_factory(
        slow_reader_seconds=2,
        rate_burst=1000,
        key_burst=1000,
        frame_burst=1000,
        max_inflight_writes=1000,
    )
    honest = await Honest.open(relay)
    blob = os.urandom(120 * 1024)
    assert honest.ws is not None
    for _ in range(60):
        cid = os.urandom(16)
        await honest.ws.send_frame(
            "send", room=honest.room.id, from_=honest.key.public.sign, cid=cid, data=blob
        )
        await honest.ws.expect_reply("sent", cid, timeout=30)
    await honest.ws.close()
    await honest.connect(after=60)  # past the backlog it just sent
    base = await honest.probe(n=20)
    readers = [await honest.room.add_member() for _ in range(4)]
    seeds = [[k.sign_seed.hex(), k.dh_private.hex()] for k in readers]
    idle, fds = relay.rss(), relay.open_sockets()
    async with attack(
        "slow_readers", relay, seconds=6, room=honest.room.id.hex(), seeds=seeds
    ) as attacker:
        await asyncio.sleep(1)
        during = await honest.probe(n=25)
        grown = relay.rss() - idle
        await asyncio.sleep(2.5)  # past slow_reader_seconds, with the reaper's second
        left = relay.open_sockets() - fds
        report = await attacker.report()
    print(report, f"rss +{grown >> 20} MiB", f"fds +{left}")
    await honest.close()
    assert_holds(base, during)
    assert grown < RSS_BOUND
    assert report["subscribed"] == 16, report
    assert left <= 0, f"{left} sockets of readers that stopped reading are still open"
    assert "too_slow" in relay.all_stderr()


@pytest.mark.parametrize("empty", [False, True], ids=["one-byte", "empty"])
async def test_fragments(dos_relay: DosRelay, honest: Honest, empty: bool) -> None:
    """Unfinished messages of one-byte (or empty) continuation frames on four
    connections; before the fix each held 27.6 MiB just under the size limit."""
    base = await honest.probe()
    idle = dos_relay.rss()
    async with attack("fragments", dos_relay, seconds=4, empty=empty) as attacker:
        during = await honest.probe(n=25)
        grown = dos_relay.rss() - idle
        report = await attacker.report()
    print(report, f"rss +{grown >> 20} MiB")
    assert_holds(base, during)
    assert grown < RSS_BOUND
    assert any(k.startswith("close:100") for k in report), report
