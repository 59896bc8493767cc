"""GET /v1/invites/{key}/log: a short invite code's room, found by the invite key."""

from __future__ import annotations

import httpx
from sqlalchemy import text

from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog
from backchannel.protocol import shortcode as S
from backchannel.protocol.keys import MemberKeyPair
from backchannel.server.migrate import upgrade
from backchannel.server.storage import make_engine

from .helpers import RelayServer, TestRoom, b64d, now, signed_get


def path_of(seed: bytes) -> str:
    return f"/v1/invites/{P.ed25519_public(seed).hex()}/log"


async def test_lookup_by_invite_key(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    event, secret = S.make_invite(
        room.facilitator, room.state, "participant", now() + 3600, 1, now()
    )
    await room.append(event)
    seed = S.invite_seed(secret)
    r = await signed_get(http, relay, seed, path_of(seed))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["room_id"] == room.id.hex()
    assert [b64d(e) for e in body["events"]] == list(room.log.events)
    assert body["length"] == len(room.log)
    S.ShortCode.for_room(relay.url, room.state, secret).check_state(
        roomlog.validate_log([b64d(e) for e in body["events"]]).state
    )
    # Used up: the same refusal as for any other key.
    await room.join(seed)
    r = await signed_get(http, relay, seed, path_of(seed))
    assert (r.status_code, r.json()["error"]["code"]) == (403, "invalid_invite")


async def test_strangers_learn_nothing(http: httpx.AsyncClient, relay: RelayServer) -> None:
    t0 = now()
    room = await TestRoom.create(http, ts=t0 - 100)
    expired = await room.invite(expires=t0 - 1, ts=t0 - 50)
    seed = await room.invite(expires=t0 + 3600)
    stranger = P.random_bytes(32)
    answers = [
        await signed_get(http, relay, stranger, path_of(stranger)),  # unknown key
        await signed_get(http, relay, stranger, path_of(seed)),  # signed by another key
        await signed_get(http, relay, expired, path_of(expired)),
    ]
    for r in answers:
        assert r.status_code == 403
        assert r.json() == {
            "error": {"code": "invalid_invite", "detail": "no valid invite with this key"}
        }
    r = await http.get(path_of(seed))  # unsigned
    assert r.status_code == 401
    r = await signed_get(http, relay, seed, "/v1/invites/00/log")
    assert r.status_code == 400


async def test_a_copied_key_does_not_take_over_the_lookup(
    http: httpx.AsyncClient, relay: RelayServer
) -> None:
    """A member who read the key in one room's log publishes it in a room of its own."""
    room = await TestRoom.create(http)
    seed = await room.invite(expires=now() + 3600)
    copycat = await TestRoom.create(http)
    data, _ = roomlog.make_invite(
        copycat.facilitator,
        copycat.state,
        "participant",
        now() + 3600,
        5,
        now(),
        rng=lambda _n: seed,
    )
    await copycat.append(data)  # valid in its own log, so the relay keeps it
    r = await signed_get(http, relay, seed, path_of(seed))
    assert r.status_code == 200
    assert r.json()["room_id"] == room.id.hex()


async def test_migration_indexes_the_invites_already_in_logs(database_url: str) -> None:
    """Invites appended before revision 0004 can be looked up after it."""
    fac = MemberKeyPair.generate()
    log = roomlog.RoomLog()
    log.append(roomlog.make_create(fac, roomlog.Rules(), now()))
    keys = []
    for _ in range(2):
        data, seed = roomlog.make_invite(fac, log.state, "participant", now() + 60, 1, now())
        log.append(data)
        keys.append(P.ed25519_public(seed))
    engine = make_engine(database_url)
    try:
        await upgrade(engine, "0003")
        async with engine.begin() as conn:
            for pos, data in enumerate(log.events):
                await conn.execute(
                    text("INSERT INTO log_events VALUES (:r, :p, :h, :d)"),
                    {"r": log.room_id, "p": pos, "h": roomlog.event_hash(data), "d": data},
                )
        await upgrade(engine)
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT invite, room_id FROM room_invites"))).all()
        assert sorted((bytes(k), bytes(r)) for k, r in rows) == sorted(
            (k, log.room_id) for k in keys
        )
    finally:
        await engine.dispose()


async def test_openapi_documents_the_lookup(relay: RelayServer) -> None:
    async with httpx.AsyncClient(base_url=relay.admin_url) as operator:
        paths = (await operator.get("/openapi.json")).json()["paths"]
    assert "/v1/invites/{invite}/log" in paths
