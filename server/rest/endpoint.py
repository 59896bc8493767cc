"""The ``/v1/ws`` endpoint: admission into the connection budgets, and the reaper.

A new connection needs a slot in the small budget for connections that hold
no member subscription yet (see :class:`.budgets.ConnectionLimiter`); when
strangers from many addresses have filled it, the oldest of them is closed to
make room. Once a second the reaper looks at every connection
(:meth:`.ws.Connection.check`): it drops readers that stopped reading and
connections that held no member subscription for the set-up window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from starlette.websockets import WebSocket

from .. import frames as F
from ..logging import get_logger
from ..metrics import Metrics
from .budgets import ConnectionLimiter
from .ws import CLOSE_TRY_LATER, Connection

log = get_logger("backchannel.relay.ws")


async def websocket_endpoint(ws: WebSocket) -> None:
    state = ws.app.state
    address = ws.client.host if ws.client else ""
    limiter: ConnectionLimiter = state.limiter
    metrics: Metrics = state.metrics
    unsettled: dict[Connection, None] = state.unsettled
    admitted = limiter.acquire(address)
    if not admitted and limiter.unsettled_full(address) and unsettled:
        # Strangers from many addresses fill the unsettled budget: the oldest
        # of them makes room. An honest member settles within a round trip or
        # two, so it outlasts a flood that must keep opening connections.
        oldest = next(iter(unsettled))
        del unsettled[oldest]
        oldest.evict()
        admitted = limiter.acquire(address, evicting=True)
    if not admitted:
        metrics.error("too_many_connections")
        await ws.accept()
        with contextlib.suppress(Exception):
            await ws.send_bytes(F.error_frame("too_many_connections", "try again later"))
            await ws.close(CLOSE_TRY_LATER)
        return
    metrics.connections.inc()
    conn: Connection | None = None
    connections: set[Connection] = state.connections
    try:
        await ws.accept()
        conn = Connection(
            ws,
            state.settings,
            state.store,
            state.hub,
            state.fanout,
            metrics,
            address=address,
            limiter=limiter,
            key_buckets=state.key_buckets,
            cpu_buckets=state.cpu_buckets,
        )
        connections.add(conn)
        unsettled[conn] = None
        conn.unsettled = unsettled
        await conn.run()
    except Exception as exc:
        state.internal_errors += 1
        log.error("ws.internal_error", error=type(exc).__name__)
        with contextlib.suppress(Exception):
            await ws.close(1011)
    finally:
        metrics.connections.dec()
        if conn is not None:
            connections.discard(conn)
            unsettled.pop(conn, None)
        limiter.release(address, settled=conn is not None and conn.settled)


async def reap(state: Any, interval: float = 1.0) -> None:
    """Once a second: drop connections whose socket stopped taking data, and those
    that held no member subscription for the set-up window; forget refilled
    per-key budgets."""
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        for conn in list(state.connections):
            conn.check(now)
        state.key_buckets.prune()
        state.cpu_buckets.prune({conn.address for conn in state.connections})
