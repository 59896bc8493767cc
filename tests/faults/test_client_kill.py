"""Issue #6 §2.2: a client process SIGKILLed at random points while it sends and receives.

The victim is a real client process (``tests/faults/client_worker.py``: the client
library with a reconnect loop) talking to a real relay on 127.0.0.1, while a second
member sends to it from the test. The victim is SIGKILLed at seeded random moments
(during connect, key distribution, sealing, waiting for ``sent``, or while decrypting
and storing what it receives) and restarted on the same profile. Afterwards:

* nothing acknowledged is lost: every ``ACK`` the victim printed is among its sealed
  messages, and the peer heard every sealed message exactly once, in order (messages
  sealed but unacknowledged at the kill went out from the outbox on restart);
* the victim heard every message of the peer exactly once, in order;
* no message key was used twice: no two distinct ciphertexts in the relay's store share
  (sender, generation, index) (a rolled-back sender chain would reuse an index);
* the ratchets are in step: after the kills, sidebars (pairwise Double Ratchet) and room
  messages decrypt both ways, and neither transcript carries a warning.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backchannel.client.core import Client
from backchannel.client.store import Store
from backchannel.protocol import roomlog as L
from backchannel.server.config import Settings
from tests.server.helpers import RelayServer

from .procs import SOAK, heard_from, key_reuse, my_sent, new_client, stored_envelopes, warnings

SEED = int(os.environ.get("BACKCHANNEL_FAULT_SEED", "20240612"))
KILLS = 15 if SOAK else 5
COUNT = 150 if SOAK else 60
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayServer]:
    server = RelayServer(
        Settings(
            data_dir=tmp_path / "relay",
            database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db",
            rate_messages_per_second=10000,
            rate_burst=10000,
            key_burst=10000,
            frame_burst=10000,
            max_inflight_writes=10000,
            frame_rate_per_second=10000,
            key_messages_per_second=10000,
        )
    ).start()
    yield server
    server.stop()
    assert server.app.state.internal_errors == 0


class Victim:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.acked: list[str] = []
        self.runs = 0
        self.killed_at: list[str] = []

    async def run(self, kill_after: float | None) -> bool:
        """One run; SIGKILL after ``kill_after`` seconds. True if it finished by itself."""
        self.runs += 1
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.faults.client_worker",
            str(self.home),
            str(COUNT),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        done = False

        async def read() -> None:
            nonlocal done
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode().rstrip("\n")
                if line.startswith("ACK "):
                    self.acked.append(line[4:])
                elif line == "DONE":
                    done = True

        reader = asyncio.create_task(read())
        try:
            await asyncio.wait_for(proc.wait(), kill_after if kill_after is not None else 60)
        except TimeoutError:
            if kill_after is None:
                proc.kill()
                raise AssertionError("the client did not finish in 60 s") from None
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            self.killed_at.append(self.acked[-1] if self.acked else "-")
        await reader
        err = (await proc.stderr.read()).decode() if proc.stderr else ""
        assert "Traceback" not in err, err[-3000:]
        return done


async def test_client_sigkilled_mid_conversation(tmp_path: Path, relay: RelayServer) -> None:
    rng = random.Random(SEED)
    fac = new_client(tmp_path / "fac", relay.url, "fac")
    vic = new_client(tmp_path / "vic", relay.url, "vic")
    room = await fac.create_room("kill test", L.Rules())
    vic_room = await vic.join(await fac.invite(room, "participant", 3600, 1), accept_rules=bool)
    vic_me = vic_room.me
    await vic.aclose()
    vic.store.close()  # from now on only the worker process opens it

    victim = Victim(tmp_path / "vic")
    stop = asyncio.Event()
    fac_acked: list[str] = []

    async def peer() -> None:
        """The other member: sends now and then and reads what the victim says."""
        n = 0
        async with fac.connect([room]) as sock:
            while not stop.is_set():
                await fac.pump(sock, [room], idle=rng.uniform(0.02, 0.15))
                text = f"fac #{n:04d}"
                n += 1
                await fac.send_text(sock, room, text)
                fac_acked.append(text)

    peer_task = asyncio.create_task(peer())
    try:
        # While the peer keeps talking the worker never goes idle, so each run ends in a kill.
        for _ in range(KILLS):
            await victim.run(kill_after=rng.uniform(0.4, 2.5))
    finally:
        stop.set()
        await peer_task
    # Restarted for good: it sends the rest and reads everything.
    assert await victim.run(kill_after=None), "the client did not finish"
    async with fac.connect([room]) as sock:
        await fac.pump(sock, [room], idle=0.5)

    vic = Client(Store.open(tmp_path / "vic", "pw"))
    vic_room = vic.rooms()[0]
    print(f"runs={victim.runs} killed_after={victim.killed_at} acked={len(victim.acked)}")

    sealed = my_sent(vic, vic_room)
    assert len(sealed) == COUNT
    assert sealed == [f"vic #{i:04d}" for i in range(COUNT)], "the victim's numbering broke"
    assert set(victim.acked) <= set(sealed)
    assert vic.outbox.pending() == []
    assert heard_from(fac, room, vic_me) == sealed, "the peer lost or duplicated some"
    fac_sealed = my_sent(fac, room)
    assert set(fac_acked) <= set(fac_sealed)
    assert heard_from(vic, vic_room, room.me) == fac_sealed, "the victim lost or duplicated"

    rows = stored_envelopes(tmp_path / "relay.db")
    assert key_reuse(d for *_, d in rows) == {}, "a sender-key message key was used twice"
    assert len(rows) == len(sealed) + len(fac_sealed)

    # Ratchets in step: pairwise sidebars and room messages, both ways, after the kills.
    async with vic.connect([vic_room]) as sock:
        await vic.pump(sock, [vic_room], idle=0.3)
        await vic.send_text(sock, vic_room, "sidebar from vic", to=room.me)
        await vic.send_text(sock, vic_room, "room from vic")
    async with fac.connect([room]) as sock:
        await fac.pump(sock, [room], idle=0.3)
        await fac.send_text(sock, room, "sidebar from fac", to=vic_me)
        await fac.send_text(sock, room, "room from fac")
    async with vic.connect([vic_room]) as sock:
        await vic.pump(sock, [vic_room], idle=0.3)
    got_fac = [(line.kind, line.text) for line in fac.lines(room) if not line.mine]
    got_vic = [(line.kind, line.text) for line in vic.lines(vic_room) if not line.mine]
    assert ("sidebar", "sidebar from vic") in got_fac
    assert ("message", "room from vic") in got_fac
    assert ("sidebar", "sidebar from fac") in got_vic
    assert ("message", "room from fac") in got_vic
    assert warnings(fac, room) == []
    assert warnings(vic, vic_room) == []

    for client in (fac, vic):
        await client.aclose()
        client.store.close()
