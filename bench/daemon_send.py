"""Sends per second from one process through ``backchannel daemon`` (issue 13, item 4).

    .venv/bin/python bench/daemon_send.py [--messages 2000] [--repeats 3] [--window 256]

Starts a relay on 127.0.0.1 (with bench/run.py's RELAY_ENV: the limits meant to
stop one person flooding a room would stop a benchmark), makes a two-person
room, starts the facilitator's daemon, and has one process send ``--messages``
room messages through the daemon's socket with ``--window`` requests in flight;
a send counts once the daemon answered it, i.e. once the relay said it is
durable. Printed beside it, from the same run:

- the old way: one ``backchannel send`` process per message (passphrase,
  key derivation, connection, log fetch, send, wait), median of 3;
- the crypto-only ceiling: sealing the same messages under a sender key, in
  this process, with no storage and no network.

Medians of ``--repeats``; a benchmark, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from backchannel.client.core import Client  # noqa: E402
from backchannel.client.rpc import DaemonClient  # noqa: E402
from backchannel.client.rpcwire import socket_path  # noqa: E402
from backchannel.client.store import Store  # noqa: E402
from backchannel.protocol import primitives as P  # noqa: E402
from backchannel.protocol import roomlog as L  # noqa: E402
from backchannel.protocol.encoding import encode  # noqa: E402
from backchannel.protocol.senderkey import OutboundSenderKey  # noqa: E402
from bench.run import RELAY_ENV, _kill_all, start_relay  # noqa: E402

PASS = "bench passphrase"
FAST = {"opslimit": P.ARGON2_OPSLIMIT_MIN, "memlimit": P.ARGON2_MEMLIMIT_MIN}


async def make_room(work: Path, url: str) -> tuple[Path, str]:
    homes = {n: work / n for n in ("fac", "ann")}
    clients = {}
    for name, home in homes.items():
        store = Store.create(home, PASS, **FAST)
        Client.init_profile(store, url, name)
        clients[name] = Client(store)
    fac, ann = clients["fac"], clients["ann"]
    room = await fac.create_room("bench", L.Rules())
    await ann.join(await fac.invite(room, "participant", 3600, 1), accept_rules=lambda r: True)
    for c in (fac, ann, fac):
        rooms = c.rooms()
        async with c.connect(rooms) as sock:
            await c.pump(sock, rooms, idle=0.05)
    for c in (fac, ann):
        await c.aclose()
        c.store.close()
    return homes["fac"], room.name


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "BACKCHANNEL_HOME": str(home), "BACKCHANNEL_PASSPHRASE": PASS}


def start_daemon(home: Path) -> subprocess.Popen[str]:
    # BENCH_PROFILE=FILE: the daemon runs under cProfile, for finding where time goes.
    profile = os.environ.get("BENCH_PROFILE")
    wrap = ["-m", "cProfile", "-o", profile] if profile else []
    proc = subprocess.Popen(
        [sys.executable, *wrap, "-m", "backchannel.client", "daemon"],
        env=env_for(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = DaemonClient.connect(home)
        if found is not None:
            found.close()
            return proc
        time.sleep(0.05)
    raise RuntimeError("the daemon did not start")


async def through_daemon(home: Path, room: str, count: int, window: int) -> float:
    reader, writer = await asyncio.open_unix_connection(str(socket_path(home)), limit=1 << 20)
    text = "x" * 200
    sent = answered = 0
    start = time.perf_counter()
    while answered < count:
        while sent < count and sent - answered < window:
            request = {"jsonrpc": "2.0", "id": sent, "method": "send",
                       "params": {"room": room, "text": text}}
            writer.write(json.dumps(request).encode() + b"\n")
            sent += 1
        await writer.drain()
        answer = json.loads(await reader.readline())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        answered += 1
    elapsed = time.perf_counter() - start
    writer.close()
    return count / elapsed


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_process_per_send(home: Path, room: str) -> float:
    times = []
    for i in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "backchannel.client", "send", room, f"old way {i}"],
            env=env_for(home), check=True, capture_output=True, timeout=120,
        )
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times)


def crypto_only(count: int) -> float:
    out = OutboundSenderKey.generate(P.random_bytes(32), P.random_bytes(32), since=0)
    body = encode({"t": "text", "text": "x" * 200, "ts": 0})
    epoch = (0, P.random_bytes(32))
    start = time.perf_counter()
    for _ in range(count):
        out.seal(body, epoch)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    relay = start_relay("sqlite")
    try:
        home, room = asyncio.run(make_room(work, relay.url))
        old = one_process_per_send(home, room)
        daemon = start_daemon(home)
        try:
            relay_cpu, daemon_cpu, wall = cpu_seconds(relay.proc.pid), cpu_seconds(daemon.pid), 0.0
            rates = []
            for _ in range(args.repeats):
                rates.append(asyncio.run(through_daemon(home, room, args.messages, args.window)))
                wall += args.messages / rates[-1]
            relay_cpu = cpu_seconds(relay.proc.pid) - relay_cpu
            daemon_cpu = cpu_seconds(daemon.pid) - daemon_cpu
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
        ceiling = statistics.median(crypto_only(args.messages) for _ in range(args.repeats))
    finally:
        relay.stop()
        _kill_all()
    rate = statistics.median(rates)
    print(f"relay limits changed for the run: {sorted(RELAY_ENV)}")
    print(f"machine: {os.cpu_count()} cores; messages per run: {args.messages}; "
          f"window: {args.window}; repeats: {args.repeats}")
    print(f"{'figure':52} {'msg/s':>10} {'x old':>8} {'x crypto':>9}")
    print(f"{'one `backchannel send` process per message (old)':52} {old:10.2f} "
          f"{1:8.1f} {old / ceiling:9.4f}")
    print(f"{'one process through the daemon (target >= 500)':52} {rate:10.0f} "
          f"{rate / old:8.0f} {rate / ceiling:9.3f}")
    print(f"{'sender-key sealing alone, no store, no network':52} {ceiling:10.0f} "
          f"{ceiling / old:8.0f} {1:9.1f}")
    print(f"runs through the daemon: {', '.join(f'{r:.0f}' for r in rates)}")
    print(f"CPU busy while sending: relay {relay_cpu / wall:.0%}, daemon {daemon_cpu / wall:.0%} "
          "of one core (the rest of the time each waits for the other)")


if __name__ == "__main__":
    main()
