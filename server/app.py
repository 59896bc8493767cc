"""The relay application: ``create_app(settings)`` builds a FastAPI app.

Nothing is read or opened at import time. The lifespan opens the database,
checks its schema revision (see :mod:`.migrate`: an empty database is
initialised, one behind the code is refused unless ``auto_migrate``), starts
the group-commit batcher, the fan-out (Redis, when configured, and the
catch-up tick) and the retention task, and stops them again. Errors are
answered in one place: a :class:`RelayError` becomes ``{"error": {"code",
"detail"}}`` with its status; request validation failures are ``400
malformed``; a database that cannot be reached is ``503 storage_unavailable``;
anything else unexpected is a ``500 internal`` (counted in
``app.state.internal_errors``, which the tests require to stay 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from . import admin
from .config import Settings
from .errors import RelayError
from .handlers import retention
from .handlers.fanout import Fanout
from .handlers.hub import Hub
from .logging import get_logger
from .metrics import Metrics
from .migrate import SchemaNotCurrent, ensure_schema
from .ratelimit import Limits
from .rest import routes
from .rest.budgets import ConnectionLimiter, CpuBuckets, KeyBuckets
from .rest.endpoint import reap, websocket_endpoint
from .storage import Quotas, Store, make_engine, storage_unavailable, unavailable

log = get_logger("backchannel.relay")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "detail": detail}}, status_code=status)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) before a handler reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _error(413, "body_too_large", f"bodies are limited to {self.limit} bytes")(
                    scope, receive, send
                )
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _error(413, "body_too_large", f"bodies are limited to {self.limit} bytes")(
                    scope, receive, send
                )


class RelayApp(FastAPI):
    """FastAPI, with ``/v1/ws`` answered before its middleware and router.

    A WebSocket connection lives for hours and thousands are open at once; the
    routing machinery's frames (exit stacks, exception and body-limit wrappers,
    the router's) would stay alive under each one for nothing: none of them acts
    on a WebSocket, and the endpoint handles its own errors. Measured with
    tracemalloc, that is several KiB per idle connection (issue 14). Any other
    path, and a root path, goes through FastAPI as usual."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, root = scope.get("path"), scope.get("root_path")
        if scope["type"] == "websocket" and path == "/v1/ws" and not root:
            scope["app"] = self
            await websocket_endpoint(WebSocket(scope, receive, send))
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    on_started: Callable[[], None] | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(
            settings.resolved_database_url(), busy_timeout=settings.sqlite_busy_timeout_ms / 1000
        )
        try:
            await ensure_schema(engine, auto_migrate=settings.auto_migrate)
        except SchemaNotCurrent as exc:
            log.error("relay.schema_not_current", status=exc.state.status)
            await engine.dispose()
            raise
        except BaseException:
            await engine.dispose()
            raise
        store = Store(
            engine,
            batch_window=settings.batch_window_ms / 1000,
            batch_max=settings.batch_max,
            clock=clock,
            on_commit=metrics.observe_batch,
            write_queue_depth=settings.write_queue_depth,
            quotas=Quotas(
                max_room_bytes=settings.max_room_bytes,
                max_mailbox_per_sender=settings.max_mailbox_per_sender,
                state_cache_entries=settings.room_state_cache_entries,
            ),
        )
        await store.start()
        app.state.store = store
        fanout = Fanout(
            app.state.hub,
            store,
            metrics,
            redis_url=settings.redis_url,
            channel=settings.redis_channel,
            catch_up_interval=settings.catch_up_interval_seconds,
        )
        await fanout.start()
        app.state.fanout = fanout
        purger = asyncio.create_task(
            retention.purge_loop(store, settings.purge_interval_seconds), name="retention"
        )
        reaper = asyncio.create_task(reap(app.state), name="reaper")
        log.info("relay.started")
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            for task in (purger, reaper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await fanout.stop()
            await store.close()
            log.info("relay.stopped")

    metrics = Metrics()
    # The schema, its pages and /metrics are the operator listener's (see .admin) unless
    # the operator asks for them here; app.openapi() builds the schema either way.
    on_public = settings.admin_on_public
    app = RelayApp(
        title="backchannel relay",
        version="1",
        description="Stores and forwards ciphertext for backchannel rooms. See docs/relay-api.md.",
        lifespan=lifespan,
        openapi_url="/openapi.json" if on_public else None,
        docs_url="/docs" if on_public else None,
        redoc_url="/redoc" if on_public else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.hub = Hub()
    app.state.limiter = ConnectionLimiter(
        settings.max_connections,
        settings.max_connections_per_address,
        settings.max_unsettled_connections,
        settings.max_unsettled_per_address,
    )
    app.state.connections = set()
    app.state.unsettled = {}
    app.state.key_buckets = KeyBuckets(settings.key_messages_per_second, settings.key_burst)
    app.state.cpu_buckets = CpuBuckets(settings.stranger_cpu_share)
    if not hasattr(app.state, "limits"):
        app.state.limits = Limits()
    routes.define_limits(app.state.limits, settings)
    app.state.internal_errors = 0
    app.include_router(routes.router)
    app.include_router(routes.health)
    if on_public:
        app.include_router(admin.router)
    app.add_api_websocket_route("/v1/ws", websocket_endpoint)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(RelayError)
    async def relay_error(_request: Request, exc: RelayError) -> JSONResponse:
        metrics.error(exc.code)
        return _error(exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors())
        return _error(400, "malformed", f"invalid request: {where}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "bad_request")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        if unavailable(exc):
            return await relay_error(request, storage_unavailable())
        metrics.error("internal")
        app.state.internal_errors += 1
        log.error("http.internal_error", error=type(exc).__name__)
        return _error(500, "internal", "internal error")

    return app
