"""The WebSocket protocol the relay runs under uvicorn: uvicorn's own, with fragments bounded.

The ``websockets`` parser bounds a message's payload bytes across fragments
(``ws_max_size``), but uvicorn keeps every fragment as its own ``bytes`` in a
list until the last one: empty or one-byte continuation frames add nothing to
the payload count and about 40 bytes of memory each, so a stranger could hold
tens of MiB per connection just under the size limit. Here every fragment
counts from the first, a message may have at most ``max_fragments`` of them,
and an empty continuation is refused (no client of ours sends one).

When the application is done with a connection whose peer stopped reading,
the socket is aborted rather than closed: asyncio's ``close`` waits for the
write buffer to drain, which for such a peer is never.

The relay's writer may also hand binary messages to the protocol directly
(:meth:`BoundedWebSocketProtocol.write_messages`, offered to the application
as the scope extension ``WIRE``): many frames in one socket write, no ASGI
message per frame. Everything else (accept, close, errors) still goes through
ASGI. bench/ measured the ASGI path at about a third of the relay's time per
delivered frame.

Thousands of these connections sit idle for hours, so what each keeps is cut
to what it uses (issue 14, measured with tracemalloc): the ASGI receive queue
is a deque with one waiter rather than an ``asyncio.Queue``, and once the
handshake is answered the request's headers (in the request and in the
scope) and the response are let go (nothing reads them again).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame

#: How long a refused peer's frames are read and discarded before its socket closes.
LINGER_SECONDS = 1.0
#: The ASGI scope extension under which the protocol offers ``write_messages``.
WIRE = "backchannel.wire"
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class _Inbox:
    """What uvicorn's protocol uses of an ``asyncio.Queue`` (unbounded, one reader)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    max_fragments = 64
    #: Whether the application may write around ASGI (see bounded_protocol).
    offer_wire = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fragments = 0
        self.queue = _Inbox()  # type: ignore[assignment]

    def _refuse(self, code: int, reason: str) -> None:
        self.frames = []
        # Close frame out, the rest of what the peer sends discarded, the socket
        # closed a moment later: closing it at once, with the peer's frames still
        # unread, would reset the connection and lose the close frame that says why.
        self.conn.fail(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.close_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def handle_text(self, event: Frame) -> None:
        self._fragments = 1
        super().handle_text(event)

    def handle_bytes(self, event: Frame) -> None:
        self._fragments = 1
        super().handle_bytes(event)

    def handle_cont(self, event: Frame) -> None:
        if self.close_sent:
            return
        if not event.data:
            self._refuse(CLOSE_POLICY, "empty continuation frame")
            return
        self._fragments += 1
        if self._fragments > self.max_fragments:
            self._refuse(CLOSE_TOO_BIG, "too many fragments")
            return
        super().handle_cont(event)

    def write_messages(self, messages: list[bytes]) -> bool:
        """Write binary ``messages`` in one socket write; ``False`` if the
        connection is closing or gone (nothing is then written)."""
        if self.disconnected or self.close_sent or self.transport.is_closing():
            return False
        for message in messages:
            self.conn.send_binary(message)
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # The request is emptied rather than only dropped: the websockets
            # parser's frame keeps it alive for as long as the connection lasts.
            if self.request is not None:
                self.request.headers.clear()
            self.request = self.response = None  # type: ignore[assignment]
            self.scope["headers"] = []

    async def run_asgi(self) -> None:
        if self.offer_wire:
            self.scope.setdefault("extensions", {})[WIRE] = self  # type: ignore[typeddict-unknown-key]
        await super().run_asgi()
        if not self.writable.is_set():
            # The application is done with a peer that stopped reading: a plain
            # close (even one already begun) waits, socket and buffer held, for
            # it to read again.
            self.transport.abort()


def bounded_protocol(max_fragments: int, wire: bool = False) -> type[BoundedWebSocketProtocol]:
    """The protocol class for uvicorn's ``ws=`` setting, with this relay's bound.

    ``wire``: offer :meth:`~BoundedWebSocketProtocol.write_messages` to the
    application. Only when uvicorn runs the relay's own app: a wrapper around it
    that watches or changes the ASGI messages (the malicious relay of the tests
    is one) would not see frames written around them."""
    return type(
        "BoundedWebSocketProtocol",
        (BoundedWebSocketProtocol,),
        {"max_fragments": max_fragments, "offer_wire": wire},
    )
