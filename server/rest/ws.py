"""A WebSocket connection to ``/v1/ws``: authenticate, subscribe, send, receive, acknowledge.

Each connection runs one task, the reader (:meth:`Connection.run`), which parses
frames and acts. What goes to the client is written at once when nothing is
ahead of it; otherwise it waits in the connection's bounded outbox, and a
writer task (:mod:`.writer`), started only then and gone once the outbox is
empty, drains it in order. An idle connection so holds one task and no queue
machinery (issue 14: memory per idle connection). Whatever a frame asks for is
bounded before it is done: frames and decoding time per connection (past the
budget the reader pauses, so TCP slows the sender), sends per connection and
per key, writes in flight, acknowledgements coalesced into one write at a time,
and bytes queued for a reader that may be slow (see :mod:`.budgets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from functools import partial
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
    MailSync,
    Notify,
    OutItem,
    Subscription,
)
from ..logging import get_logger
from ..metrics import Metrics
from ..storage import STORAGE_UNAVAILABLE, unavailable
from .budgets import ConnectionLimiter, CpuBuckets, KeyBuckets, TokenBucket
from .mail import Mailbox
from .writer import item_size
from .wsproto import WIRE

if TYPE_CHECKING:
    from ..config import Settings
    from ..storage import Store

log = get_logger("backchannel.relay.ws")

CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013
#: Failed or premature frames tolerated before authentication.
PRE_AUTH_STRIKES = 3


class _Closing(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class Connection(Mailbox):
    # Slots: thousands of these are alive at once, most of them idle.
    __slots__ = (
        "__weakref__",
        "aborted",
        "address",
        "auth_frame_bytes",
        "auths",
        "bucket",
        "cpu",
        "cpu_throttled",
        "frames",
        "key_buckets",
        "limiter",
        "nonce",
        "origin",
        "reader",
        "settled",
        "stranger_cpu",
        "tasks",
        "throttled",
        "unsettled",
        "unsettled_since",
    )

    def __init__(
        self,
        ws: WebSocket,
        settings: Settings,
        store: Store,
        hub: Hub,
        fanout: Fanout,
        metrics: Metrics,
        *,
        address: str = "",
        limiter: ConnectionLimiter | None = None,
        key_buckets: KeyBuckets | None = None,
        cpu_buckets: CpuBuckets | None = None,
    ) -> None:
        self.ws = ws
        self.settings = settings
        self.store = store
        self.hub = hub
        self.fanout = fanout
        self.metrics = metrics
        self.origin = settings.origin()
        #: Made when something first has to wait (most idle connections never do).
        self.outbox: deque[OutItem] | None = None
        self.keys: set[bytes] = set()
        self.subs: dict[bytes, Subscription] = {}
        self.delivered: dict[bytes, set[int]] = {}  # recipient key -> mailbox ids sent
        self.bucket = TokenBucket(settings.rate_messages_per_second, settings.rate_burst)
        self.frames = TokenBucket(settings.frame_rate_per_second, settings.frame_burst)
        # Each auth frame may cost up to max_keys_per_connection verifications.
        self.auths = TokenBucket(1.0, 5)
        self.key_buckets = key_buckets or KeyBuckets(
            settings.key_messages_per_second, settings.key_burst
        )
        self.address = address
        self.limiter = limiter
        self.settled = False
        #: Since when (monotonic) this connection has held no member subscription.
        self.unsettled_since = time.monotonic()
        #: Decoding time this connection may spend: its own once it is a member's,
        #: its address's (shared with every stranger there) until then.
        self.cpu = TokenBucket(settings.member_cpu_share, settings.member_cpu_share * 2)
        self.stranger_cpu = (cpu_buckets or CpuBuckets(settings.stranger_cpu_share)).get(address)
        #: When the write in progress started (monotonic), if one is.
        self.write_started: float | None = None
        #: Bytes in the outbox, not yet taken by the socket.
        self.pending = 0
        #: Set when the outbox has room again, for a reply waiting in ``put``
        #: (made only then).
        self.space: asyncio.Event | None = None
        self.inflight = 0
        self.acks: set[int] = set()
        self.acking = False
        self.throttled = False
        self.cpu_throttled = False
        #: The registry of unsettled connections this one is in while unsettled.
        self.unsettled: dict[Connection, None] = {}
        self.auth_frame_bytes = 512 + 128 * settings.max_keys_per_connection
        self.nonce = P.random_bytes(F.NONCE_SIZE)
        self.tasks: set[asyncio.Task[Any]] | None = None
        #: The writer task, while there is something in the outbox (or being written).
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[Any] | None = None
        self.closing = False
        self.aborted = False
        self.wire = ws.scope.get("extensions", {}).get(WIRE)

    # --- outbox -----------------------------------------------------------------------------

    def offer(self, item: OutItem) -> None:
        if self.closing:
            return
        if isinstance(item, Notify) and self.offer_now(item):
            return
        size = item_size(item)
        if (
            self.pending + size > self.settings.max_pending_bytes
            or len(self.outbox or ()) >= self.settings.send_queue_depth
        ):
            self.too_slow()
            return
        self._queue(item, size)

    def too_slow(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.hub.forget(self, self.keys, list(self.subs.values()))
        log.info("ws.too_slow")
        self._spawn(self._abort("too_slow", "the connection does not keep up"))

    async def send(self, data: bytes) -> None:
        await self.put(Frame(data))

    async def error(self, code: str, detail: str, ref: str | bytes | None = None) -> None:
        self.metrics.error(code)
        await self.send(F.error_frame(code, detail, ref))

    async def _abort(self, code: str, detail: str, close_code: int = CLOSE_POLICY) -> None:
        """Close this connection from outside its reader (a full outbox, the reaper)."""
        self.aborted = True
        stuck = self.write_started is not None
        if self.writer is not None:
            self.writer.cancel()
        if not stuck:
            # Explained and closed politely only to a peer that still reads; for one
            # that does not, the socket is aborted when the reader ends (wsproto.py).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.send_bytes(F.error_frame(code, detail)), 1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(close_code), 1.0)
        if self.reader is not None:
            self.reader.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.reader = asyncio.current_task()
        await self._out(F.server_frame("challenge", nonce=self.nonce, origin=self.origin))
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
            if self.space is not None:
                self.space.set()
            self.hub.forget(self, self.keys, list(self.subs.values()))
            if self.writer is not None:
                self.writer.cancel()
            for task in list(self.tasks or ()):
                task.cancel()

    # --- budgets ----------------------------------------------------------------------------

    def _settle(self) -> None:
        if not self.settled:
            self.settled = True
            self.unsettled.pop(self, None)
            if self.limiter is not None:
                self.limiter.settle(self.address)

    def evict(self) -> None:
        """Close this (unsettled) connection to make room for a newer one."""
        if self.closing:
            return
        self.closing = True
        self.hub.forget(self, self.keys, list(self.subs.values()))
        self.metrics.error("too_many_connections")
        self._spawn(self._abort("too_many_connections", "the relay is full; try again later"))

    def check(self, now: float) -> None:
        """The reaper's look at this connection (once a second)."""
        if self.closing:
            return
        if (
            self.write_started is not None
            and now - self.write_started > self.settings.slow_reader_seconds
        ):
            self.too_slow()
            return
        if self.settled and not any(sub.active and sub.key for sub in self.subs.values()):
            self.settled = False
            self.unsettled_since = now
            self.unsettled[self] = None
            if self.limiter is not None:
                self.limiter.unsettle(self.address)
        if not self.settled and now - self.unsettled_since > self.settings.setup_window_seconds:
            self.closing = True
            self.hub.forget(self, self.keys, list(self.subs.values()))
            self.metrics.error("not_a_member")
            self._spawn(self._abort("not_a_member", "subscribe to a room you are a member of"))

    async def _drain_then_close(self, code: int) -> None:
        # Let the writer flush the error frame that explains the close.
        if self.writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait({self.writer}, timeout=1.0)
        with contextlib.suppress(Exception):
            await self.ws.close(code)

    async def _receive(self) -> bytes:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        wait = self.frames.spend(1)
        if wait > 0:
            # Over the frame budget: said once, then this connection is read only as
            # fast as the budget refills (the rest wait in its own socket).
            if not self.throttled:
                self.throttled = True
                await self.error("rate_limited", "too many frames; reading slows down")
            await asyncio.sleep(wait)
        else:
            self.throttled = False
        if message.get("text") is not None:
            await self.error("malformed", "frames are binary")
            raise _Closing(CLOSE_UNSUPPORTED)
        data = message.get("bytes") or b""
        self.metrics.bytes_in.inc(len(data))
        return bytes(data)

    async def _parse(self, data: bytes) -> F.ClientFrame | None:
        # Before authentication only an auth frame is expected, and it is small.
        limit = self.settings.max_frame_bytes if self.keys else self.auth_frame_bytes
        started = time.perf_counter()
        try:
            frame = F.parse_client_frame(data, max_size=limit)
        except F.FrameError as exc:
            await self.error(exc.code, exc.detail, exc.ref)
            if exc.code == "frame_too_large":
                raise _Closing(CLOSE_TOO_BIG) from exc
            frame = None
        await self._charge(started)
        return frame

    async def _charge(self, started: float) -> None:
        """Charge the time since ``started`` (decoding, verifying) to this
        connection's budget; past it, stop reading for a while. The socket then
        fills and the sender is slowed by TCP itself, at no cost to anyone else."""
        bucket = self.cpu if self.settled else self.stranger_cpu
        wait = bucket.spend(time.perf_counter() - started)
        if wait > 0:
            if not self.cpu_throttled:
                self.cpu_throttled = True
                await self.error("rate_limited", "frames cost too much; reading slows down")
            await asyncio.sleep(wait)
        else:
            self.cpu_throttled = False

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
        if not self.auths.take():
            await self.error("rate_limited", "too many auth frames", "auth")
            return False
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
        started = time.perf_counter()
        try:
            for item in frame.keys:
                relayauth.verify_challenge(item.key, self.origin, self.nonce, item.sig)
        except (perr.ProtocolError, ValueError):
            await self._charge(started)
            await self.error("bad_signature", "a key's signature does not verify", "auth")
            return False
        await self._charge(started)
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
            await self._take_ack(frame)

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
        self._settle()
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
        if not self.bucket.take() or not self.key_buckets.take(frame.sender):
            await self.error("rate_limited", "slow down", frame.cid)
            return
        if self.inflight >= self.settings.max_inflight_writes:
            await self.error("busy", "too many sends waiting; retry shortly", frame.cid)
            return
        if not self.fanout.available:
            # Other instances would not hear of it: refuse rather than half-deliver.
            await self.error(
                FANOUT_UNAVAILABLE, "fan-out (Redis) is unavailable; retry later", frame.cid
            )
            return
        if isinstance(frame, F.PSend):
            self.inflight += 1
            self._spawn(self._store_mail(frame))
            return
        # Its `sent` is written from a callback, which cannot wait for room: wait
        # here instead, so a client that does not read its answers stops being read.
        await self.room_for_reply()
        self.inflight += 1
        try:
            self.store.post_room_message(
                frame.room, frame.sender, frame.cid, frame.data, partial(self._stored, frame)
            )
        except RelayError as exc:
            self.inflight -= 1
            await self.error(exc.code, exc.detail, frame.cid)

    def _stored(self, frame: F.Send, ok: bool, value: Any) -> None:
        """A room message's outcome, in the loop's turn that learnt of its commit:
        the sender's answer, then the fan-out (see :mod:`..storage.batcher`)."""
        self.inflight -= 1
        if not ok:
            self.metrics.error(value.code)
            self.reply(F.error_frame(value.code, value.detail, frame.cid))
            return
        msg, fresh = value
        self.reply(F.server_frame("sent", room=frame.room, cid=frame.cid, seq=msg.seq))
        if fresh:
            self.metrics.messages_in.labels("room").inc()
            self.fanout.message(frame.room, msg)


def _names_its_sender(frame: F.Send) -> bool:
    """False when the data is a room envelope whose sender or room is not the frame's.

    What is not an envelope at all stays opaque to the relay (clients refuse it
    as malformed, and it names nobody)."""
    try:
        envelope = RoomEnvelope.from_bytes(frame.data)
    except perr.ProtocolError:
        return True
    return envelope.sender == frame.sender and envelope.room_id == frame.room
