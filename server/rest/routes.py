"""REST routes: parse and authenticate here, decide in the store, answer in JSON.

Ids travel hex-encoded in paths, binary blobs as unpadded base64url in bodies.
Every error is ``{"error": {"code": ..., "detail": ...}}`` with a 4xx status
(see :mod:`backchannel.server.app` for the handlers). Documented in
docs/relay-api.md and the OpenAPI schema at ``/openapi.json`` (on the operator listener,
see :mod:`backchannel.server.admin`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from backchannel.protocol import errors as perr
from backchannel.protocol import roomlog
from backchannel.protocol.keys import PreKeyUpload

from ..config import Settings
from ..errors import RelayError, from_protocol
from ..frames import MAX_POSITION
from ..handlers.fanout import Fanout
from ..logging import get_logger
from ..migrate import schema_state
from ..ratelimit import Limits as RateLimits
from ..storage import STORAGE_UNAVAILABLE, Store
from .auth import b64d, b64e, verify_request

log = get_logger("backchannel.relay.api")

SignedKey = Annotated[bytes, Depends(verify_request)]


def get_store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_fanout(request: Request) -> Fanout:
    return request.app.state.fanout  # type: ignore[no-any-return]


def get_limits(request: Request) -> RateLimits:
    return request.app.state.limits  # type: ignore[no-any-return]


def define_limits(limits: RateLimits, settings: Settings) -> None:
    """The keyed budgets the routes below spend (see the settings of the same names)."""
    limits.define("rooms_per_address", settings.rooms_per_address)
    limits.define("log_appends", settings.rate_log_appends)
    limits.define("prekey_claims", settings.rate_prekey_claims)
    limits.define("prekey_claims_per_target", settings.rate_prekey_claims_per_target)


def rate_limited(detail: str) -> RelayError:
    return RelayError("rate_limited", 429, detail)


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LimitsDep = Annotated[RateLimits, Depends(get_limits)]
FanoutDep = Annotated[Fanout, Depends(get_fanout)]


def log_limits(settings: Settings) -> roomlog.LogLimits:
    """The relay's log limits: its own settings, never above the protocol's defaults
    (a client rejects a log beyond those, so storing one would strand the room)."""
    d = roomlog.DEFAULT_LIMITS
    return roomlog.LogLimits(
        max_length=min(settings.max_log_events, d.max_length),
        max_members=d.max_members,
        max_uses=d.max_uses,
        max_event_size=min(settings.max_event_bytes, d.max_event_size),
    )


def parse_id(text: str, what: str = "id") -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 32:
        raise RelayError("malformed", 400, f"{what} must be 64 hex digits")
    return value


# --- schemas -------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRoom(_Body):
    event: str = Field(description="base64url of the encoded `create` event")
    token: str | None = Field(None, description="room-creation token, if the relay needs one")


class AppendEvent(_Body):
    event: str = Field(description="base64url of the encoded event")


class UploadPrekeys(_Body):
    upload: str = Field(description="base64url of an encoded PreKeyUpload")


class RoomCreated(BaseModel):
    room_id: str
    pos: int
    head: str


class EventAppended(BaseModel):
    pos: int
    head: str


class Events(BaseModel):
    events: list[str]
    length: int


class InviteLog(Events):
    room_id: str


class PrekeysStored(BaseModel):
    stored: int
    counts: dict[str, int]


class Bundle(BaseModel):
    bundle: str


class Limits(BaseModel):
    """What a client needs to know to send only what this relay accepts."""

    max_message_bytes: int = Field(description="largest `data` of a `send` or `psend`")
    max_frame_bytes: int = Field(description="largest WebSocket frame")
    max_event_bytes: int = Field(description="largest room log event")
    max_mailbox_depth: int = Field(description="most unacknowledged pairwise items per key")
    max_inflight_writes: int = Field(
        description="most sends one connection may have waiting for their `sent` (past it: busy)"
    )
    send_rate_per_second: float = Field(
        description="sustained sends one connection (and one member key) may make"
    )
    send_burst: int = Field(description="sends allowed at once above that rate")


class ErrorBody(BaseModel):
    code: str
    detail: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 429)
}

router = APIRouter(prefix="/v1", responses=ERRORS)


@router.get("/limits", response_model=Limits)
async def limits(settings: SettingsDep) -> Any:
    """The relay's size limits, so a client can refuse what would be refused before
    sealing it. Public: they are no secret, and asking needs no key."""
    return {
        "max_message_bytes": settings.max_message_bytes,
        "max_frame_bytes": settings.max_frame_bytes,
        "max_event_bytes": log_limits(settings).max_event_size,
        "max_mailbox_depth": settings.max_mailbox_depth,
        "max_inflight_writes": settings.max_inflight_writes,
        # The stricter of the per-connection and per-key limits: what one member's
        # client can keep to, so a script is paced rather than refused.
        "send_rate_per_second": min(
            settings.rate_messages_per_second, settings.key_messages_per_second
        ),
        "send_burst": min(settings.rate_burst, settings.key_burst),
    }


@router.post("/rooms", status_code=201, response_model=RoomCreated)
async def create_room(
    body: CreateRoom, request: Request, store: StoreDep, settings: SettingsDep, limits: LimitsDep
) -> Any:
    """Create a room from its signed `create` event; the room id is that event's hash.

    Under the open policy each client address may create ``rooms_per_address``
    rooms per window (429 ``rate_limited``); only rooms actually created count."""
    data = b64d(body.event, "event")
    address = request.client.host if request.client else ""
    open_policy = settings.creation_policy == "open"
    if open_policy and not limits.test("rooms_per_address", address):
        raise rate_limited("this address has created too many rooms; try again later")
    appended = await store.create_room(
        data,
        limits=log_limits(settings),
        token=body.token,
        need_token=settings.creation_policy == "token",
        skew=settings.clock_skew_seconds,
    )
    if appended.fresh:
        if open_policy:
            limits.hit("rooms_per_address", address)
        log.info("room.created")
    answer = {"room_id": appended.head.hex(), "pos": 0, "head": appended.head.hex()}
    return JSONResponse(answer, status_code=201 if appended.fresh else 200)


@router.post("/rooms/{room_id}/events", status_code=201, response_model=EventAppended)
async def append_event(
    room_id: str,
    body: AppendEvent,
    store: StoreDep,
    settings: SettingsDep,
    fanout: FanoutDep,
    limits: LimitsDep,
) -> Any:
    """Append one signed log event, validated against the room's current state.

    201 for a new event; 200 with the same answer for an exact duplicate (a retry).
    Each room accepts ``rate_log_appends`` new events per window (429
    ``rate_limited``); events refused for any other reason do not count, so no
    one but the room's members can spend its budget.
    """
    room = parse_id(room_id, "room id")
    if not limits.test("log_appends", room):
        raise rate_limited("this room's log is growing too fast; try again later")
    appended = await store.append_event(
        room,
        b64d(body.event, "event"),
        limits=log_limits(settings),
        skew=settings.clock_skew_seconds,
    )
    if appended.fresh:
        limits.hit("log_appends", room)
        fanout.event(room, appended)
    if appended.fresh:
        log.info("log.appended", kind=appended.event.KIND, pos=appended.pos)
    answer = {"pos": appended.pos, "head": appended.head.hex()}
    return JSONResponse(answer, status_code=201 if appended.fresh else 200)


@router.get("/rooms/{room_id}/events", response_model=Events)
async def read_events(
    room_id: str,
    key: SignedKey,
    store: StoreDep,
    after: Annotated[
        int, Query(ge=-1, le=MAX_POSITION, description="return events with pos > after")
    ] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Any:
    """The log after a position. Signed by a current member key, or by a departed
    member's key (which reads up to and including the event that ended it)."""
    room = parse_id(room_id, "room id")
    member = await store.membership(room, key)
    if member is None:
        raise RelayError("not_authorized", 403, "the key is not a member of this room")
    events, length = await store.read_events(room, after, limit, member.left_pos)
    return {"events": [b64e(e) for e in events], "length": length}


async def _invite_state(store: Store, room: bytes, key: bytes) -> roomlog.RoomState:
    """The room's state if ``key`` is one of its invites that can still admit someone;
    one answer for every other case, so it tells a stranger nothing about the room."""
    refused = RelayError("invalid_invite", 403, "no valid invite with this key")
    try:
        state = await store.room_state(room)
    except RelayError as exc:
        if exc.code == STORAGE_UNAVAILABLE:
            raise
        raise refused from None
    invite = state.invites.get(key)
    if (
        invite is None
        or invite.uses_left <= 0
        or int(store.clock()) > invite.expires
        or state.role_of(invite.creator) != "facilitator"
    ):
        raise refused
    return state


@router.get("/rooms/{room_id}/preview", response_model=Events)
async def preview(room_id: str, key: SignedKey, store: StoreDep) -> Any:
    """The whole log, for the holder of a valid invite key (signs the request with it)."""
    room = parse_id(room_id, "room id")
    state = await _invite_state(store, room, key)
    events, length = await store.read_events(room, -1, state.length)
    return {"events": [b64e(e) for e in events], "length": length}


@router.get("/invites/{invite}/log", response_model=InviteLog)
async def invite_log(invite: str, key: SignedKey, store: StoreDep) -> Any:
    """The room that published ``invite`` and its whole log, for a short invite code
    (which names no room). Signed by that invite key; an unknown key costs one
    lookup and gets the same 403 as an expired one, so no one can list rooms."""
    wanted = parse_id(invite, "invite key")
    room = await store.invite_room(key) if wanted == key else None
    if room is None:
        raise RelayError("invalid_invite", 403, "no valid invite with this key")
    state = await _invite_state(store, room, key)
    events, length = await store.read_events(room, -1, state.length)
    return {"room_id": room.hex(), "events": [b64e(e) for e in events], "length": length}


@router.put("/prekeys", response_model=PrekeysStored)
async def upload_prekeys(body: UploadPrekeys, store: StoreDep, settings: SettingsDep) -> Any:
    """Store signed prekeys of a current member key (one-time ones must have new ids)."""
    try:
        upload = PreKeyUpload.from_bytes(b64d(body.upload, "upload"))
        upload.verify()
    except perr.ProtocolError as exc:
        raise from_protocol(exc) from exc
    stored, counts = await store.upload_prekeys(upload, settings.max_prekeys_per_member)
    return {"stored": stored, "counts": counts}


@router.post("/prekeys/{member}/claim", response_model=Bundle)
async def claim_prekeys(member: str, key: SignedKey, store: StoreDep, limits: LimitsDep) -> Any:
    """A prekey bundle for ``member``, consuming one one-time KEM and X25519 prekey.
    Signed by a member key that shares a room with ``member``. A claimer may make
    ``rate_prekey_claims`` claims per window, ``rate_prekey_claims_per_target`` of
    them for one member (429 ``rate_limited``), so no co-member can use up
    another's one-time prekeys."""
    target = parse_id(member, "member key")
    if not limits.hit("prekey_claims_per_target", key, target) or not limits.hit(
        "prekey_claims", key
    ):
        raise rate_limited("too many prekey claims; try again later")
    bundle = await store.claim_prekeys(target, key)
    return {"bundle": b64e(bundle)}


health = APIRouter()


@health.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(store: StoreDep, fanout: FanoutDep) -> Any:
    """Ready when the database answers at this code's schema revision, writes to it
    succeed, and, with Redis configured, fan-out is connected. ``checks`` names what
    is not (``database``: ``down`` or ``writes_failing``)."""
    checks = {"database": "ok", "schema": "ok", "fanout": "ok" if fanout.enabled else "off"}
    if not await store.ping():
        checks["database"] = "down"
        checks["schema"] = "unknown"
    else:
        try:
            state = await schema_state(store.engine)
            if state.status != "current":
                checks["schema"] = state.status
        except Exception:
            checks["database"] = "down"
            checks["schema"] = "unknown"
    if checks["database"] == "ok" and store.health.failing:
        # Reads may work while writes do not (a locked or full database): ready again
        # only once a write succeeds, the next real one or this probe.
        if store.health.probe_due():
            await store.probe_write()
        if store.health.failing:
            checks["database"] = "writes_failing"
    if fanout.enabled and not fanout.available:
        checks["fanout"] = "down"
    down = [name for name, value in checks.items() if value not in ("ok", "off")]
    if not down:
        return {"status": "ok", "checks": checks}
    detail = "not ready: " + ", ".join(f"{name} {checks[name]}" for name in down)
    return JSONResponse(
        {"error": {"code": "not_ready", "detail": detail}, "checks": checks}, status_code=503
    )
