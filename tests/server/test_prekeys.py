"""Prekey upload and claim: signatures, replay, caps, atomic one-time consumption."""

from __future__ import annotations

import asyncio

import httpx

from backchannel.protocol.keys import MemberKeyPair, PreKeyBundle, PreKeyUpload

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, b64d, make_upload, signed_post, upload


async def claim(
    http: httpx.AsyncClient, relay: RelayServer, claimer: MemberKeyPair, target: MemberKeyPair
) -> httpx.Response:
    return await signed_post(http, relay, claimer, f"/v1/prekeys/{target.public.sign.hex()}/claim")


def bundle_of(r: httpx.Response) -> PreKeyBundle:
    assert r.status_code == 200, r.text
    return PreKeyBundle.from_bytes(b64d(r.json()["bundle"]))


async def test_upload_and_claim(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    alice, bob = room.facilitator, await room.add_member()
    r = await upload(http, make_upload(bob, opk=range(1, 3), kem=range(1, 3)))
    assert r.status_code == 200, r.text
    assert r.json() == {"stored": 6, "counts": {"opk": 2, "kem": 2}}
    first = bundle_of(await claim(http, relay, alice, bob))
    first.verify(bob.public)
    assert first.kem.kind == "kem"
    assert first.opk is not None
    second = bundle_of(await claim(http, relay, alice, bob))
    assert (second.kem.id, second.opk and second.opk.id) != (first.kem.id, first.opk.id)
    # One-time keys exhausted: the last-resort KEM key, no opk, again and again.
    for _ in range(2):
        last = bundle_of(await claim(http, relay, alice, bob))
        last.verify(bob.public)
        assert last.kem.kind == "kem-lr"
        assert last.opk is None


async def test_upload_rules(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    bob = await room.add_member()
    stranger = MemberKeyPair.generate()
    r = await upload(http, make_upload(stranger))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "not_a_member"
    # A forged signature.
    good = PreKeyUpload.from_bytes(make_upload(bob, opk=range(1, 2)))
    bad = good.prekeys[0].__class__(
        kind=good.prekeys[0].kind,
        id=good.prekeys[0].id,
        public=good.prekeys[0].public,
        ts=good.prekeys[0].ts,
        signature=bytes(64),
    )
    forged = PreKeyUpload(member=bob.public, prekeys=[bad, *good.prekeys[1:]]).to_bytes()
    r = await upload(http, forged)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "bad_signature"
    # Keys signed by someone else for bob's key do not verify either.
    r = await upload(
        http,
        PreKeyUpload(
            member=bob.public, prekeys=PreKeyUpload.from_bytes(make_upload(stranger)).prekeys
        ).to_bytes(),
    )
    assert r.status_code == 403
    # Garbage.
    r = await upload(http, b"\x00\x01")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed"
    # A good upload; then the same upload again is an idempotent no-op.
    data = make_upload(bob, opk=range(1, 4))
    assert (await upload(http, data)).json()["stored"] == 5
    assert (await upload(http, data)).json() == {"stored": 0, "counts": {"opk": 3, "kem": 0}}


async def test_claimed_one_time_key_cannot_be_replayed(
    http: httpx.AsyncClient, relay: RelayServer
) -> None:
    room = await TestRoom.create(http)
    alice, bob = room.facilitator, await room.add_member()
    data = make_upload(bob, opk=range(1, 3), kem=range(1, 2))
    assert (await upload(http, data)).status_code == 200
    bundle_of(await claim(http, relay, alice, bob))  # consumes opk 1 and kem 1
    r = await upload(http, data)  # a replay would bring them back
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "prekey_replayed"
    # New ids are fine; spk and kem-lr with higher ids replace the old ones.
    r = await upload(http, make_upload(bob, spk=2, kem_lr=2, opk=range(3, 5)))
    assert r.status_code == 200
    assert r.json()["counts"] == {"opk": 3, "kem": 0}
    b = bundle_of(await claim(http, relay, alice, bob))
    assert b.spk.id == 2
    assert b.kem.kind == "kem-lr"
    assert b.kem.id == 2
    r = await upload(http, make_upload(bob, spk=1, kem_lr=None))  # an old spk
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "prekey_replayed"


async def test_prekey_cap(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_prekeys_per_member=5)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        bob, carol = await room.add_member(), await room.add_member()
        r = await upload(http, make_upload(bob, opk=range(1, 5)))  # 2 + 4 = 6
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "too_many_prekeys"
        assert (await upload(http, make_upload(bob, opk=range(1, 3)))).status_code == 200
        r = await upload(http, make_upload(bob, spk=None, kem_lr=None, opk=range(3, 4)))
        assert r.status_code == 200  # 5 stored: at the cap
        r = await upload(http, make_upload(bob, spk=None, kem_lr=None, opk=range(4, 5)))
        assert r.status_code == 413
        # Other members are unaffected.
        assert (await upload(http, make_upload(carol, opk=range(1, 4)))).status_code == 200


async def test_claim_rules(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    alice, bob = room.facilitator, await room.add_member()
    other = await TestRoom.create(http)
    r = await claim(http, relay, alice, bob)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "no_prekeys"
    await upload(http, make_upload(bob))
    r = await claim(http, relay, other.facilitator, bob)  # shares no room
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "not_authorized"
    r = await http.post(f"/v1/prekeys/{bob.public.sign.hex()}/claim")
    assert r.status_code == 401
    bundle_of(await claim(http, relay, alice, bob))


async def test_concurrent_claims_never_share_a_one_time_key(
    http: httpx.AsyncClient, relay: RelayServer
) -> None:
    room = await TestRoom.create(http)
    bob = await room.add_member()
    claimers = [room.facilitator] + [await room.add_member() for _ in range(3)]
    n = 12
    r = await upload(http, make_upload(bob, opk=range(1, n + 1), kem=range(1, 7)))
    assert r.status_code == 200, r.text
    answers = await asyncio.gather(
        *(claim(http, relay, claimers[i % len(claimers)], bob) for i in range(n + 4))
    )
    bundles = [bundle_of(a) for a in answers]
    opks = [b.opk.id for b in bundles if b.opk is not None]
    kems = [b.kem.id for b in bundles if b.kem.kind == "kem"]
    assert len(opks) == len(set(opks)) == n
    assert len(kems) == len(set(kems)) == 6
    assert sum(b.kem.kind == "kem-lr" for b in bundles) == n + 4 - 6
