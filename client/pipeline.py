"""Room messages sent many at a time over one open connection: the daemon's send path.

:meth:`Sender.send_text <.sending.Sender.send_text>` is right for one message
from a fresh process: it fetches the log, seals, stores, sends and waits. A
process that stays connected (the daemon) knows the log already (the relay's
``event`` frames keep it current) and has many messages to send, so here a
batch is sealed and stored in one transaction, every frame goes out at once,
and the acknowledgements are collected as they come (the relay answers each
by its ``cid``), so a batch costs one commit and one round trip, not one each.

The guarantees do not change: a message is in the outbox, in the same
transaction as the sender-key step that sealed it, before its frame leaves;
it leaves the outbox only once the relay said it is durable, or refused it for
good (with a warning); anything else keeps it for the next connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from backchannel.protocol import padding
from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import encode
from backchannel.protocol.errors import ProtocolError

from .core import Client
from .errors import ClientError
from .outbox import BACK_OFF, permanent
from .relay import Frame, RelayError, RelaySocket
from .room import Room, require_usable
from .sending import ROOM_MESSAGE, Limit, require_fits
from .transcript import message_id

#: Most messages sealed in one transaction (the daemon sizes its batches to
#: the relay's `max_inflight_writes`, between these two).
MAX_BATCH = 512
MIN_BATCH = 8
#: How long a message the relay paces (`busy`, `rate_limited`) is retried for.
PATIENCE = 120.0


@dataclass
class Outgoing:
    """One message of a batch: what the caller gets back once it is settled."""

    text: str
    mid: bytes | None = None
    ts: int = 0
    error: Exception | None = None
    cid: bytes = b""
    envelope: bytes = b""
    reply: asyncio.Future[Frame] | None = None
    #: Sealed and kept in the outbox, not yet acknowledged: goes out on reconnect.
    queued: bool = False


class Pipeline:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def seal(self, sock: RelaySocket, room: Room, texts: list[str]) -> list[Outgoing]:
        """Seal, store and send ``texts`` in order; :meth:`settle` waits for the answers.

        A message that cannot be sent (too long, an observer's) gets its error
        and the rest still go.
        """
        c = self.client
        require_usable(room)
        if room.state.role_of(room.me) == "observer":
            raise ClientError("observers cannot post in this room")
        limit = await c.sender.limit(room, ROOM_MESSAGE)
        await c.senderkeys.distribute(sock, room, c.profile())
        ms = c.ctx.now_ms()
        now = ms // 1000
        out = [Outgoing(text) for text in texts]
        ready: list[tuple[Outgoing, bytes]] = []
        for item in out:
            try:
                body = encode({"t": "text", "text": item.text, "ts": now, "ms": ms})
                require_fits(item.text, body, None, limit)
            except (ClientError, UnicodeEncodeError, ProtocolError) as exc:
                item.error = exc
                continue
            ready.append((item, body))
        for start in range(0, len(ready), MAX_BATCH):
            await self._seal_batch(sock, room, ready[start : start + MAX_BATCH], limit, now)
        return out

    async def _seal_batch(
        self,
        sock: RelaySocket,
        room: Room,
        batch: list[tuple[Outgoing, bytes]],
        limit: Limit,
        now: int,
    ) -> None:
        c = self.client
        # The exact sealed size is known only after sealing, and a refusal then
        # must roll the key step back: a message near the limit gets a
        # transaction of its own (as in Sender.send_text), the rest share one.
        safe = [(i, b) for i, b in batch if _surely_fits(b, limit)]
        close = [(i, b) for i, b in batch if not _surely_fits(b, limit)]
        groups = ([safe] if safe else []) + [[one] for one in close]
        for group in groups:
            try:
                with c.store.transaction():
                    envelopes = c.senderkeys.seal_many(room, [body for _, body in group])
                    for (item, body), envelope in zip(group, envelopes, strict=True):
                        require_fits(item.text, body, len(envelope), limit)
                        item.cid, item.mid, item.ts = P.random_bytes(16), message_id(envelope), now
                        c.outbox.queue(room, item.cid, envelope, ts=now)
                        c.transcript.add(
                            room, "message", item.text, sender=room.me, mid=item.mid
                        )
                        item.envelope = envelope
            except ClientError as exc:
                for item, _ in group:
                    item.error, item.mid = exc, None
                continue
            for item, _ in group:
                item.reply = await sock.submit(
                    "send",
                    room=room.room_id,
                    **{"from": room.me},
                    cid=item.cid,
                    data=item.envelope,
                )

    async def settle(self, sock: RelaySocket, room: Room, items: list[Outgoing]) -> None:
        """Wait for the relay's answer to every sent item; acknowledged ones leave the
        outbox in one transaction."""
        c = self.client
        done: list[Outgoing] = []
        for item in items:
            if item.reply is None:
                continue
            try:
                await sock.reply(item.cid, item.reply)
            except RelayError as exc:
                if exc.code in BACK_OFF:
                    # The relay is loaded or pacing us: it is already ours to
                    # send (stored, shown), so it goes again, with patience.
                    try:
                        await self._resend(sock, room, item)
                    except RelayError:
                        item.queued = True
                    else:
                        done.append(item)
                    continue
                if permanent(exc.code):
                    c.outbox.refused(room, item.cid, exc.code, item.ts)
                    item.error = exc
                else:
                    # Stored here and still in the outbox: the next connection sends
                    # it (its cid makes a second copy impossible). Not a failure to
                    # retry, which would send the words twice.
                    item.queued = True
                continue
            done.append(item)
        if done:
            with c.store.transaction():
                for item in done:
                    c.outbox.forget(room, item.cid)


    async def _resend(self, sock: RelaySocket, room: Room, item: Outgoing) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, RelayError) and e.code in BACK_OFF),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            stop=stop_after_delay(PATIENCE),
            reraise=True,
        ):
            with attempt:
                await sock.request(
                    "send", room=room.room_id, **{"from": room.me}, cid=item.cid,
                    data=item.envelope,
                )


def _surely_fits(body: bytes, limit: Limit) -> bool:
    return padding.bucket_size(len(body)) + limit.slack <= limit.size
