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

from .config import Settings
from .errors import RelayError
from .handlers import retention
from .handlers.fanout import Fanout
from .handlers.hub import Hub
from .logging import get_logger
from .metrics import Metrics
from .migrate import SchemaNotCurrent, ensure_schema
from .rest import routes
from .rest.ws import ConnectionLimiter, websocket_endpoint
from .storage import Store, make_engine, storage_unavailable, unavailable

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


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    on_started: Callable[[], None] | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.resolved_database_url())
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
        log.info("relay.started")
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            await fanout.stop()
            await store.close()
            log.info("relay.stopped")

    metrics = Metrics()
    app = FastAPI(
        title="backchannel relay",
        version="1",
        description="Stores and forwards ciphertext for backchannel rooms. See docs/relay-api.md.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.hub = Hub()
    app.state.limiter = ConnectionLimiter(
        settings.max_connections, settings.max_connections_per_address
    )
    app.state.internal_errors = 0
    app.include_router(routes.router)
    app.include_router(routes.health)
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
