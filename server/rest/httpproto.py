"""The HTTP/1.1 protocol the relay runs under uvicorn: uvicorn's h11 one, with a deadline for
the request head and a ceiling on open connections.

h11 rather than httptools (uvicorn's choice when both are installed): h11 bounds what it
buffers of an unfinished request line and header block (uvicorn's
``h11_max_incomplete_event_size``) and answers 400 past it. httptools has no such bound: a
64 MiB header was buffered whole, its fragments joined by repeated copies that held the
event loop for 9 s, and then answered 200. Only the request head goes through this parser;
WebSocket frames are the WebSocket protocol's. h11 checks its bound only while a head is
incomplete, so a head that arrives whole in one read (up to 256 KiB) would pass; the
connection below measures every parsed head against the same bound.

A subclass, for two things uvicorn does not do. It arms no timer on a connection until a
response has been sent, so one that sends part of a request (slowloris) holds its file
descriptor for ever: here the head must be complete within ``header_timeout`` of the
connection opening or of its previous response. And ``limit_concurrency`` answers 503 to
requests over the limit but still accepts every connection, which leaves descriptors
unbounded: here a connection past ``max_connections`` is closed as soon as it arrives.
Both counts include WebSocket connections, which sit in the same ``server_state``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _BoundedConnection(h11.Connection):
    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + 12
            size += sum(len(name) + len(value) + 4 for name, value in event.headers)
            if size > self.max_head:
                # uvicorn answers this as it answers h11's own refusal: 400, then close.
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


QUIET_LOGGER = logging.getLogger("uvicorn.error.http")
QUIET_LOGGER.setLevel(logging.ERROR)


class BoundedH11Protocol(H11Protocol):
    header_timeout = 10.0
    max_connections = 11_024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self.conn = _BoundedConnection(self.config.h11_max_incomplete_event_size or 16384)
        # uvicorn warns once per malformed, oversized or over-the-limit request: a
        # stranger could write the log for us. Errors (a failing application) still show.
        self.logger = QUIET_LOGGER

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.close()
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        # A whole head was parsed (the request now has a body to send, or is done, or
        # was handed to the WebSocket protocol): the deadline is met.
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        # h11 cannot answer 408 before it has a request to answer; a close is the reply.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def bounded_http_protocol(header_timeout: float, max_connections: int) -> type[BoundedH11Protocol]:
    """The protocol class for uvicorn's ``http=`` setting, with this relay's bounds."""
    return type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
