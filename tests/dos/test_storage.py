"""Attacks on storage (issue 12, points 5-7): room-creation spam, a mailbox filled by one
co-member, log-append spam, and a database another process holds locked."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from backchannel.protocol import roomlog
from tests.server.helpers import TestRoom, WSClient, b64e, now

from .harness import RSS_BOUND, DosRelay, Honest, assert_holds, attack, p99

MiB = 1 << 20


def disk_usage(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def assert_no_traceback(relay: DosRelay) -> None:
    """The whole log (the fixture's own check reads only each file's tail): every error
    these attacks cause is mapped to an answer, and so logged as one line at most."""
    text = "".join(p.read_text(errors="replace") for p in sorted(relay.logs.glob("*.log")))
    assert "Traceback" not in text, text[-3000:]


async def test_room_creation_spam(dos_relay_factory: Callable[..., DosRelay]) -> None:
    """One address creates rooms with ten-year retention as fast as it can and fills
    each with 128 KiB messages; before the quotas it wrote 34 MiB/s (238 rooms/s).
    Rooms per address per window and bytes per room bound the disk it can take."""
    rooms, room_bytes = 5, 2 * MiB
    relay = dos_relay_factory(rooms_per_address=f"{rooms}/minute", max_room_bytes=room_bytes)
    honest = await Honest.open(relay)
    try:
        base = await honest.probe()
        idle, disk = relay.rss(), disk_usage(relay.data_dir)
        async with attack("room_spam", relay, seconds=4) as attacker:
            during = await honest.probe(n=30)
            grown = relay.rss() - idle
            report = await attacker.report()
        written = disk_usage(relay.data_dir) - disk
        print(
            report,
            f"disk +{written / MiB:.1f} MiB, rss +{grown >> 20} MiB, "
            f"honest p99 {p99(base) * 1000:.0f} -> {p99(during) * 1000:.0f} ms",
        )
        assert_holds(base, during)
        assert grown < RSS_BOUND
        # The honest room counts against the same address (all of this is 127.0.0.1).
        assert report.get("rooms", 0) <= rooms, report
        assert report.get("create:429:rate_limited", 0) > 0, report
        assert report.get("answer:quota_exceeded", 0) > 0, report
        # What the rooms may hold, plus the WAL and the database's own pages.
        assert written < rooms * room_bytes + 24 * MiB, f"{written / MiB:.1f} MiB written"
        assert_no_traceback(relay)
    finally:
        await honest.close()


async def test_mailbox_fill_by_one_member(dos_relay_factory: Callable[..., DosRelay]) -> None:
    """A co-member fills an offline member's mailbox; a pairwise message from another
    co-member (a sender-key distribution, say) is still accepted, because each sender
    has its own share of the recipient's mailbox."""
    depth, share = 100, 20
    fast = dict(
        rate_messages_per_second=1000,
        rate_burst=1000,
        key_messages_per_second=1000,
        key_burst=1000,
    )
    relay = dos_relay_factory(max_mailbox_depth=depth, max_mailbox_per_sender=share, **fast)
    honest = await Honest.open(relay)
    try:
        room = await TestRoom.create(honest.http)
        mallory = await room.add_member()
        victim = await room.add_member()
        bob = await room.add_member()
        base = await honest.probe()
        idle = relay.rss()
        params = {
            "seed": mallory.sign_seed.hex(),
            "dh": mallory.dh_private.hex(),
            "room": room.id.hex(),
            "victim": victim.public.sign.hex(),
        }
        async with attack("mailbox_fill", relay, seconds=4, **params) as attacker:
            await asyncio.sleep(2)
            during = await honest.probe(n=20)
            grown = relay.rss() - idle
            client = await WSClient.connect(relay, [bob])  # type: ignore[arg-type]
            await client.send_frame("sub", room=room.id, after=0)
            cid = os.urandom(16)
            await client.send_frame(
                "psend",
                room=room.id,
                from_=bob.public.sign,
                to=victim.public.sign,
                cid=cid,
                data=os.urandom(1024),
            )
            answer = await client.expect_reply("psent", cid, timeout=10)
            await client.close()
            report = await attacker.report()
        print(report, answer["t"], answer.get("code"), f"rss +{grown >> 20} MiB")
        assert answer["t"] == "psent", answer
        assert report.get("answer:mailbox_full", 0) > 0, report
        assert report.get("answer:psent", 0) == share, report
        assert_holds(base, during)
        assert grown < RSS_BOUND
        # The victim comes online: its share from the attacker, and bob's message.
        them = await WSClient.connect(relay, [victim])  # type: ignore[arg-type]
        senders: list[bytes] = []
        while len(senders) < share + 1:
            senders.append((await them.expect("pmsg", timeout=10))["from"])
        await them.close()
        assert senders.count(mallory.public.sign) == share
        assert senders.count(bob.public.sign) == 1
        assert_no_traceback(relay)
    finally:
        await honest.close()


async def test_log_append_spam(dos_relay_factory: Callable[..., DosRelay]) -> None:
    """A facilitator appends invites to its own rooms as fast as the relay answers.
    Before: every append decoded and re-encoded the whole state (92 ms at 2,500 events)
    and nothing limited the rate. After: appends cost the same at any length and each
    room has an append budget, answered `429 rate_limited` past it."""
    relay = dos_relay_factory(rate_log_appends="30/minute")
    honest = await Honest.open(relay)
    try:
        base = await honest.probe()
        idle = relay.rss()
        async with attack("log_spam", relay, seconds=4, rooms=2) as attacker:
            await asyncio.sleep(1)
            during = await honest.probe(n=30)
            grown = relay.rss() - idle
            # The budget is the room's: the honest facilitator's own room is unaffected.
            event, _ = roomlog.make_invite(
                honest.key, honest.room.state, "participant", now() + 3600, 1, now()
            )
            appended = await honest.room.post(event)
            report = await attacker.report()
        print(
            report,
            f"rss +{grown >> 20} MiB, honest p99 {p99(base) * 1000:.0f} -> "
            f"{p99(during) * 1000:.0f} ms",
        )
        assert appended.status_code == 201, appended.text
        assert_holds(base, during)
        assert grown < RSS_BOUND
        assert report.get("append:429:rate_limited", 0) > 0, report
        assert report.get("appended", 0) <= 2 * 30, report
        assert_no_traceback(relay)
    finally:
        await honest.close()


async def test_locked_database(dos_relay_factory: Callable[..., DosRelay], tmp_path: Path) -> None:
    """Another process holds SQLite's write lock for 5 s. Before: each write waited out a
    30 s busy timeout in turn (the k-th queued write answered after k x 30 s) and every
    failure logged a traceback. After: each honest send is answered `storage_unavailable`
    within a second, `/readyz` says 503 while writes fail and 200 once they succeed, and
    every acknowledged message is still there after the release."""
    relay = dos_relay_factory()
    honest = await Honest.open(relay)
    try:
        assert honest.ws is not None
        acked: dict[int, bytes] = {}

        async def send(data: bytes) -> tuple[dict[str, object], float]:
            assert honest.ws is not None
            cid, started = os.urandom(16), time.monotonic()
            await honest.ws.send_frame(
                "send", room=honest.room.id, from_=honest.key.public.sign, cid=cid, data=data
            )
            reply = await honest.ws.expect_reply("sent", cid, timeout=60)
            if reply["t"] == "sent":
                acked[reply["seq"]] = data
            return reply, time.monotonic() - started

        for i in range(5):
            reply, _ = await send(b"before %d" % i)
            assert reply["t"] == "sent", reply
        marker = tmp_path / "lock-state"
        async with attack(
            "hold_lock", relay, seconds=30, db=str(relay.db_path), marker=str(marker), hold=5
        ) as attacker:
            while not marker.exists():
                await asyncio.sleep(0.01)
            answers = [await send(b"during %d" % i) for i in range(4)]
            # A burst: queued behind each other, they must not answer k busy timeouts late.
            cids, started = [os.urandom(16) for _ in range(8)], time.monotonic()
            for i, cid in enumerate(cids):
                await honest.ws.send_frame(
                    "send",
                    room=honest.room.id,
                    from_=honest.key.public.sign,
                    cid=cid,
                    data=b"burst %d" % i,
                )
            burst = []
            for i, cid in enumerate(cids):
                reply = await honest.ws.expect_reply("sent", cid, timeout=60)
                if reply["t"] == "sent":
                    acked[reply["seq"]] = b"burst %d" % i
                burst.append((reply, time.monotonic() - started))
            ready = await honest.http.get("/readyz")
            started = time.monotonic()
            event, _ = roomlog.make_invite(
                honest.key, honest.room.state, "participant", now() + 3600, 1, now()
            )
            rest = await honest.http.post(
                f"/v1/rooms/{honest.room.id.hex()}/events", json={"event": b64e(event)}
            )
            rest_took = time.monotonic() - started
            locked_for = time.monotonic()
            report = await attacker.report()
            locked_for = time.monotonic() - locked_for
        print(
            report,
            [(a.get("code", a["t"]), round(t * 1000)) for a, t in answers],
            "burst",
            [(a.get("code", a["t"]), round(t * 1000)) for a, t in burst],
            "readyz",
            ready.status_code,
            "rest",
            rest.status_code,
            round(rest_took * 1000),
        )
        for reply, took in [*answers, *burst]:
            assert reply.get("code") == "storage_unavailable", reply
            assert took < 1.0, f"answered after {took:.1f} s"
        assert rest.status_code == 503, rest.text
        assert rest.json()["error"]["code"] == "storage_unavailable"
        assert rest_took < 1.0
        assert ready.status_code == 503, ready.text
        # Released: ready again, and writes go through.
        deadline = time.monotonic() + 5
        while (await honest.http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "not ready again after the release"
            await asyncio.sleep(0.1)
        for i in range(5):
            reply, _ = await send(b"after %d" % i)
            assert reply["t"] == "sent", reply
        assert (await honest.room.post(event)).status_code == 201
        # Nothing acknowledged is lost.
        reader = await WSClient.connect(relay, [honest.key])  # type: ignore[arg-type]
        await reader.send_frame("sub", room=honest.room.id, after=0)
        synced = await reader.expect("synced", room=honest.room.id, timeout=10)
        got: dict[int, bytes] = {}
        while len(got) < synced["seq"]:
            msg = await reader.expect("msg", room=honest.room.id, timeout=10)
            got[msg["seq"]] = msg["data"]
        await reader.close()
        assert {seq: got.get(seq) for seq in acked} == acked
        assert_no_traceback(relay)
    finally:
        await honest.close()
