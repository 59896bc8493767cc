"""Fan-out of commits to live connections, across relay instances through Redis.

The database is the truth; notifications only wake writers up (DESIGN.md §4).

- A commit on this instance goes to the local :class:`~.hub.Hub` at once
  (with the stored message, so the writer needs no query) and, when
  ``redis_url`` is set, is queued for publishing on the Redis channel.
- Every instance subscribes to that channel and feeds what others committed
  into its hub as wake-ups; each connection's writer then reads the database
  after its own cursor, so order and completeness never depend on Redis.
- A periodic catch-up tick (``catch_up_interval_seconds``, and at once after
  every (re)connection to Redis) compares the database with what the hub's
  subscribers have seen: a lost notification costs at most one interval.

What crosses Redis is routing data the operator's database holds anyway: a
room id with a sequence number or a log position and head hash, a departed
member key, a mailbox recipient key, and a random per-process instance tag.
Never a payload, a sender, or an address.

While Redis is unreachable the instance says so on ``/readyz`` and refuses
new sends with ``fanout_unavailable`` (other instances would not hear of
them promptly); it reconnects with capped exponential backoff and recovers by
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from typing import Any

from backchannel.protocol import roomlog
from backchannel.protocol.encoding import decode, encode

from .. import frames as F
from ..logging import get_logger
from ..metrics import Metrics
from ..storage import Appended, MailItem, Store, StoredMessage
from .hub import Hub

log = get_logger("backchannel.relay.fanout")

FANOUT_UNAVAILABLE = "fanout_unavailable"
#: Notifications waiting to be published; beyond this they are dropped (and
#: repaired by the catch-up tick), so a stuck Redis never grows memory.
PUBLISH_QUEUE = 10_000


def departed_key(event: roomlog.Event) -> bytes | None:
    if isinstance(event, roomlog.RemoveEvent):
        return bytes(event.target)
    if isinstance(event, roomlog.LeaveEvent):
        return bytes(event.author)
    return None


class Backoff:
    """Capped exponential backoff with jitter."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap, self.next = first, cap, first

    def reset(self) -> None:
        self.next = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.next * random.uniform(0.5, 1.0))  # noqa: S311 (jitter)
        self.next = min(self.cap, self.next * 2)


class Fanout:
    def __init__(
        self,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        *,
        redis_url: str | None,
        channel: str,
        catch_up_interval: float,
    ) -> None:
        self.hub = hub
        self.store = store
        self.metrics = metrics
        self.redis_url = redis_url
        self.channel = channel
        self.interval = catch_up_interval
        self.instance = os.urandom(8)
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(PUBLISH_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._pub: Any = None
        self.subscribed = False
        self.publishing = True
        #: Test hook: return False to suppress publishing one notification.
        self.publish_filter: Callable[[dict[str, Any]], bool] | None = None

    # --- state ------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None

    @property
    def available(self) -> bool:
        return not self.enabled or (self.subscribed and self.publishing)

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="catch-up"))
        if self.enabled:
            self._pub = _client(self.redis_url)
            self._tasks.append(asyncio.create_task(self._publish_loop(), name="redis-publish"))
            self._tasks.append(asyncio.create_task(self._subscribe_loop(), name="redis-subscribe"))
            self._tasks.append(asyncio.create_task(self._health_loop(), name="redis-health"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._pub is not None:
            with contextlib.suppress(Exception):
                await self._pub.aclose()

    # --- local commits ----------------------------------------------------------------------

    def message(self, room: bytes, msg: StoredMessage) -> None:
        frame = F.msg_frame(room, msg.seq, msg.data, msg.ts)
        self.hub.publish_message(room, msg, time.monotonic(), frame)
        self._publish({"k": "m", "r": room, "s": msg.seq})

    def event(self, room: bytes, appended: Appended) -> None:
        gone = departed_key(appended.event)
        self._local_event(room, appended.pos, appended.head, gone)
        note: dict[str, Any] = {"k": "e", "r": room, "p": appended.pos, "h": appended.head}
        if gone is not None:
            note["g"] = gone
        self._publish(note)

    def mail(self, item: MailItem) -> None:
        self.hub.deliver_mail(item)
        self._publish({"k": "p", "to": item.recipient})

    def _local_event(self, room: bytes, pos: int, head: bytes, gone: bytes | None) -> None:
        if gone is not None:
            self.hub.member_departed(room, gone, F.server_frame("removed", room=room))
        self.hub.publish_event(room, F.server_frame("event", room=room, pos=pos, head=head), pos)

    # --- Redis --------------------------------------------------------------------------------

    def _publish(self, note: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.publish_filter is not None and not self.publish_filter(note):
            self.metrics.notifications.labels("dropped").inc()
            return
        try:
            self._queue.put_nowait(encode({"v": 1, "i": self.instance, **note}))
        except asyncio.QueueFull:
            self.metrics.notifications.labels("dropped").inc()

    async def _publish_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            try:
                async with self._pub.pipeline(transaction=False) as pipe:
                    for data in batch:
                        pipe.publish(self.channel, data)
                    await pipe.execute()
                self.metrics.notifications.labels("published").inc(len(batch))
                self.publishing = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Already committed and acknowledged: the other instances find these
                # by their catch-up tick (at once when they reconnect to Redis).
                self.metrics.notifications.labels("dropped").inc(len(batch))
                if self.publishing:
                    log.warning("fanout.publish_failed", error=type(exc).__name__)
                self.publishing = False

    async def _health_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._pub.ping(), 2.0)
                self.publishing = True
            except asyncio.CancelledError:
                raise
            except Exception:
                self.publishing = False
            await asyncio.sleep(0.5)

    async def _subscribe_loop(self) -> None:
        backoff = Backoff()
        while True:
            client = _client(self.redis_url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.subscribed = True
                    backoff.reset()
                    log.info("fanout.subscribed")
                    await self._catch_up()  # whatever was missed while disconnected
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None:
                            self._received(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.subscribed:
                    log.warning("fanout.disconnected", error=type(exc).__name__)
                self.subscribed = False
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await client.aclose()
            await backoff.sleep()

    def _received(self, data: bytes) -> None:
        try:
            note = decode(data, max_size=4096)
            if not isinstance(note, dict) or note.get("v") != 1 or note.get("i") == self.instance:
                return
            self.metrics.notifications.labels("received").inc()
            kind, now = note["k"], time.monotonic()
            if kind == "m":
                self.hub.wake_room(note["r"], int(note["s"]), now)
            elif kind == "e":
                self._local_event(note["r"], int(note["p"]), note["h"], note.get("g"))
            elif kind == "p":
                self.hub.wake_mail(note["to"])
        except Exception as exc:  # a malformed notification is ignored, never fatal
            log.warning("fanout.bad_notification", error=type(exc).__name__)

    # --- the catch-up tick --------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._catch_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fanout.catch_up_failed", error=type(exc).__name__)

    async def _catch_up(self) -> None:
        """Compare the database with what this instance's connections have seen."""
        hub = self.hub
        rooms = list(hub.rooms)
        if rooms:
            now = time.monotonic()
            marks = await self.store.room_marks(rooms)
            for room, (last_seq, log_len, head) in marks.items():
                hub.wake_room(room, last_seq, now)
                if room not in hub.log_pos:
                    hub.log_pos[room] = log_len - 1  # the baseline
                elif log_len - 1 > hub.log_pos[room]:
                    hub.publish_event(
                        room,
                        F.server_frame("event", room=room, pos=log_len - 1, head=head),
                        log_len - 1,
                    )
            held = [
                (room, sub.key)
                for room, subs in list(hub.rooms.items())
                for sub in subs
                if sub.key is not None
            ]
            for room, key in await self.store.departed_among(held):
                hub.member_departed(room, key, F.server_frame("removed", room=room))
        keys = list(hub.mailboxes)
        if keys:
            for key, (count, max_id) in (await self.store.mailbox_marks(keys)).items():
                hub.check_mail(key, count, max_id)


def _client(url: str | None) -> Any:
    from redis.asyncio import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No hidden retries: a dead Redis must show at once (we retry ourselves).
    return Redis.from_url(
        url or "",
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
    )
