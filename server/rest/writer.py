"""The writer half of a WebSocket connection: everything sent to the client goes here.

Delivery order is decided here: a subscription keeps ``next_seq`` and the
writer delivers a live message only if it is the next one, fetches the missing
range from the database if it is ahead, and drops it if it is behind. So a
client sees each room's messages gap-free and in order, whatever order
notifications arrive in. Catch-up reads are bounded in bytes as well as in
messages, since a page waits in memory for a reader that may be slow.

The live path is kept short. A message's frame is encoded once for all its
subscribers (:class:`~..handlers.hub.Notify`). When a connection's writer is
idle, a next-in-order message is written to its socket there and then, by the
code that published it, with no task woken per subscriber (:meth:`Writer.offer_now`).
Otherwise it waits in the outbox, and a writer task (started then, gone once
the outbox is empty) takes everything waiting at once and writes the frames
that need no database in one socket write.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import frames as F
from ..handlers.hub import (
    CatchUp,
    Frame,
    Mail,
    MailCheck,
    MailSync,
    Notify,
    OutItem,
    Subscription,
    Wake,
)
from ..storage import STORAGE_UNAVAILABLE, unavailable

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from ..config import Settings
    from ..handlers.hub import Hub
    from ..metrics import Metrics
    from ..storage import MailItem, Store, StoredMessage
    from .wsproto import BoundedWebSocketProtocol

CLOSE_TRY_LATER = 1013
#: Most outbox items, and bytes, the writer takes for one socket write.
WRITE_BATCH = 256
WRITE_BATCH_BYTES = 256 * 1024


def item_size(item: OutItem) -> int:
    """Bytes an outbox item keeps alive until the writer takes it."""
    if isinstance(item, Frame):
        return len(item.data)
    if isinstance(item, Notify):
        return len(item.msg.data)
    if isinstance(item, Mail):
        return len(item.item.data)
    return 0


class Writer:
    """Drains a connection's bounded outbox onto its socket (mixed into ``Connection``)."""

    __slots__ = (
        "closing",
        "delivered",
        "hub",
        "keys",
        "metrics",
        "outbox",
        "pending",
        "settings",
        "space",
        "store",
        "subs",
        "wire",
        "write_started",
        "writer",
        "ws",
    )

    ws: WebSocket
    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics
    outbox: deque[OutItem] | None
    #: Draining the outbox; ``None`` when nothing is queued or being written.
    writer: asyncio.Task[None] | None
    keys: set[bytes]
    subs: dict[bytes, Subscription]
    delivered: dict[bytes, set[int]]
    closing: bool
    write_started: float | None
    #: The protocol under this connection, written to directly (see wsproto.WIRE).
    wire: BoundedWebSocketProtocol | None
    #: Bytes in the outbox, not yet taken by the socket.
    pending: int
    #: Set when the outbox has room again, for a reply waiting in ``put`` (made only then).
    space: asyncio.Event | None

    def _queue(self, item: OutItem, size: int) -> None:
        if self.outbox is None:
            self.outbox = deque()
        self.outbox.append(item)
        self.pending += size
        if self.writer is None:
            self.writer = asyncio.create_task(self._write_loop())

    def _has_room(self, reserved: int = 0) -> bool:
        return (
            self.pending + reserved <= self.settings.max_pending_bytes // 2
            and len(self.outbox or ()) < self.settings.send_queue_depth
        )

    def _taken(self, item: OutItem) -> None:
        self.pending -= item_size(item)
        if self.space is not None and self._has_room():
            self.space.set()

    async def put(self, item: OutItem) -> None:
        """Queue a reply to this connection's own request. It waits when the
        outbox is full (in items or bytes): a client that does not read its
        answers slows only itself, and stops being read (``offer`` is for what
        other connections cause)."""
        # Not counting the replies owed: this may be one of them (a pairwise send's
        # task), and waiting for itself would never end.
        await self.room_for_reply(owed=False)
        if self.closing:
            return
        if isinstance(item, Frame) and self.write_now(item.data):
            return
        self._queue(item, item_size(item))

    def promised(self) -> int:
        """Bytes of replies owed to requests in flight (see ``room_for_reply``)."""
        return 0

    async def room_for_reply(self, owed: bool = True) -> None:
        """Wait until the outbox has room, beyond the replies still owed if ``owed``
        (or until the connection is closing)."""
        while not self.closing and not self._has_room(self.promised() if owed else 0):
            if self.space is None:
                self.space = asyncio.Event()
            self.space.clear()
            await self.space.wait()

    def reply(self, data: bytes) -> None:
        """Write or queue a reply from code that cannot wait (a commit's callback).
        Its request was taken only once there was room for it and for every reply
        still owed (``room_for_reply``), so this keeps within the bound."""
        if not self.closing and not self.write_now(data):
            self._queue(Frame(data), len(data))
        if self.space is not None:
            self.space.set()  # a reservation is now spent: let a waiter count again

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    async def _abort(self, code: str, detail: str, close_code: int = 1008) -> None:
        raise NotImplementedError

    async def _out(self, data: bytes) -> None:
        # Timed by the reaper rather than with wait_for: a reader that stopped
        # reading is found within a second, and the hot path pays no timer.
        self.write_started = time.monotonic()
        await self.ws.send_bytes(data)
        self.write_started = None
        self.metrics.bytes_out.inc(len(data))

    def _clear(self) -> BoundedWebSocketProtocol | None:
        """The protocol, if a frame may be written to it at once: no writer at
        work, so nothing queued or in flight ahead of it, and the socket taking
        data. Writing then keeps the order a queued item would have had."""
        wire = self.wire
        if wire is None or self.writer is not None or self.outbox or not wire.writable.is_set():
            return None
        return wire

    def write_now(self, data: bytes) -> bool:
        """Write ``data`` at once if nothing is ahead of it; ``False`` to queue it."""
        wire = self._clear()
        if wire is None or not wire.write_messages([data]):
            return False
        self.metrics.bytes_out.inc(len(data))
        return True

    def offer_now(self, item: Notify) -> bool:
        """Write ``item`` at once if nothing is ahead of it; ``False`` to queue it."""
        sub, msg = item.sub, item.msg
        wire = self._clear() if item.frame else None
        if wire is None:
            return False
        if not sub.active or sub.key is None or msg.seq < sub.next_seq:
            return True  # nothing to send: what a queued item would have come to
        if msg.seq != sub.next_seq or not wire.write_messages([item.frame]):
            return False
        sub.next_seq = msg.seq + 1
        self.metrics.bytes_out.inc(len(item.frame))
        self.metrics.room_out.inc()
        self.metrics.fanout_latency.observe(time.monotonic() - item.t)
        return True

    async def _write_loop(self) -> None:
        outbox = self.outbox
        assert outbox is not None  # made before the writer is started
        try:
            while outbox:
                batch = [outbox.popleft()]
                if self.wire is not None:
                    size = item_size(batch[0])
                    while outbox and len(batch) < WRITE_BATCH and size < WRITE_BATCH_BYTES:
                        batch.append(outbox.popleft())
                        size += item_size(batch[-1])
                try:
                    if len(batch) == 1:
                        await self._write(batch[0])
                    else:
                        await self._write_many(batch)
                finally:
                    for item in batch:
                        self._taken(item)
            # Empty: no await between that test and this, so whatever is queued
            # next finds no writer and starts one (and a new outbox).
            self.writer = self.outbox = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if unavailable(exc) and not self.closing:
                # A catch-up read failed: close, so the client reconnects and
                # resumes from its cursor once the database is back.
                self.closing = True
                self.hub.forget(self, self.keys, list(self.subs.values()))
                self.metrics.error(STORAGE_UNAVAILABLE)
                self._spawn(
                    self._abort(STORAGE_UNAVAILABLE, "the database is unavailable", CLOSE_TRY_LATER)
                )
                return
            # The socket went away under us; the reader notices and cleans up.
            self.closing = True

    async def _write_many(self, batch: list[OutItem]) -> None:
        """Write ``batch`` in order: frames that need no database go out together."""
        ready: list[bytes] = []
        first: float | None = None
        live = 0
        for item in batch:
            if isinstance(item, Frame):
                ready.append(item.data)
                continue
            if isinstance(item, Notify) and item.frame:
                sub, msg = item.sub, item.msg
                if not sub.active or sub.key is None or msg.seq < sub.next_seq:
                    continue
                if msg.seq == sub.next_seq:
                    ready.append(item.frame)
                    sub.next_seq = msg.seq + 1
                    first = item.t if first is None else first
                    live += 1
                    continue
            await self._flush(ready, first, live)
            ready, first, live = [], None, 0
            await self._write(item)
        await self._flush(ready, first, live)

    async def _writable(self) -> None:
        """Wait until the socket takes data (timed by the reaper, like ``_out``)."""
        wire = self.wire
        assert wire is not None
        if not wire.writable.is_set():
            self.write_started = time.monotonic()
            await wire.writable.wait()
            self.write_started = None

    def _emit(self, frames: list[bytes]) -> None:
        assert self.wire is not None
        if not self.wire.write_messages(frames):
            raise RuntimeError("the connection is closing")
        self.metrics.bytes_out.inc(sum(len(f) for f in frames))

    async def _flush(self, frames: list[bytes], t: float | None, live: int) -> None:
        if not frames:
            return
        await self._writable()
        self._emit(frames)
        if t is not None:
            # Live messages in this write: one latency sample, the oldest one's.
            self.metrics.room_out.inc(live)
            self.metrics.fanout_latency.observe(time.monotonic() - t)

    async def _write(self, item: OutItem) -> None:
        if isinstance(item, Frame):
            await self._out(item.data)
        elif isinstance(item, Notify):
            sub, msg = item.sub, item.msg
            # Nothing live before membership is confirmed: the CatchUp queued after
            # the check reads everything from the database anyway.
            if not sub.active or sub.key is None or msg.seq < sub.next_seq:
                return
            if msg.seq == sub.next_seq and item.frame:
                await self._out(item.frame)
                sub.next_seq = msg.seq + 1
                self.metrics.room_out.inc()
            elif msg.seq == sub.next_seq:
                await self._deliver(sub, msg)
            else:
                await self._fetch(sub, upto=msg.seq)
            self.metrics.fanout_latency.observe(time.monotonic() - item.t)
        elif isinstance(item, Wake):
            if item.sub.active and item.sub.key is not None and item.seq >= item.sub.next_seq:
                await self._fetch(item.sub, upto=item.seq)
                self.metrics.fanout_latency.observe(time.monotonic() - item.t)
        elif isinstance(item, CatchUp):
            await self._fetch(item.sub, upto=None)
            if item.sub.active:
                await self._out(
                    F.server_frame("synced", room=item.sub.room, seq=item.sub.next_seq - 1)
                )
        elif isinstance(item, Mail):
            await self._deliver_mail(item.item)
        elif isinstance(item, MailCheck):
            seen = self.delivered.get(item.key)
            if seen is not None and (item.max_id not in seen or item.count > len(seen)):
                await self._write(MailSync(item.key))
        else:
            after = 0
            while True:
                page = await self.store.mailbox_pending(
                    item.key, after, self.settings.catch_up_page
                )
                for mail in page:
                    await self._deliver_mail(mail)
                if len(page) < self.settings.catch_up_page:
                    break
                after = page[-1].id

    async def _fetch(self, sub: Subscription, upto: int | None) -> None:
        while sub.active:
            page, more = await self.store.room_messages_page(
                sub.room,
                sub.next_seq - 1,
                self.settings.catch_up_page,
                self.settings.catch_up_page_bytes,
                upto,
            )
            if self.wire is not None and page:
                # The page in one socket write (it is bounded in bytes already),
                # and none of it once a departure ended the subscription.
                frames = [F.msg_frame(sub.room, m.seq, m.data, m.ts) for m in page]
                await self._writable()
                if not sub.active:
                    return
                self._emit(frames)
                sub.next_seq = page[-1].seq + 1
                self.metrics.room_out.inc(len(page))
            else:
                for msg in page:
                    if not sub.active:
                        return
                    await self._deliver(sub, msg)
            if not more:
                return

    async def _deliver(self, sub: Subscription, msg: StoredMessage) -> None:
        await self._out(F.msg_frame(sub.room, msg.seq, msg.data, msg.ts))
        sub.next_seq = msg.seq + 1
        self.metrics.room_out.inc()

    async def _deliver_mail(self, item: MailItem) -> None:
        seen = self.delivered.get(item.recipient)
        if seen is None or item.id in seen:
            return
        seen.add(item.id)
        self.metrics.messages_out.labels("pairwise").inc()
        await self._out(
            F.server_frame(
                "pmsg",
                id=item.id,
                room=item.room_id,
                to=item.recipient,
                data=item.data,
                ts=item.ts,
                **{"from": item.sender},
            )
        )
