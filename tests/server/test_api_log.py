"""REST: room creation, log appends (every rejection), log reads, invite preview."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import pytest

from backchannel.protocol import roomlog
from backchannel.protocol.keys import MemberKeyPair

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, b64d, b64e, now, signed_get, signed_headers


async def test_health(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await http.get("/readyz")).status_code == 200


async def test_openapi_documents_routes(relay: RelayServer) -> None:
    async with httpx.AsyncClient(base_url=relay.admin_url) as operator:
        paths = (await operator.get("/openapi.json")).json()["paths"]
    for path in (
        "/v1/rooms",
        "/v1/rooms/{room_id}/events",
        "/v1/rooms/{room_id}/preview",
        "/v1/prekeys",
        "/v1/prekeys/{member}/claim",
        "/v1/limits",
    ):
        assert path in paths


async def test_create_room_and_idempotent_retry(http: httpx.AsyncClient) -> None:
    fac = MemberKeyPair.generate()
    data = roomlog.make_create(fac, roomlog.Rules(), now())
    r = await http.post("/v1/rooms", json={"event": b64e(data)})
    assert r.status_code == 201
    body = r.json()
    assert body["pos"] == 0
    assert body["room_id"] == body["head"]
    again = await http.post("/v1/rooms", json={"event": b64e(data)})
    assert again.status_code == 200
    assert again.json() == body


async def test_create_rejects_garbage_and_non_create(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/rooms", json={"event": b64e(b"\xff\x00garbage")})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed"
    r = await http.post("/v1/rooms", json={"event": "not base64!"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed"
    r = await http.post("/v1/rooms", json={"evnt": "AA"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed"
    r = await http.post("/v1/rooms", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    room = await TestRoom.create(http)
    invite, _ = roomlog.make_invite(
        room.facilitator, room.state, "participant", now() + 60, 1, now()
    )
    r = await http.post("/v1/rooms", json={"event": b64e(invite)})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "chain_broken"


async def test_creation_token_policy(relay_factory: RelayFactory) -> None:
    relay = relay_factory(creation_policy="token")
    token = relay.call(relay.store.create_token())
    async with httpx.AsyncClient(base_url=relay.url) as http:
        data = roomlog.make_create(MemberKeyPair.generate(), roomlog.Rules(), now())
        r = await http.post("/v1/rooms", json={"event": b64e(data)})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "creation_token_required"
        r = await http.post("/v1/rooms", json={"event": b64e(data), "token": "bct_wrong"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "bad_creation_token"
        await TestRoom.create(http, token=token)
        # One use only, and a second use says so (not "bad token").
        data = roomlog.make_create(MemberKeyPair.generate(), roomlog.Rules(), now())
        r = await http.post("/v1/rooms", json={"event": b64e(data), "token": token})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "creation_token_used"


async def test_append_and_duplicate_is_idempotent(http: httpx.AsyncClient) -> None:
    room = await TestRoom.create(http)
    data, _ = roomlog.make_invite(room.facilitator, room.state, "participant", now() + 60, 1, now())
    first = await room.post(data)
    assert first.status_code == 201
    assert first.json()["pos"] == 1
    again = await http.post(f"/v1/rooms/{room.id.hex()}/events", json={"event": b64e(data)})
    assert again.status_code == 200
    assert again.json() == first.json()


def code(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, r.text
    return str(r.json()["error"]["code"])


async def test_append_rejections(http: httpx.AsyncClient) -> None:
    room = await TestRoom.create(http)
    member = await room.add_member()
    state = room.state

    # Bad signature: flip a byte of the signature.
    good, _ = roomlog.make_invite(room.facilitator, state, "participant", now() + 60, 1, now())
    event = roomlog.decode_event(good)
    forged = roomlog.encode_event(replace(event, sig=bytes(64)))
    r = await room.post(forged)
    assert r.status_code == 403
    assert code(r) == "bad_signature"

    # Wrong prev.
    event = roomlog.InviteEvent(
        pos=state.length,
        prev=bytes(32),
        ts=now(),
        author=room.facilitator.public.sign,
        invite=bytes(range(32)),
        role="participant",
        expires=now() + 60,
        uses=1,
    )
    wrong = roomlog.encode_event(
        replace(event, sig=room.facilitator.sign(roomlog.CTX_EVENT, roomlog.signed_bytes(event)))
    )
    r = await room.post(wrong)
    assert r.status_code == 409
    assert code(r) == "chain_broken"

    # Non-facilitator invite.
    data, _ = roomlog.make_invite(member, state, "participant", now() + 60, 1, now(), check=False)
    r = await room.post(data)
    assert r.status_code == 403
    assert code(r) == "not_authorized"

    # Unknown room.
    r = await http.post(f"/v1/rooms/{bytes(32).hex()}/events", json={"event": b64e(good)})
    assert r.status_code == 404
    assert code(r) == "unknown_room"
    r = await http.post("/v1/rooms/zz/events", json={"event": b64e(good)})
    assert code(r) == "malformed"

    # The room is unharmed by all of that.
    await room.append(good)


async def test_join_rules_expired_and_used_up(http: httpx.AsyncClient, relay: RelayServer) -> None:
    t0 = now()
    room = await TestRoom.create(http, ts=t0 - 200)
    # An invite that expired by the relay's clock, joined with a back-dated (but
    # still within the skew) timestamp: the protocol alone would accept it.
    seed = await room.invite(expires=t0 - 10, ts=t0 - 100)
    late = roomlog.make_join(MemberKeyPair.generate(), seed, room.state, t0 - 20)
    r = await room.post(late)
    assert r.status_code == 403
    assert code(r) == "invalid_invite"
    # A join timestamp far from the relay's clock.
    seed = await room.invite(expires=t0 + 10 * 3600)
    stale = roomlog.make_join(MemberKeyPair.generate(), seed, room.state, t0 + 3600)
    r = await room.post(stale)
    assert r.status_code == 400
    assert code(r) == "stale_event"
    # Used-up invite: one use, then a second joiner.
    await room.join(seed)
    again = roomlog.make_join(MemberKeyPair.generate(), seed, room.state, now(), check=False)
    r = await room.post(again)
    assert r.status_code == 403
    assert code(r) == "invalid_invite"


async def test_removed_member_cannot_act(http: httpx.AsyncClient) -> None:
    room = await TestRoom.create(http)
    fac2 = await room.add_member("facilitator")
    await room.remove(fac2)
    data, _ = roomlog.make_invite(
        fac2, room.state, "participant", now() + 60, 1, now(), check=False
    )
    r = await room.post(data)
    assert r.status_code == 403
    assert code(r) == "not_authorized"
    left = await room.add_member()
    await room.leave(left)
    r = await room.post(roomlog.make_leave(left, room.state, now(), check=False))
    assert r.status_code == 403
    assert code(r) == "not_authorized"


async def test_log_full(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_log_events=3)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        room = await TestRoom.create(http)
        other = await TestRoom.create(http)
        await room.invite()
        await room.invite()
        data, _ = roomlog.make_invite(
            room.facilitator, room.state, "participant", now() + 60, 1, now()
        )
        r = await room.post(data)
        assert r.status_code == 409
        assert code(r) == "log_full"
        await other.invite()  # other rooms are unaffected


async def test_concurrent_appends_one_winner(http: httpx.AsyncClient) -> None:
    room = await TestRoom.create(http)
    state = room.state
    candidates = [
        roomlog.make_invite(room.facilitator, state, "participant", now() + 60, 1, now())[0]
        for _ in range(8)
    ]
    path = f"/v1/rooms/{room.id.hex()}/events"
    answers = await asyncio.gather(*(http.post(path, json={"event": b64e(c)}) for c in candidates))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(201) == 1, [a.text for a in answers]
    assert all(s == 409 for s in statuses if s != 201)
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} <= {
        "chain_broken",
        "conflict",
    }
    winner = candidates[[a.status_code for a in answers].index(201)]
    room.log.append(winner)
    await room.invite()  # the log goes on from the winner


async def test_read_log_authorization(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    member = await room.add_member()
    await room.invite()
    path = f"/v1/rooms/{room.id.hex()}/events"
    r = await signed_get(http, relay, member, path)
    assert r.status_code == 200
    assert [b64d(e) for e in r.json()["events"]] == list(room.log.events)
    assert r.json()["length"] == len(room.log)
    r = await signed_get(http, relay, member, f"{path}?after=1&limit=1")
    assert [b64d(e) for e in r.json()["events"]] == [room.log.event(2)]

    stranger = MemberKeyPair.generate()
    r = await signed_get(http, relay, stranger, path)
    assert r.status_code == 403
    assert code(r) == "not_authorized"
    r = await http.get(path)
    assert r.status_code == 401
    assert code(r) == "unauthenticated"

    removal = await room.remove(member)
    await room.invite()
    r = await signed_get(http, relay, member, path)
    events = [b64d(e) for e in r.json()["events"]]
    assert len(events) == removal["pos"] + 1  # up to and including its removal
    assert events == list(room.log.events)[: removal["pos"] + 1]


async def test_signed_request_checks(http: httpx.AsyncClient, relay: RelayServer) -> None:
    room = await TestRoom.create(http)
    path = f"/v1/rooms/{room.id.hex()}/events"
    fac = room.facilitator
    headers = signed_headers(fac, relay.origin, "GET", path)
    assert (await http.get(path, headers=headers)).status_code == 200
    r = await http.get(path, headers=headers)
    assert r.status_code == 401
    assert code(r) == "replayed_request"
    r = await http.get(
        path, headers=signed_headers(fac, relay.origin, "GET", path, now=now() - 3600)
    )
    assert r.status_code == 401
    assert code(r) == "stale_request"
    r = await http.get(path, headers=signed_headers(fac, "http://evil.example", "GET", path))
    assert r.status_code == 401
    assert code(r) == "bad_signature"
    r = await http.get(path, headers=signed_headers(fac, relay.origin, "GET", path + "?after=0"))
    assert r.status_code == 401
    assert code(r) == "bad_signature"


async def test_invite_preview(http: httpx.AsyncClient, relay: RelayServer) -> None:
    t0 = now()
    room = await TestRoom.create(http, ts=t0 - 100)
    expired = await room.invite(expires=t0 - 1, ts=t0 - 50)
    seed = await room.invite(expires=t0 + 3600)
    path = f"/v1/rooms/{room.id.hex()}/preview"
    r = await signed_get(http, relay, seed, path)
    assert r.status_code == 200
    assert [b64d(e) for e in r.json()["events"]] == list(room.log.events)
    roomlog.validate_log([b64d(e) for e in r.json()["events"]])

    r = await signed_get(http, relay, expired, path)
    assert r.status_code == 403
    assert code(r) == "invalid_invite"
    r = await signed_get(http, relay, bytes(32), path)  # unknown invite key
    assert r.status_code == 403
    assert code(r) == "invalid_invite"
    r = await signed_get(http, relay, seed, f"/v1/rooms/{bytes(32).hex()}/preview")
    assert r.status_code == 403
    assert code(r) == "invalid_invite"
    await room.join(seed)  # one use: now used up
    r = await signed_get(http, relay, seed, path)
    assert r.status_code == 403
    assert code(r) == "invalid_invite"


async def test_body_too_large(relay_factory: RelayFactory) -> None:
    relay = relay_factory(max_body_bytes=4096)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        r = await http.post("/v1/rooms", json={"event": "A" * 10_000})
        assert r.status_code == 413
        assert code(r) == "body_too_large"


@pytest.mark.parametrize("path", ["/nope", "/v1/rooms/xyz"])
async def test_unknown_routes_are_json(http: httpx.AsyncClient, path: str) -> None:
    r = await http.get(path)
    assert r.status_code in (404, 405)
    assert "error" in r.json()


async def test_readyz_reports_database_trouble(http: httpx.AsyncClient, relay: RelayServer) -> None:
    store = relay.store

    async def down() -> bool:
        return False

    real = store.ping
    store.ping = down
    try:
        r = await http.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_ready"
    finally:
        store.ping = real


async def test_event_too_long(http: httpx.AsyncClient) -> None:
    room = await TestRoom.create(http)
    r = await http.post(
        f"/v1/rooms/{room.id.hex()}/events", json={"event": b64e(b"\xa1" + bytes(2000))}
    )
    assert r.status_code == 413
    assert code(r) == "too_long"
    await room.invite()


async def test_future_dated_events_are_refused(http: httpx.AsyncClient) -> None:
    """One far-future event would force every later event to carry that time and
    make every invite look expired (a denial of joins): the relay's clock bounds
    every event, not only joins."""
    far = now() + 10 * 365 * 86_400
    facilitator = MemberKeyPair.generate()
    create = roomlog.make_create(facilitator, roomlog.Rules(), far)
    r = await http.post("/v1/rooms", json={"event": b64e(create)})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "stale_event"

    room = await TestRoom.create(http)
    member = await room.add_member()
    length = room.state.length
    leave = roomlog.make_leave(member, room.state, far)
    r = await room.post(leave)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "stale_event"
    # Nothing was stored, and the room still admits people.
    assert room.state.length == length
    await room.add_member()
