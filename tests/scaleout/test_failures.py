"""PostgreSQL going away and coming back, under a running relay instance.

The relay reaches PostgreSQL through a TCP proxy on 127.0.0.1 that the test can
cut (every connection aborted, new ones refused) and restore: real asyncpg
connections die as they would if the database host vanished.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from backchannel.server.config import Settings
from tests.server.conftest import LOG_STREAM, empty_postgres
from tests.server.helpers import RelayServer, TestRoom, WSClient, frame

from .helpers import TcpProxy, collect, wait_ready


async def test_database_outage_is_reported_refused_and_recovered(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    await empty_postgres(postgres_url)
    real = make_url(postgres_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    await proxy.up()
    via_proxy = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = Settings(
        data_dir=tmp_path,
        database_url=via_proxy,
        redis_url=redis_url,
        redis_channel=f"backchannel:test:{os.urandom(8).hex()}",
        catch_up_interval_seconds=0.5,
    )
    # Started off the test's loop: the proxy runs on it and must keep pumping.
    relay = await asyncio.to_thread(RelayServer(settings).start)
    try:
        await wait_ready(relay)
        async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
            room = await TestRoom.create(http)
            bob = await room.add_member()
        alice = room.facilitator
        a = await WSClient.connect(relay, [alice])
        b = await WSClient.connect(relay, [bob])
        await b.send_frame("sub", room=room.id, after=0)
        await b.expect("synced")
        acked = {(await a.send_msg(room.id, alice, b"before"))["seq"]: b"before"}

        mark = len(LOG_STREAM.getvalue())
        await proxy.down()
        body = await wait_ready(relay, ready=False)
        assert body["checks"]["database"] == "down"
        assert body["error"]["code"] == "not_ready"
        assert "postgres" not in str(body)  # no URL, no credentials
        # A send gets a clear error, quickly.
        cid = os.urandom(16)
        started = time.monotonic()
        await a.send(frame("send", room=room.id, from_=alice.public.sign, cid=cid, data=b"x"))
        err = await a.expect_reply("sent", cid, timeout=15)
        assert (err["t"], err["code"]) == ("error", "storage_unavailable")
        assert time.monotonic() - started < 10
        async with httpx.AsyncClient(base_url=relay.url, timeout=15) as http:
            r = await http.post("/v1/rooms", json={"event": "AAAA"})
            assert r.status_code in (400, 503)
            r = await http.get(f"/v1/rooms/{room.id.hex()}/events", params={"after": 0})
            # Unsigned: refused before any query, or by the database being gone.
            assert r.status_code in (401, 503)

        await proxy.up()  # same port
        await wait_ready(relay, ready=True)
        # The retried send now succeeds, exactly once; bob gets everything, in order.
        await a.send(frame("send", room=room.id, from_=alice.public.sign, cid=cid, data=b"x"))
        ok = await a.expect_reply("sent", cid, timeout=10)
        assert ok["t"] == "sent"
        acked[ok["seq"]] = b"x"
        assert sorted(acked) == [1, 2]
        try:
            got = await collect(b, room.id, 2)
        except Exception:
            # The connection may have been closed with storage_unavailable during the
            # outage; a client reconnects and resumes from its cursor.
            b = await WSClient.connect(relay, [bob])
            await b.send_frame("sub", room=room.id, after=0)
            got = await collect(b, room.id, 2)
        assert dict(got) == acked
        await a.close()
        await b.close()
        logs = LOG_STREAM.getvalue()[mark:]
        for leak in ("127.0.0.1", str(proxy.port), "postgres", room.id.hex()):
            assert leak not in logs
    finally:
        await relay.astop()
        if proxy.server is not None:
            await proxy.down()
    assert relay.app.state.internal_errors == 0
