"""The budgets that bound what one client can take: connections, frames, work, bytes.

Each test performs the misuse against a real relay and checks the typed answer
(or the close) and that honest use right beside it still works.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import httpx
import pytest
import websockets
from websockets.frames import Frame, Opcode

from backchannel.protocol.keys import MemberKeyPair
from backchannel.server.errors import RelayError
from backchannel.server.storage import Store, make_engine
from backchannel.server.storage.batcher import Batcher

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, WSClient, closed_with, frame

ROOM_MESSAGES_IN = 'backchannel_relay_messages_in_total{kind="room"}'


async def still_works(client: WSClient) -> None:
    await client.send_frame("ping")
    await client.expect("pong")


async def test_a_connection_that_never_settles_is_closed(relay_factory: RelayFactory) -> None:
    """Authenticating proves nothing (anyone mints keys): a connection holding no
    member subscription is closed after the set-up window; a member's stays."""
    relay = relay_factory(setup_window_seconds=1.0)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    stranger = await WSClient.connect(relay, [MemberKeyPair.generate()])
    member = await WSClient.connect(relay, [room.facilitator])
    await member.send_frame("sub", room=room.id, after=0)
    await member.expect("synced")
    err = await stranger.expect("error", timeout=5)
    assert err["code"] == "not_a_member"
    await closed_with(lambda: stranger.recv(timeout=5))
    await asyncio.sleep(1.5)
    await still_works(member)
    await member.close()


async def test_a_removed_member_loses_its_long_lived_slot(relay_factory: RelayFactory) -> None:
    relay = relay_factory(setup_window_seconds=1.0)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        gone = await room.add_member()
        client = await WSClient.connect(relay, [gone])
        await client.send_frame("sub", room=room.id, after=0)
        await client.expect("synced")
        await asyncio.sleep(1.5)
        await still_works(client)  # settled: the window no longer applies
        await room.remove(gone)
    await client.expect("removed", timeout=5)
    err = await client.expect("error", timeout=5)
    assert err["code"] == "not_a_member"
    await closed_with(lambda: client.recv(timeout=5))


async def test_unsettled_connections_per_address_are_capped(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_unsettled_per_address=2)
    held = [await WSClient.connect(relay, [MemberKeyPair.generate()]) for _ in range(2)]
    ws = await websockets.connect(relay.ws_url, max_size=None)
    first = await asyncio.wait_for(ws.recv(), 5)
    assert b"too_many_connections" in first
    await closed_with(lambda: asyncio.wait_for(ws.recv(), 5))
    for client in held:
        await still_works(client)
        await client.close()


async def test_when_strangers_fill_the_unsettled_budget_the_oldest_make_room(
    relay_factory: RelayFactory,
) -> None:
    """Strangers from many addresses fill the unsettled total: a new connection
    closes the oldest unsettled one instead of being refused, so a member arriving
    during the flood gets in and, once subscribed, is out of the strangers' reach."""
    relay = relay_factory(max_unsettled_connections=3)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    strangers = []
    for i in range(3):
        sock = socket.create_connection(
            ("127.0.0.1", relay.port), source_address=(f"127.0.2.{i + 1}", 0)
        )
        strangers.append(await WSClient.connect(relay, sock=sock))
    member = await WSClient.connect(relay, [room.facilitator])
    assert (await strangers[0].expect("error"))["code"] == "too_many_connections"
    await closed_with(lambda: strangers[0].recv(timeout=5))
    await member.send_frame("sub", room=room.id, after=0)
    await member.expect("synced")
    for i in range(3):
        sock = socket.create_connection(
            ("127.0.0.1", relay.port), source_address=(f"127.0.3.{i + 1}", 0)
        )
        strangers.append(await WSClient.connect(relay, sock=sock))
    await still_works(member)
    await member.close()


async def test_frames_past_the_budget_are_read_slowly_not_dropped(
    relay_factory: RelayFactory,
) -> None:
    """A flood of frames is told once (`rate_limited`) and then read only as fast as
    the budget refills; nothing is lost, so a client that merely bursts is served."""
    relay = relay_factory(frame_rate_per_second=40.0, frame_burst=10)
    client = await WSClient.connect(relay, [MemberKeyPair.generate()])
    started = time.monotonic()
    for _ in range(50):
        await client.send_frame("ping")
    pongs = 0
    errors = []
    while pongs < 50:
        f = await client.recv(timeout=10)
        if f["t"] == "pong":
            pongs += 1
        else:
            errors.append(f.get("code"))
    elapsed = time.monotonic() - started
    assert errors == ["rate_limited"]
    assert elapsed > 0.8, elapsed  # ~40 frames beyond the burst at 40/s
    await client.close()


async def test_one_key_on_many_connections_gets_one_send_budget(
    relay_factory: RelayFactory,
) -> None:
    relay = relay_factory(key_burst=3, key_messages_per_second=0.01)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    a = await WSClient.connect(relay, [room.facilitator])
    b = await WSClient.connect(relay, [room.facilitator])
    codes = []
    for client in (a, b, a, b):
        reply = await client.send_msg(room.id, room.facilitator, os.urandom(64))
        codes.append(reply["t"] if reply["t"] == "sent" else reply["code"])
    assert codes == ["sent", "sent", "sent", "rate_limited"]
    await a.close()
    await b.close()


async def test_sends_in_flight_per_connection_are_bounded(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_inflight_writes=2, batch_window_ms=200.0)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
    client = await WSClient.connect(relay, [room.facilitator])
    cids = [os.urandom(16) for _ in range(6)]
    for cid in cids:
        await client.send_frame(
            "send", room=room.id, from_=room.facilitator.public.sign, cid=cid, data=b"x" * 64
        )
    replies = [await client.expect_reply("sent", cid) for cid in cids]
    kinds = [r["t"] if r["t"] == "sent" else r["code"] for r in replies]
    assert kinds.count("sent") >= 2
    assert "busy" in kinds
    await client.close()


async def test_a_full_group_commit_queue_answers_busy(tmp_path: object) -> None:
    """No unbounded queue behind a slow disk: past ``write_queue_depth`` a write is
    refused at once with `busy` (the client keeps it and retries)."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/q.db")
    store = Store(engine, batch_window=0, batch_max=1, write_queue_depth=16)
    batcher: Batcher = store.batcher
    await store.start()
    release = asyncio.Event()

    async def stuck(_session: object) -> None:
        await release.wait()

    try:
        waiting = [asyncio.create_task(batcher.submit(stuck)) for _ in range(40)]
        await asyncio.sleep(0.1)
        refused = [t for t in waiting if t.done()]
        # 16 queued (and perhaps one taken by the committer): the rest refused at once.
        assert len(refused) in (40 - 16, 40 - 17)
        for task in refused:
            with pytest.raises(RelayError) as busy:
                task.result()
            assert busy.value.code == "busy"
        release.set()
        await asyncio.wait_for(asyncio.gather(*(t for t in waiting if t not in refused)), 10)
    finally:
        await store.close()


async def test_acks_for_mail_not_delivered_here_cost_nothing(relay: RelayServer) -> None:
    client = await WSClient.connect(relay, [MemberKeyPair.generate()])
    for _ in range(20):
        await client.send_frame("ack", ids=list(range(1, 1025)))
    for _ in range(20):
        assert (await client.expect("acked"))["ids"] == []
    await still_works(client)
    await client.close()


async def test_a_reader_that_stops_reading_is_dropped(relay_factory: RelayFactory) -> None:
    """A member subscribes from the start of a long room and reads nothing: once its
    socket has taken nothing for ``slow_reader_seconds`` it is aborted, page and
    buffers freed (before: it pinned a whole catch-up page for as long as it liked)."""
    relay = relay_factory(
        slow_reader_seconds=1.0,
        rate_burst=1000,
        key_burst=1000,
        frame_burst=1000,
        max_inflight_writes=1000,
    )
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        reader = await room.add_member()
    sender = await WSClient.connect(relay, [room.facilitator])
    blob = os.urandom(100 * 1024)
    for _ in range(40):
        assert (await sender.send_msg(room.id, room.facilitator, blob))["t"] == "sent"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.port))
    slow = await WSClient.connect(relay, [reader], max_queue=1, sock=sock)
    await slow.send_frame("sub", room=room.id, after=0)
    deadline = time.monotonic() + 10
    while relay.app.state.limiter.live > 1:
        assert time.monotonic() < deadline, "the reader that stopped reading is still connected"
        await asyncio.sleep(0.1)
    await still_works(sender)
    await sender.close()


async def _fragmented(relay: RelayServer, parts: list[bytes]) -> WSClient:
    client = await WSClient.connect(relay, [MemberKeyPair.generate()])
    proto = client.ws.protocol
    proto.send_frame(Frame(Opcode.BINARY, parts[0], fin=len(parts) == 1))
    for i, part in enumerate(parts[1:], start=2):
        proto.send_frame(Frame(Opcode.CONT, part, fin=i == len(parts)))
    client.ws.send_data()
    return client


async def test_fragments_count_from_the_first(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_fragments=8)
    ping = frame("ping")
    assert len(ping) > 8
    ok = await _fragmented(relay, [ping[:4], ping[4:6], ping[6:8], ping[8:]])
    await ok.expect("pong")
    await ok.close()
    many = await _fragmented(relay, [b"\xa0"] + [b"x"] * 20)
    closed = await closed_with(lambda: many.recv(timeout=5))
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1009


async def test_an_empty_continuation_is_refused(relay: RelayServer) -> None:
    ping = frame("ping")
    client = await _fragmented(relay, [ping[:2], b"", ping[2:]])
    closed = await closed_with(lambda: client.recv(timeout=5))
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1008


async def test_a_sender_that_never_reads_its_answers_stops_being_read(
    relay_factory: RelayFactory,
) -> None:
    """A room message's `sent` is written from the commit's callback, which cannot
    wait for room in the outbox; the reader waits instead, before it takes the
    next send. So a client that sends and never reads holds at most the outbox's
    bound (plus the sends in flight) in the relay, is no longer read past it
    (TCP then slows it), and once it reads again every send taken is answered."""
    bound = 64 * 1024  # the least the setting takes
    relay = relay_factory(
        max_pending_bytes=bound,
        rate_messages_per_second=1e6,
        rate_burst=1e6,
        key_messages_per_second=1e6,
        key_burst=1e6,
        frame_rate_per_second=1e6,
        frame_burst=1e6,
        max_inflight_writes=100_000,  # not the bound that holds here
    )
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
        room = await TestRoom.create(http)
    # Small socket buffers at both ends (an accepted socket inherits the listening
    # one's), so that what the kernel holds does not hide what the relay holds.
    relay.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    relay.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    sock.connect(("127.0.0.1", relay.port))
    # Not subscribed: its own messages would come back to it, and a subscriber
    # that does not read is closed as too slow (another bound, tested elsewhere).
    client = await WSClient.connect(relay, [room.facilitator], sock=sock, max_queue=1)
    total = 12_000
    cids = [os.urandom(16) for _ in range(total)]

    async def flood() -> None:
        for cid in cids:
            await client.send_frame(
                "send", room=room.id, from_=room.facilitator.public.sign, cid=cid, data=b"x"
            )

    async def taken(http: httpx.AsyncClient) -> int:
        text = (await http.get("/metrics")).text
        (line,) = (x for x in text.splitlines() if x.startswith(ROOM_MESSAGES_IN))
        return int(float(line.split()[-1]))

    sending = asyncio.create_task(flood())
    (conn,) = relay.app.state.connections
    most = 0
    async with httpx.AsyncClient(base_url=relay.admin_url, timeout=10) as admin:
        for _ in range(15):  # ample to take all 12,000 if it kept reading
            await asyncio.sleep(0.1)
            most = max(most, conn.pending)
        plateau = await taken(admin)
        await asyncio.sleep(0.5)
        assert await taken(admin) == plateau, "the relay still reads a client that does not"
    assert plateau < total // 2
    # Within half the setting: a send is taken only with room for its answer and
    # for every answer still owed.
    assert most <= bound // 2, most
    # Reading again: every send is answered, none lost, none twice.
    seqs = [(await client.expect_reply("sent", cid, timeout=30)).get("seq") for cid in cids]
    await asyncio.wait_for(sending, 10)
    assert seqs == list(range(1, total + 1))
    await still_works(client)
    await client.close()
