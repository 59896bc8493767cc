"""Pairwise mailboxes: live delivery, pending after auth, ack deletes, redelivery."""

from __future__ import annotations

import os

import httpx

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, WSClient


async def psend(
    client: WSClient, room: bytes, sender: bytes, to: bytes, data: bytes
) -> dict[str, object]:
    cid = os.urandom(16)
    await client.send_frame("psend", room=room, from_=sender, to=to, cid=cid, data=data)
    return await client.expect_reply("psent", cid)


async def test_mailbox_delivery_ack_and_redelivery(
    http: httpx.AsyncClient, relay: RelayServer
) -> None:
    room = await TestRoom.create(http)
    alice, bob = room.facilitator, await room.add_member()
    a = await WSClient.connect(relay, [alice])
    # Bob is offline: items wait in his mailbox.
    first = await psend(a, room.id, alice.public.sign, bob.public.sign, b"one")
    second = await psend(a, room.id, alice.public.sign, bob.public.sign, b"two")
    assert first["t"] == "psent"
    assert second["t"] == "psent"
    b = await WSClient.connect(relay, [bob])
    got = [await b.expect("pmsg"), await b.expect("pmsg")]
    assert [g["data"] for g in got] == [b"one", b"two"]
    assert got[0]["from"] == alice.public.sign
    assert got[0]["to"] == bob.public.sign
    assert got[0]["room"] == room.id
    assert got[0]["id"] == first["id"]
    # Live while connected.
    third = await psend(a, room.id, alice.public.sign, bob.public.sign, b"three")
    live = await b.expect("pmsg")
    assert live["id"] == third["id"]
    assert live["data"] == b"three"
    # Ack only the first; reconnect: the other two come again.
    await b.send_frame("ack", ids=[first["id"]])
    assert (await b.expect("acked"))["ids"] == [first["id"]]
    await b.close()
    b = await WSClient.connect(relay, [bob])
    again = [await b.expect("pmsg"), await b.expect("pmsg")]
    assert [g["id"] for g in again] == [second["id"], third["id"]]
    await b.nothing("pmsg")
    # Alice cannot ack Bob's items; Bob acks the rest.
    await a.send_frame("ack", ids=[second["id"]])
    assert (await a.expect("acked"))["ids"] == []
    await b.send_frame("ack", ids=[second["id"], third["id"], 999_999])
    assert (await b.expect("acked"))["ids"] == [second["id"], third["id"]]
    await b.close()
    b = await WSClient.connect(relay, [bob])
    await b.nothing("pmsg")
    await a.close()
    await b.close()


async def test_mailbox_idempotent_and_membership(
    http: httpx.AsyncClient, relay: RelayServer
) -> None:
    room = await TestRoom.create(http)
    alice, bob = room.facilitator, await room.add_member()
    outsider_room = await TestRoom.create(http)
    outsider = outsider_room.facilitator
    a = await WSClient.connect(relay, [alice, outsider])
    cid = os.urandom(16)
    for _ in range(2):
        await a.send_frame(
            "psend", room=room.id, from_=alice.public.sign, to=bob.public.sign, cid=cid, data=b"x"
        )
    ids = {(await a.expect_reply("psent", cid))["id"] for _ in range(2)}
    assert len(ids) == 1
    # Not a member as sender, or as recipient.
    r = await psend(a, room.id, outsider.public.sign, bob.public.sign, b"x")
    assert r["t"] == "error"
    assert r["code"] == "not_authorized"
    r = await psend(a, room.id, alice.public.sign, outsider.public.sign, b"x")
    assert r["t"] == "error"
    assert r["code"] == "not_authorized"
    # A removed member gets nothing new.
    await room.remove(bob)
    r = await psend(a, room.id, alice.public.sign, bob.public.sign, b"x")
    assert r["t"] == "error"
    assert r["code"] == "not_authorized"
    await a.close()


async def test_mailbox_depth_limit(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_mailbox_depth=3)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        alice, bob, carol = room.facilitator, await room.add_member(), await room.add_member()
    a = await WSClient.connect(relay, [alice])
    for i in range(3):
        ok = await psend(a, room.id, alice.public.sign, bob.public.sign, b"%d" % i)
        assert ok["t"] == "psent"
    full = await psend(a, room.id, alice.public.sign, bob.public.sign, b"more")
    assert full["t"] == "error"
    assert full["code"] == "mailbox_full"
    # Other mailboxes are unaffected.
    assert (await psend(a, room.id, alice.public.sign, carol.public.sign, b"hi"))["t"] == "psent"
    # Acking frees room.
    b = await WSClient.connect(relay, [bob])
    ids = [(await b.expect("pmsg"))["id"] for _ in range(3)]
    await b.send_frame("ack", ids=ids)
    await b.expect("acked")
    assert (await psend(a, room.id, alice.public.sign, bob.public.sign, b"ok"))["t"] == "psent"
    await a.close()
    await b.close()
