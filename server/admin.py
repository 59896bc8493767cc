"""The operator listener: ``/metrics`` and the API documentation, off the public port.

The metrics hold no ids, but their counts and timings describe the relay's traffic to
whoever reads them, and the documentation pages load scripts from a CDN into an
operator's browser; neither is for strangers. ``backchannel-relay serve`` runs this app
on ``admin_host:admin_port`` (loopback by default) beside the public one, on the same
event loop, reading the public app's metrics and describing its routes. With
``admin_on_public`` the same routes are on the public app instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .metrics import CONTENT_TYPE_LATEST

#: The routes either listener may carry.
router = APIRouter()


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: counts and timings only."""
    if not request.app.state.settings.metrics_enabled:
        return JSONResponse(
            {"error": {"code": "not_found", "detail": "metrics are disabled"}}, status_code=404
        )
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_admin_app(public: FastAPI) -> FastAPI:
    """The operator listener's app for the relay app ``public`` (built by ``create_app``)."""
    admin = FastAPI(
        title=f"{public.title} (operator)", openapi_url=None, docs_url=None, redoc_url=None
    )
    admin.state.settings = public.state.settings
    admin.state.metrics = public.state.metrics
    admin.include_router(router)

    @admin.get("/openapi.json", include_in_schema=False)
    async def openapi() -> Any:
        return JSONResponse(public.openapi())

    @admin.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{public.title} - docs")

    @admin.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{public.title} - ReDoc")

    return admin
