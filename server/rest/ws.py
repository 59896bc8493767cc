"""The WebSocket endpoint ``/v1/ws``: authenticate, subscribe, send, receive, acknowledge.

Each connection runs two tasks: the reader (this module's :meth:`Connection.run`)
parses frames and acts, and the writer drains the connection's bounded outbox.
Everything sent to the client goes through the writer, which is also where
delivery order is decided: a subscription keeps ``next_seq`` and the writer
delivers a live message only if it is the next one, fetches the missing range
from the database if it is ahead, and drops it if it is behind. So a client
sees each room's messages gap-free and in order, whatever order notifications
arrive in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from backchannel.protocol import errors as perr
from backchannel.protocol import primitives as P
from backchannel.protocol import relayauth
from backchannel.protocol.envelope import RoomEnvelope

from .. import frames as F
from ..errors import RelayError
from ..handlers.fanout import FANOUT_UNAVAILABLE, Fanout
from ..handlers.hub import (
    CatchUp,
    Frame,
    Hub,
    Mail,
    MailCheck,
    MailSync,
    Notify,
    OutItem,
    Subscription,
    Wake,
)
from ..logging import get_logger
from ..metrics import Metrics
from ..storage import STORAGE_UNAVAILABLE, unavailable

if TYPE_CHECKING:
    from ..config import Settings
    from ..storage import MailItem, Store, StoredMessage

log = get_logger("backchannel.relay.ws")

CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013
#: Failed or premature frames tolerated before authentication.
PRE_AUTH_STRIKES = 3


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ConnectionLimiter:
    """Counts live connections, in total and per client address.

    Addresses are held in memory while connected, never logged or stored.
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.live = 0
        self.by_address: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        if self.live >= self.total or self.by_address.get(address, 0) >= self.per_address:
            return False
        self.live += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        self.live -= 1
        left = self.by_address.get(address, 1) - 1
        if left <= 0:
            self.by_address.pop(address, None)
        else:
            self.by_address[address] = left


class _Closing(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class Connection:
    def __init__(
        self,
        ws: WebSocket,
        settings: Settings,
        store: Store,
        hub: Hub,
        fanout: Fanout,
        metrics: Metrics,
    ) -> None:
        self.ws = ws
        self.settings = settings
        self.store = store
        self.hub = hub
        self.fanout = fanout
        self.metrics = metrics
        self.origin = settings.origin()
        self.outbox: asyncio.Queue[OutItem] = asyncio.Queue(settings.send_queue_depth)
        self.keys: set[bytes] = set()
        self.subs: dict[bytes, Subscription] = {}
        self.delivered: dict[bytes, set[int]] = {}  # recipient key -> mailbox ids sent
        self.bucket = TokenBucket(settings.rate_messages_per_second, settings.rate_burst)
        self.nonce = P.random_bytes(F.NONCE_SIZE)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[Any] | None = None
        self.closing = False
        self.aborted = False

    # --- outbox -----------------------------------------------------------------------------

    def offer(self, item: OutItem) -> None:
        if self.closing:
            return
        try:
            self.outbox.put_nowait(item)
        except asyncio.QueueFull:
            self.closing = True
            self.hub.forget(self, self.keys, list(self.subs.values()))
            log.info("ws.too_slow")
            self._spawn(self._abort("too_slow", "the connection does not keep up"))

    async def put(self, item: OutItem) -> None:
        """Queue a reply to this connection's own request. It waits when the
        outbox is full: a client that does not read its answers slows only
        itself (``offer`` is for what other connections cause)."""
        if not self.closing:
            await self.outbox.put(item)

    async def send(self, data: bytes) -> None:
        await self.put(Frame(data))

    async def error(self, code: str, detail: str, ref: str | bytes | None = None) -> None:
        self.metrics.error(code)
        await self.send(F.error_frame(code, detail, ref))

    async def _out(self, data: bytes) -> None:
        await self.ws.send_bytes(data)
        self.metrics.bytes_out.inc(len(data))

    async def _abort(self, code: str, detail: str, close_code: int = CLOSE_POLICY) -> None:
        """Close this connection from outside its reader (a full outbox)."""
        self.aborted = True
        if self.writer is not None:
            self.writer.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.send_bytes(F.error_frame(code, detail)), 1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(close_code), 1.0)
        if self.reader is not None:
            self.reader.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.reader = asyncio.current_task()
        await self._out(F.server_frame("challenge", nonce=self.nonce, origin=self.origin))
        self.writer = asyncio.create_task(self._write_loop())
        try:
            await self._authenticate()
            while not self.closing:
                await self._handle(await self._receive())
        except _Closing as exc:
            await self._drain_then_close(exc.code)
        except (WebSocketDisconnect, RuntimeError):
            pass
        except asyncio.CancelledError:
            if not self.aborted:
                raise
        finally:
            self.closing = True
            self.hub.forget(self, self.keys, list(self.subs.values()))
            if self.writer is not None:
                self.writer.cancel()
            for task in list(self.tasks):
                task.cancel()

    async def _drain_then_close(self, code: int) -> None:
        # Let the writer flush the error frame that explains the close.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.outbox.join(), 1.0)
        with contextlib.suppress(Exception):
            await self.ws.close(code)

    async def _receive(self) -> bytes:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("text") is not None:
            await self.error("malformed", "frames are binary")
            raise _Closing(CLOSE_UNSUPPORTED)
        data = message.get("bytes") or b""
        self.metrics.bytes_in.inc(len(data))
        return bytes(data)

    async def _parse(self, data: bytes) -> F.ClientFrame | None:
        try:
            return F.parse_client_frame(data, max_size=self.settings.max_frame_bytes)
        except F.FrameError as exc:
            await self.error(exc.code, exc.detail, exc.ref)
            if exc.code == "frame_too_large":
                raise _Closing(CLOSE_TOO_BIG) from exc
            return None

    async def _authenticate(self) -> None:
        strikes = 0
        try:
            async with asyncio.timeout(self.settings.auth_timeout_seconds):
                while not self.keys:
                    frame = await self._parse(await self._receive())
                    if isinstance(frame, F.Auth):
                        if await self._auth(frame):
                            return
                    elif frame is not None:
                        await self.error("unauthenticated", "authenticate first", "auth")
                    strikes += 1
                    if strikes >= PRE_AUTH_STRIKES:
                        raise _Closing(CLOSE_POLICY)
        except TimeoutError:
            await self.error("auth_timeout", "no authentication in time")
            raise _Closing(CLOSE_POLICY) from None

    async def _auth(self, frame: F.Auth) -> bool:
        named = {k.key for k in frame.keys}
        if len(named) != len(frame.keys):
            # Refused before any signature is checked: one signature repeated a
            # thousand times would cost a thousand verifications on the event loop.
            await self.error("duplicate_keys", "a key appears twice in this frame", "auth")
            return False
        new = named - self.keys
        if len(self.keys) + len(new) > self.settings.max_keys_per_connection:
            await self.error(
                "too_many_keys",
                f"at most {self.settings.max_keys_per_connection} keys per connection",
                "auth",
            )
            return False
        try:
            for item in frame.keys:
                relayauth.verify_challenge(item.key, self.origin, self.nonce, item.sig)
        except (perr.ProtocolError, ValueError):
            await self.error("bad_signature", "a key's signature does not verify", "auth")
            return False
        self.keys |= new
        log.info("ws.authenticated", keys=len(self.keys))
        # A fresh challenge after every success: an auth frame is good once, here only.
        self.nonce = P.random_bytes(F.NONCE_SIZE)
        await self.send(F.server_frame("ready", keys=sorted(self.keys)))
        await self.send(F.server_frame("challenge", nonce=self.nonce, origin=self.origin))
        for key in sorted(new):
            self.delivered.setdefault(key, set())
            self.hub.listen_mailbox(key, self)
            await self.put(MailSync(key))
        return True

    # --- frames after authentication ---------------------------------------------------------

    async def _handle(self, data: bytes) -> None:
        frame = await self._parse(data)
        if frame is None:
            return
        if isinstance(frame, F.Auth):
            await self._auth(frame)
        elif isinstance(frame, F.Ping):
            await self.send(F.server_frame("pong"))
        elif isinstance(frame, F.Sub):
            try:
                await self._sub(frame)
            except Exception as exc:
                if not unavailable(exc):
                    raise
                sub = self.subs.pop(frame.room, None)
                if sub is not None:
                    self.hub.unsubscribe(sub)
                await self.error(STORAGE_UNAVAILABLE, "the database is unavailable", "sub")
        elif isinstance(frame, F.Unsub):
            sub = self.subs.pop(frame.room, None)
            if sub is not None:
                self.hub.unsubscribe(sub)
        elif isinstance(frame, F.Fetch):
            await self._refetch(frame)
        elif isinstance(frame, F.Send | F.PSend):
            await self._send(frame)
        elif isinstance(frame, F.Ack):
            self._spawn(self._ack(frame))

    async def _sub(self, frame: F.Sub) -> None:
        # Subscriptions a departure ended no longer count.
        self.subs = {room: sub for room, sub in self.subs.items() if sub.active}
        old = self.subs.get(frame.room)
        if old is None and len(self.subs) >= self.settings.max_subscriptions:
            await self.error(
                "too_many_subscriptions",
                f"at most {self.settings.max_subscriptions} subscriptions per connection",
                "sub",
            )
            return
        if old is not None:
            self.hub.unsubscribe(old)
        # Register first, then check: a removal committed after the check still
        # finds (and ends) this subscription.
        sub = Subscription(
            room=frame.room, conn=self, next_seq=frame.after + 1, candidates=frozenset(self.keys)
        )
        self.subs[frame.room] = sub
        self.hub.subscribe(sub)
        key = await self.store.current_member_among(frame.room, sorted(self.keys))
        if not sub.active:
            return  # a departure ended it while we checked; `removed` is on its way
        if key is None:
            self.hub.unsubscribe(sub)
            del self.subs[frame.room]
            await self.error(
                "not_authorized", "no key here is a current member of that room", "sub"
            )
            return
        sub.key = key
        await self.put(CatchUp(sub))

    async def _refetch(self, frame: F.Fetch) -> None:
        """Send again the room messages a client lost on the way (a damaged or dropped
        frame): only for a room it is subscribed to as a member, within the rate
        limit, and never beyond what the subscription has been sent."""
        sub = self.subs.get(frame.room)
        if sub is None or not sub.active or sub.key is None:
            await self.error("not_subscribed", "subscribe to the room first", "fetch")
            return
        if not self.bucket.take():
            await self.error("rate_limited", "slow down", "fetch")
            return
        wanted = [seq for seq in frame.seqs if seq < sub.next_seq]
        try:
            found = await self.store.room_messages_at(frame.room, wanted) if wanted else []
        except RelayError as exc:
            await self.error(exc.code, exc.detail, "fetch")
            return
        for msg in found:
            await self.send(
                F.server_frame("msg", room=frame.room, seq=msg.seq, data=msg.data, ts=msg.ts)
            )
        await self.send(
            F.server_frame(
                "fetched", room=frame.room, seqs=list(frame.seqs), held=[m.seq for m in found]
            )
        )

    async def _send(self, frame: F.Send | F.PSend) -> None:
        if frame.sender not in self.keys:
            await self.error("not_authenticated", "'from' is not authenticated here", frame.cid)
            return
        if len(frame.data) > self.settings.max_message_bytes:
            await self.error(
                "message_too_large",
                f"messages are limited to {self.settings.max_message_bytes} bytes",
                frame.cid,
            )
            return
        if isinstance(frame, F.Send) and not _names_its_sender(frame):
            # Defence in depth (clients check signatures and authority): a
            # member's connection may not post an envelope naming someone else.
            await self.error(
                "sender_mismatch", "the message names another sender or room", frame.cid
            )
            return
        if not self.bucket.take():
            await self.error("rate_limited", "slow down", frame.cid)
            return
        if not self.fanout.available:
            # Other instances would not hear of it: refuse rather than half-deliver.
            await self.error(
                FANOUT_UNAVAILABLE, "fan-out (Redis) is unavailable; retry later", frame.cid
            )
            return
        self._spawn(self._store_send(frame))

    async def _store_send(self, frame: F.Send | F.PSend) -> None:
        try:
            if isinstance(frame, F.Send):
                msg, fresh = await self.store.append_room_message(
                    frame.room, frame.sender, frame.cid, frame.data
                )
                await self.send(F.server_frame("sent", room=frame.room, cid=frame.cid, seq=msg.seq))
                if fresh:
                    self.metrics.messages_in.labels("room").inc()
                    self.fanout.message(frame.room, msg)
            else:
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

    async def _ack(self, frame: F.Ack) -> None:
        try:
            gone = await self.store.mailbox_ack(sorted(self.keys), list(frame.ids))
        except RelayError as exc:
            await self.error(exc.code, exc.detail, "ack")
            return
        for ids in self.delivered.values():
            ids.difference_update(gone)
        await self.send(F.server_frame("acked", ids=gone))

    # --- the writer ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while True:
                item = await self.outbox.get()
                try:
                    await self._write(item)
                finally:
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
        page_size = self.settings.catch_up_page
        while sub.active:
            page = await self.store.room_messages_after(sub.room, sub.next_seq - 1, page_size, upto)
            for msg in page:
                if not sub.active:
                    return
                await self._deliver(sub, msg)
            if len(page) < page_size:
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


async def websocket_endpoint(ws: WebSocket) -> None:
    state = ws.app.state
    address = ws.client.host if ws.client else ""
    limiter: ConnectionLimiter = state.limiter
    metrics: Metrics = state.metrics
    if not limiter.acquire(address):
        metrics.error("too_many_connections")
        await ws.accept()
        with contextlib.suppress(Exception):
            await ws.send_bytes(F.error_frame("too_many_connections", "try again later"))
            await ws.close(CLOSE_TRY_LATER)
        return
    metrics.connections.inc()
    try:
        await ws.accept()
        conn = Connection(ws, state.settings, state.store, state.hub, state.fanout, metrics)
        await conn.run()
    except Exception as exc:
        state.internal_errors += 1
        log.error("ws.internal_error", error=type(exc).__name__)
        with contextlib.suppress(Exception):
            await ws.close(1011)
    finally:
        metrics.connections.dec()
        limiter.release(address)


def _names_its_sender(frame: F.Send) -> bool:
    """False when the data is a room envelope whose sender or room is not the frame's.

    What is not an envelope at all stays opaque to the relay (clients refuse it
    as malformed, and it names nobody)."""
    try:
        envelope = RoomEnvelope.from_bytes(frame.data)
    except perr.ProtocolError:
        return True
    return envelope.sender == frame.sender and envelope.room_id == frame.room
