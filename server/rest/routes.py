"""REST routes: parse and authenticate here, decide in the store, answer in JSON.

Ids travel hex-encoded in paths, binary blobs as unpadded base64url in bodies.
Every error is ``{"error": {"code": ..., "detail": ...}}`` with a 4xx status
(see :mod:`backchannel.server.app` for the handlers). Documented in
docs/relay-api.md and the OpenAPI schema at ``/openapi.json``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from backchannel.protocol import errors as perr
from backchannel.protocol import roomlog
from backchannel.protocol.keys import PreKeyUpload

from ..config import Settings
from ..errors import RelayError, from_protocol
from ..frames import MAX_POSITION
from ..handlers.fanout import Fanout
from ..logging import get_logger
from ..metrics import CONTENT_TYPE_LATEST
from ..migrate import schema_state
from ..storage import Store
from .auth import b64d, b64e, verify_request

log = get_logger("backchannel.relay.api")

SignedKey = Annotated[bytes, Depends(verify_request)]


def get_store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_fanout(request: Request) -> Fanout:
    return request.app.state.fanout  # type: ignore[no-any-return]


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
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
    }


@router.post("/rooms", status_code=201, response_model=RoomCreated)
async def create_room(body: CreateRoom, store: StoreDep, settings: SettingsDep) -> Any:
    """Create a room from its signed `create` event; the room id is that event's hash."""
    data = b64d(body.event, "event")
    appended = await store.create_room(
        data,
        limits=log_limits(settings),
        token=body.token,
        need_token=settings.creation_policy == "token",
        skew=settings.clock_skew_seconds,
    )
    if appended.fresh:
        log.info("room.created")
    answer = {"room_id": appended.head.hex(), "pos": 0, "head": appended.head.hex()}
    return JSONResponse(answer, status_code=201 if appended.fresh else 200)


@router.post("/rooms/{room_id}/events", status_code=201, response_model=EventAppended)
async def append_event(
    room_id: str, body: AppendEvent, store: StoreDep, settings: SettingsDep, fanout: FanoutDep
) -> Any:
    """Append one signed log event, validated against the room's current state.

    201 for a new event; 200 with the same answer for an exact duplicate (a retry).
    """
    room = parse_id(room_id, "room id")
    appended = await store.append_event(
        room,
        b64d(body.event, "event"),
        limits=log_limits(settings),
        skew=settings.clock_skew_seconds,
    )
    if appended.fresh:
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


@router.get("/rooms/{room_id}/preview", response_model=Events)
async def preview(room_id: str, key: SignedKey, store: StoreDep) -> Any:
    """The whole log, for the holder of a valid invite key (signs the request with it)."""
    room = parse_id(room_id, "room id")
    try:
        state = await store.room_state(room)
    except RelayError:
        raise RelayError("invalid_invite", 403, "no valid invite with this key") from None
    invite = state.invites.get(key)
    if (
        invite is None
        or invite.uses_left <= 0
        or int(store.clock()) > invite.expires
        or state.role_of(invite.creator) != "facilitator"
    ):
        raise RelayError("invalid_invite", 403, "no valid invite with this key")
    events, length = await store.read_events(room, -1, state.length)
    return {"events": [b64e(e) for e in events], "length": length}


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
async def claim_prekeys(member: str, key: SignedKey, store: StoreDep) -> Any:
    """A prekey bundle for ``member``, consuming one one-time KEM and X25519 prekey.
    Signed by a member key that shares a room with ``member``."""
    bundle = await store.claim_prekeys(parse_id(member, "member key"), key)
    return {"bundle": b64e(bundle)}


health = APIRouter()


@health.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(store: StoreDep, fanout: FanoutDep) -> Any:
    """Ready when the database answers at this code's schema revision and, with
    Redis configured, fan-out is connected. ``checks`` names what is not."""
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
    if fanout.enabled and not fanout.available:
        checks["fanout"] = "down"
    down = [name for name, value in checks.items() if value not in ("ok", "off")]
    if not down:
        return {"status": "ok", "checks": checks}
    detail = "not ready: " + ", ".join(f"{name} {checks[name]}" for name in down)
    return JSONResponse(
        {"error": {"code": "not_ready", "detail": detail}, "checks": checks}, status_code=503
    )


@health.get("/metrics", response_class=Response)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus text format: counts and timings only."""
    if not settings.metrics_enabled:
        raise RelayError("not_found", 404, "metrics are disabled")
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
