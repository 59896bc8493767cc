"""The writer half of a WebSocket connection: everything sent to the client goes here.

Delivery order is decided here: a subscription keeps ``next_seq`` and the
writer delivers a live message only if it is the next one, fetches the missing
range from the database if it is ahead, and drops it if it is behind. So a
client sees each room's messages gap-free and in order, whatever order
notifications arrive in. Catch-up reads are bounded in bytes as well as in
messages, since a page waits in memory for a reader that may be slow.
"""

from __future__ import annotations

import asyncio
import time
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

CLOSE_TRY_LATER = 1013


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

    ws: WebSocket
    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics
    outbox: asyncio.Queue[OutItem]
    keys: set[bytes]
    subs: dict[bytes, Subscription]
    delivered: dict[bytes, set[int]]
    closing: bool
    write_started: float | None

    def _taken(self, item: OutItem) -> None:
        raise NotImplementedError

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

    async def _write_loop(self) -> None:
        try:
            while True:
                item = await self.outbox.get()
                try:
                    await self._write(item)
                finally:
                    self._taken(item)
                    self.outbox.task_done()
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

    async def _write(self, item: OutItem) -> None:
        if isinstance(item, Frame):
            await self._out(item.data)
        elif isinstance(item, Notify):
            sub, msg = item.sub, item.msg
            # Nothing live before membership is confirmed: the CatchUp queued after
            # the check reads everything from the database anyway.
            if not sub.active or sub.key is None or msg.seq < sub.next_seq:
                return
            if msg.seq == sub.next_seq:
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
            for msg in page:
                if not sub.active:
                    return
                await self._deliver(sub, msg)
            if not more:
                return

    async def _deliver(self, sub: Subscription, msg: StoredMessage) -> None:
        await self._out(F.server_frame("msg", room=sub.room, seq=msg.seq, data=msg.data, ts=msg.ts))
        sub.next_seq = msg.seq + 1
        self.metrics.messages_out.labels("room").inc()

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
