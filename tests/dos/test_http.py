"""Attacks on the HTTP layer (issue 12, point 4): an oversized header block, and slowloris
against a relay started with the file-descriptor limit a systemd service gets (soft 1024)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.helpers import signed_headers

from .harness import RSS_BOUND, Attacker, DosRelay, Honest, assert_holds, attack, p99

#: What systemd gives a service unless its unit says otherwise (``LimitNOFILE=1024:524288``).
SYSTEMD_SOFT_NOFILE = 1024


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """Children started inside inherit a soft RLIMIT_NOFILE of ``limit`` (hard unchanged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def nofile_limit(relay: DosRelay) -> int:
    assert relay.proc is not None
    for line in Path(f"/proc/{relay.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files")


def ms(samples: list[float]) -> str:
    return f"{p99(samples) * 1000:.0f} ms"


class Peak:
    """The largest values of the relay's RSS and open descriptors, sampled every 50 ms."""

    def __init__(self, relay: DosRelay) -> None:
        self.relay, self.rss, self.fds = relay, relay.rss(), relay.open_fds()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.rss = max(self.rss, self.relay.rss())
                self.fds = max(self.fds, self.relay.open_fds())
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def sampled(relay: DosRelay) -> AsyncIterator[Peak]:
    peak = Peak(relay)
    task = asyncio.create_task(peak.run())
    try:
        yield peak
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def while_running(
    attacker: Attacker, probe: Callable[[], Awaitable[list[float]]], least: int = 20
) -> list[float]:
    """Probe until the attack is over (at least ``least`` samples)."""
    out: list[float] = []
    while attacker.proc.poll() is None or len(out) < least:
        out += await probe()
    return out


async def fresh_rest_probe(relay: DosRelay, honest: Honest, n: int = 10) -> list[float]:
    """Like :meth:`Honest.rest_probe`, each request on a new TCP connection: a relay that
    has run out of descriptors can still serve the connections it already holds."""
    out: list[float] = []
    path = f"/v1/rooms/{honest.room.id.hex()}/events"
    for _ in range(n):
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(base_url=relay.url, timeout=5) as http:
                r = await http.get(
                    path, headers=signed_headers(honest.key, relay.origin, "GET", path)
                )
            out.append(time.monotonic() - started if r.status_code == 200 else 5.0)
        except httpx.HTTPError:
            out.append(5.0)
    return out


async def test_huge_header_is_refused_early(dos_relay: DosRelay, honest: Honest) -> None:
    """64 MiB header blocks, written in 64 KiB chunks, one after another
    for 5 s: the relay answers each with 400 (or a close) after its first few chunks,
    buffers none of it, and REST stays fast. Before the fix httptools buffered the whole
    block, held the event loop for 9 s joining its pieces, and answered 200."""
    parallel = 1
    base = await honest.rest_probe()
    idle = dos_relay.rss()
    async with (
        sampled(dos_relay) as peak,
        attack(
            "big_header", dos_relay, seconds=5, header_mib=64, parallel=parallel, repeat=True
        ) as attacker,
    ):
        during = await while_running(attacker, honest.rest_probe)
        report = await attacker.report()
    print(report, f"REST p99 {ms(base)} -> {ms(during)}, rss +{(peak.rss - idle) >> 20} MiB")
    assert_holds(base, during, "REST")
    assert peak.rss - idle < RSS_BOUND
    assert "status:200" not in report, report
    assert "sent_whole_header" not in report, report
    refused = sum(n for k, n in report.items() if k in ("status:400", "status:431", "close:none"))
    refused += sum(n for k, n in report.items() if k.startswith("exc:"))
    assert report["attempts"] <= refused <= report["attempts"] + parallel, report
    # What the attacker wrote before it saw the answer is mostly the kernel's socket
    # buffers (a few MiB on loopback), never the relay's memory (the RSS bound above).
    assert report["sent_kib"] < 8 * 1024, report
    assert report["answer_ms"] < 2000, report


async def test_slowloris_at_a_systemd_file_limit(
    dos_relay_factory: Callable[..., DosRelay],
) -> None:
    """1,100 requests that never finish their headers, against a relay started with a
    soft RLIMIT_NOFILE of 1024. The relay raises its own limit at start, closes each
    half-sent request after ``header_timeout_seconds``, and serves new connections
    meanwhile. Before the fix, the relay ran out of descriptors and accepted no one."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4 * SYSTEMD_SOFT_NOFILE:
        pytest.skip("this machine's hard RLIMIT_NOFILE leaves the relay nothing to raise to")
    header_timeout = 4.0  # the default is 10 s; shorter keeps the test short
    with soft_nofile(SYSTEMD_SOFT_NOFILE):
        relay = dos_relay_factory(header_timeout_seconds=header_timeout)
    limit = nofile_limit(relay)
    honest = await Honest.open(relay)
    try:
        base_ws = await honest.probe(n=20)
        base_rest = await fresh_rest_probe(relay, honest)
        idle = relay.rss()
        started = time.monotonic()
        slowloris = attack("slowloris", relay, seconds=header_timeout + 8)
        async with sampled(relay) as peak, slowloris as attacker:
            await asyncio.sleep(2.0)  # the connections open (100 every 50 ms)
            during_rest = await fresh_rest_probe(relay, honest)
            during_ws = await honest.probe(n=20, timeout=5)
            report = await attacker.report()
        elapsed = time.monotonic() - started
    finally:
        await honest.close()
    print(
        report,
        f"nofile {limit}, peak fds {peak.fds}, rss +{(peak.rss - idle) >> 20} MiB, "
        f"REST (new connection) p99 {ms(base_rest)} -> {ms(during_rest)}, "
        f"send p99 {ms(base_ws)} -> {ms(during_ws)}, {elapsed:.1f} s",
    )
    assert report.get("opened", 0) >= 1000, report
    assert limit > SYSTEMD_SOFT_NOFILE
    assert peak.fds < limit
    assert_holds(base_rest, during_rest, "REST (new connection)")
    assert_holds(base_ws, during_ws)
    assert peak.rss - idle < RSS_BOUND
    # Every half-sent request was closed by the relay, within the header timeout of
    # when it opened (they open over about 0.6 s).
    assert report.get("closed_by_relay", 0) == report["opened"], report
    assert report["last_close_ms"] <= (header_timeout + 2.5) * 1000, report
