"""Pairwise mail on a connection: storing a ``psend``, and coalescing acknowledgements.

A mixin of :class:`~.ws.Connection`, kept apart so that the connection's reader
stays readable; it uses the connection's store, fan-out and replies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import frames as F
from ..errors import RelayError
from .writer import Writer

if TYPE_CHECKING:
    from ..handlers.fanout import Fanout

#: Mailbox ids one connection may have waiting to be acknowledged.
MAX_PENDING_ACKS = 8192
#: Room kept in the outbox for each answer owed to a send in flight: more than
#: any `sent` or error frame takes.
REPLY_BYTES = 256


class Mailbox(Writer):
    __slots__ = ("acking", "acks", "fanout", "inflight")

    fanout: Fanout
    #: Sends (room or pairwise) taken and not yet answered.
    inflight: int
    acks: set[int]
    acking: bool

    def promised(self) -> int:
        # The sends in flight, and the one about to be taken.
        return (self.inflight + 1) * REPLY_BYTES

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def error(self, code: str, detail: str, ref: str | bytes | None = None) -> None:
        raise NotImplementedError

    async def _store_mail(self, frame: F.PSend) -> None:
        try:
            item, fresh = await self.store.mailbox_put(
                frame.to,
                frame.sender,
                frame.room,
                frame.cid,
                frame.data,
                self.settings.max_mailbox_depth,
            )
            await self.send(F.server_frame("psent", cid=frame.cid, id=item.id))
            if fresh:
                self.metrics.messages_in.labels("pairwise").inc()
                self.fanout.mail(item)
        except RelayError as exc:
            await self.error(exc.code, exc.detail, frame.cid)
        finally:
            self.inflight -= 1

    async def _take_ack(self, frame: F.Ack) -> None:
        """Acks are coalesced: at most one acknowledgement write per connection is
        in flight, and ids that arrive meanwhile join the next one. So a flood of
        ``ack`` frames costs one database write at a time, not a task per frame."""
        # Only what this connection delivered can be acknowledged on it: anything
        # else is answered at once, with no database work (a client that acks
        # mail delivered on an earlier connection gets it again, and acks it again).
        ids = [i for i in frame.ids if any(i in seen for seen in self.delivered.values())]
        if not ids:
            await self.send(F.server_frame("acked", ids=[]))
            return
        if len(self.acks) + len(ids) > MAX_PENDING_ACKS:
            await self.error("busy", "too many acknowledgements waiting", "ack")
            return
        self.acks.update(ids)
        if not self.acking:
            self.acking = True
            self._spawn(self._ack_loop())

    async def _ack_loop(self) -> None:
        try:
            while self.acks and not self.closing:
                ids, self.acks = sorted(self.acks), set()
                try:
                    gone = await self.store.mailbox_ack(sorted(self.keys), ids)
                except RelayError as exc:
                    await self.error(exc.code, exc.detail, "ack")
                    continue
                for seen in self.delivered.values():
                    seen.difference_update(gone)
                await self.send(F.server_frame("acked", ids=gone))
        finally:
            self.acking = False
