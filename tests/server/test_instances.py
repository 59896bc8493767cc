"""Two relay instances writing to one PostgreSQL database at once (issue #5 §1.2).

Sequence numbers and one-time prekey claims rely on the database's guarantees
(a row lock on ``rooms.last_seq``; ``SKIP LOCKED`` + ``DELETE … RETURNING``),
not on anything in one process, so they hold across instances. No Redis here:
these are storage properties.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from backchannel.protocol.keys import MemberKeyPair

from .conftest import BACKENDS, RelayFactory
from .helpers import RelayServer, TestRoom, WSClient, frame, make_upload, signed_post, upload
from .test_prekeys import bundle_of


@pytest.fixture(params=[BACKENDS[1]])  # PostgreSQL only: SQLite is one process by design
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def two(relay_factory: RelayFactory) -> tuple[RelayServer, RelayServer]:
    fast = {
        "rate_burst": 1000,
        "key_burst": 1000,
        "frame_burst": 1000,
        "max_inflight_writes": 1000,
        "frame_rate_per_second": 1000,
        "key_messages_per_second": 1000,
        "rate_messages_per_second": 1000.0,
        "batch_max": 16,
    }
    return relay_factory(**fast), relay_factory(**fast)


async def test_sequence_numbers_gap_free_under_concurrent_instances(
    two: tuple[RelayServer, RelayServer],
) -> None:
    a, b = two
    async with httpx.AsyncClient(base_url=a.url) as http:
        room = await TestRoom.create(http)
        senders = [await room.add_member() for _ in range(4)]
    clients = [
        await WSClient.connect(relay, [key])
        for relay, key in zip([a, b, a, b], senders, strict=True)
    ]
    per_sender = 30

    async def blast(client: WSClient, key: MemberKeyPair) -> list[int]:
        cids = [os.urandom(16) for _ in range(per_sender)]
        for cid in cids:
            await client.send(frame("send", room=room.id, from_=key.public.sign, cid=cid, data=cid))
            if cid == cids[per_sender // 2]:
                # A retry of the first send, mid-stream: stored once, same seq.
                await client.send(
                    frame("send", room=room.id, from_=key.public.sign, cid=cids[0], data=cids[0])
                )
        seqs = []
        for cid in cids:
            ack = await client.expect_reply("sent", cid, timeout=20)
            assert ack["t"] == "sent", ack
            seqs.append(ack["seq"])
        retry = await client.expect_reply("sent", cids[0], timeout=20)
        assert retry["seq"] == seqs[0]
        return seqs

    results = await asyncio.gather(*(blast(c, k) for c, k in zip(clients, senders, strict=True)))
    every = [s for seqs in results for s in seqs]
    total = per_sender * len(senders)
    assert sorted(every) == list(range(1, total + 1)), "unique and gap-free"
    for seqs in results:
        assert seqs == sorted(seqs), "one sender's messages keep their order"
    # Either instance serves the same, complete history.
    for relay in (a, b):
        reader = await WSClient.connect(relay, [senders[0]])
        await reader.send_frame("sub", room=room.id, after=0)
        got = [(await reader.expect("msg", timeout=10))["seq"] for _ in range(total)]
        assert got == list(range(1, total + 1))
        await reader.close()
    for c in clients:
        await c.close()


async def test_one_time_prekey_claims_exclusive_across_instances(
    two: tuple[RelayServer, RelayServer],
) -> None:
    a, b = two
    n_keys, n_claims = 12, 30
    async with httpx.AsyncClient(base_url=a.url) as http:
        room = await TestRoom.create(http)
        target = await room.add_member()
        claimers = [await room.add_member() for _ in range(n_claims)]
        r = await upload(
            http, make_upload(target, opk=range(1, n_keys + 1), kem=range(1, n_keys + 1))
        )
        assert r.status_code == 200, r.text
    path = f"/v1/prekeys/{target.public.sign.hex()}/claim"
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=20) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=20) as http_b,
    ):
        responses = await asyncio.gather(
            *(
                signed_post(http_a, a, key, path)
                if i % 2 == 0
                else signed_post(http_b, b, key, path)
                for i, key in enumerate(claimers)
            )
        )
    bundles = [bundle_of(r) for r in responses]
    opks = [x.opk.id for x in bundles if x.opk is not None]
    kems = [x.kem.id for x in bundles if x.kem.kind == "kem"]
    assert sorted(opks) == list(range(1, n_keys + 1)), "each one-time key handed out once"
    assert sorted(kems) == list(range(1, n_keys + 1))
    assert sum(1 for x in bundles if x.kem.kind == "kem-lr") == n_claims - n_keys
