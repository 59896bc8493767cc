"""``backchannel daemon``: the unlocked profile, kept connected, behind a local JSON-RPC socket.

The passphrase is asked once; the daemon then holds the profile (and its
lock: it is the one writer), one connection per relay carrying every active
room there, and serves JSON-RPC 2.0 on a Unix socket, one JSON object per
line (docs/client.md, "The daemon"). ``send``, ``read``, ``members`` and
``rooms`` use it when it runs, so a script pays no passphrase prompt, no key
derivation, no connection and no log fetch per call.

The socket is ``<home>/run/daemon.sock``: the directory is 0700, the socket
0600, and a connecting process must run as our user (``SO_PEERCRED``), since
whoever can talk to it can read and write as us. What it reads is bounded:
one request line, the requests in flight per connection, the connections,
the lines queued for a slow subscriber (which is dropped, told why, rather
than let the daemon's memory grow).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from backchannel.protocol.envelope import MAX_ENVELOPE_SIZE
from backchannel.protocol.errors import ProtocolError

from .core import Client, ClientError, Line, Room
from .events import line_event
from .pipeline import MAX_BATCH, MIN_BATCH, Outgoing, Pipeline
from .relay import RelayError, RelaySocket
from .render import json_text
from .rpcwire import (
    BAD_PARAMS,
    BUSY,
    INTERNAL,
    INVALID_REQUEST,
    NO_METHOD,
    OFFLINE,
    PARSE_ERROR,
    REFUSED,
    RELAY,
    RpcError,
    error,
    param,
    same_user,
)
from .views import format_line, member_json, room_json

#: Longest request line; a longer one ends that connection.
MAX_LINE = 1 << 20
MAX_CONNECTIONS = 32
#: Requests one connection may have in flight before the daemon stops reading it.
MAX_IN_FLIGHT = 1024
#: Messages waiting to be sealed, across all rooms, before ``send`` says busy.
MAX_QUEUED = 20_000
#: Lines queued for one subscriber before it is dropped.
MAX_BEHIND = 10_000
MAX_SUBSCRIPTIONS = 4
#: Sends of the relay's burst left for pairwise messages (keys, sidebars).
PACE_MARGIN = 4
#: How long a ``send`` waits for a connection to the room's relay.
CONNECT_WAIT = 10.0

class Subscriber:
    def __init__(self, room: bytes | None, text: bool = False) -> None:
        self.room = room
        #: Whether it wants each line as the command prints it, beside the object.
        self.text = text
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(MAX_BEHIND)


class Daemon:
    def __init__(self, client: Client, path: Path) -> None:
        self.client = client
        self.path = path
        #: One holder of the client's state at a time: the relay readers and
        #: the requests interleave only between whole steps.
        self.lock = asyncio.Lock()
        self.rooms: dict[bytes, Room] = {}
        self.socks: dict[str, RelaySocket] = {}
        self.connected: dict[str, asyncio.Event] = {}
        self.subscribers: set[Subscriber] = set()
        self.pipeline = Pipeline(client)
        self._names: dict[str, bytes] = {}
        self._queued: dict[bytes, list[tuple[str, asyncio.Future[Outgoing]]]] = {}
        self._wake: dict[bytes, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._clients = 0
        self._pace: dict[str, tuple[MovingWindowRateLimiter, Any]] = {}
        self.on_ready: Callable[[], None] | None = None

    # --- running -------------------------------------------------------------------------

    async def run(self) -> None:
        self._prepare_socket()
        for room in self.client.rooms():
            self.rooms[room.room_id] = room
        self.client.on_line = self._on_line
        old = os.umask(0o177)  # the socket is born 0600: no moment at which others may connect
        try:
            server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        relays = {r.relay for r in self.rooms.values() if r.status == "active"}
        for relay in relays:
            self.connected[relay] = asyncio.Event()
            self._spawn(self._relay(relay))
        if self.on_ready is not None:
            self.on_ready()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for sub in list(self.subscribers):
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(None)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def stop(self) -> None:
        self._stop.set()

    def _prepare_socket(self) -> None:
        run_dir = self.path.parent
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = run_dir.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ClientError(
                f"{run_dir} is not a directory of yours", hint="remove it and start again"
            )
        os.chmod(run_dir, 0o700)
        if len(os.fsencode(self.path)) >= 104:
            raise ClientError(
                "the daemon's socket path is too long for this system",
                hint="use a shorter --home",
            )
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # left by a daemon that did not stop cleanly
            else:
                raise ClientError("a daemon is already running for this profile")
            finally:
                probe.close()

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- relays --------------------------------------------------------------------------

    async def _relay(self, relay: str) -> None:
        """Stay connected to ``relay``: on any drop, reconnect with backoff and catch up."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=1, min=0.5, max=30),
            # Anything: a bug met on one frame must not end the daemon's link for good.
            retry=retry_if_exception_type(Exception),
        )
        async for attempt in retrying:
            with attempt:
                await self._session(relay)

    async def _session(self, relay: str) -> None:
        rooms = [r for r in self.rooms.values() if r.relay == relay and r.status == "active"]
        if not rooms:
            return
        by_id = {r.room_id: r for r in rooms}
        async with contextlib.AsyncExitStack() as stack:
            # Not under the lock: connecting and catching up wait on the network,
            # and a relay (or a member posting steadily) could stretch that out for
            # ever, stalling every other room. Nothing else touches these rooms'
            # sending state meanwhile: sends wait for `connected`.
            sock = await stack.enter_async_context(self.client.connect(rooms))
            await self.client.pump(sock, rooms, idle=0.05)
            for room in rooms:
                await self.client.retry_stash(room)
            self.socks[relay] = sock
            self.connected[relay].set()
            try:
                while True:
                    frame = await sock.recv()
                    async with self.lock:
                        await self.client.handle_frame(sock, by_id, frame)
            finally:
                self.connected[relay].clear()
                self.socks.pop(relay, None)

    # --- what subscribers see ------------------------------------------------------------

    def _on_line(self, room: Room, line: Line) -> None:
        if not self.subscribers:
            return
        event = line_event(self.client, room, line)
        plain: str | None = None
        for sub in list(self.subscribers):
            if sub.room is not None and sub.room != room.room_id:
                continue
            if sub.text and plain is None:
                plain = format_line(self.client, room, line, False)
            try:
                sub.queue.put_nowait({**event, "line": plain} if sub.text else event)
            except asyncio.QueueFull:
                # Memory stays bounded: a reader this far behind starts again
                # from `read` (its `n` says where it was).
                self.subscribers.discard(sub)
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    # --- the socket ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not same_user(writer) or self._clients >= MAX_CONNECTIONS:
            writer.close()
            return
        self._clients += 1
        write_lock = asyncio.Lock()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        pending: set[asyncio.Task[None]] = set()
        subs: list[Subscriber] = []

        async def write(obj: dict[str, Any]) -> None:
            async with write_lock:
                writer.write(json_text(obj).encode() + b"\n")
                await writer.drain()

        async def answer(request: Any) -> None:
            try:
                response = await self._answer(request, subs, write)
                if response is not None:
                    await write(response)
            except (ConnectionError, RuntimeError):
                pass
            finally:
                slots.release()

        try:
            while not reader.at_eof():
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    too_long = f"a request is at most {MAX_LINE} bytes"
                    await write(error(None, INVALID_REQUEST, too_long))
                    break
                if not raw.strip():
                    continue
                try:
                    request = json.loads(raw)
                except (ValueError, RecursionError):
                    await write(error(None, PARSE_ERROR, "not JSON"))
                    continue
                await slots.acquire()
                task = asyncio.ensure_future(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for sub in subs:
                self.subscribers.discard(sub)
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(None)
            await asyncio.gather(*pending, return_exceptions=True)
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self,
        request: Any,
        subs: list[Subscriber],
        write: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> dict[str, Any] | None:
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
            return error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 request")
        rid = request.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int | str)):
            return error(None, INVALID_REQUEST, "the id must be a number or a string")
        method, params = request.get("method"), request.get("params", {})
        if not isinstance(params, dict):
            return error(rid, BAD_PARAMS, "params must be an object")
        handler = METHODS.get(method) if isinstance(method, str) else None
        if handler is None:
            return error(rid, NO_METHOD, "no such method")
        try:
            if method == "subscribe":
                result = await self._subscribe(params, subs, write, rid)
            else:
                result = await handler(self, params)
        except RpcError as exc:
            return error(rid, exc.code, exc.message, exc.data)
        except ClientError as exc:
            return error(rid, REFUSED, str(exc), {"hint": exc.hint})
        except RelayError as exc:
            code = OFFLINE if exc.code in ("unreachable", "disconnected") else RELAY
            return error(rid, code, str(exc), {"relay_code": exc.code})
        except ProtocolError as exc:
            return error(rid, REFUSED, f"refused: {exc} ({exc.code})")
        except Exception as exc:
            # A bug, not the caller's mistake: answered (never left hanging), and
            # named by type only, since an exception's text may hold what it was handling.
            return error(rid, INTERNAL, f"internal error ({type(exc).__name__})")
        if rid is None:
            return None  # a notification: no answer
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    # --- methods -------------------------------------------------------------------------

    def _room(self, params: dict[str, Any]) -> Room:
        query = param(params, "room", str)
        room_id = self._names.get(query)
        if room_id is None or room_id not in self.rooms:
            room_id = self.client.room(query).room_id
            if room_id not in self.rooms:
                raise ClientError("that room is not open in the daemon", hint="restart the daemon")
            if len(self._names) > 4096:
                self._names.clear()
            self._names[query] = room_id
        return self.rooms[room_id]

    async def m_version(self, params: dict[str, Any]) -> dict[str, Any]:
        from importlib.metadata import version

        return {"version": version("backchannel"), "schema": 1}

    async def m_rooms(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [room_json(r) for r in self.rooms.values()]

    async def m_members(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        room = self._room(params)
        return [member_json(m) for m in self.client.members(room)]

    async def m_read(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        room = self._room(params)
        after = param(params, "after", int, -1)
        limit = min(param(params, "limit", int, 10_000), 10_000)
        lines = self.client.lines(room, after)[: max(0, limit)]
        text = param(params, "format", str, "json") == "text"
        out = []
        for line in lines:
            event = line_event(self.client, room, line)
            if text:
                # The command's own plain rendering, so `read` reads the same either way.
                event["line"] = format_line(self.client, room, line, False)
            out.append(event)
        return out

    async def m_send(self, params: dict[str, Any]) -> dict[str, Any]:
        room = self._room(params)
        text = param(params, "text", str)
        to = param(params, "to", str, None)
        if not text:
            raise RpcError(BAD_PARAMS, "nothing to send")
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise RpcError(BAD_PARAMS, "the text is not valid Unicode (a lone surrogate)") from None
        if size > MAX_ENVELOPE_SIZE:
            # Refused before it is queued: memory holds only what could be sent.
            raise ClientError(
                f"this message is {size:,} bytes; the protocol takes at most "
                f"{MAX_ENVELOPE_SIZE:,}", hint="shorten it or split it"
            )
        sock = await self._sock(room)
        if to is not None:
            member = self.client.member(room, to)
            async with self.lock:
                mid = await self.client.send_text(sock, room, text, to=member.key.sign)
            return {"id": mid.hex(), "room": room.room_id.hex(), "ts": self.client.now()}
        item = await self._enqueue(room, text)
        if item.error is not None:
            raise item.error
        assert item.mid is not None
        answer: dict[str, Any] = {"id": item.mid.hex(), "room": room.room_id.hex(), "ts": item.ts}
        if item.queued:
            answer["queued"] = True
        return answer

    async def m_stop(self, params: dict[str, Any]) -> dict[str, Any]:
        self.stop()
        return {"stopping": True}

    async def _subscribe(
        self,
        params: dict[str, Any],
        subs: list[Subscriber],
        write: Callable[[dict[str, Any]], Awaitable[None]],
        rid: Any,
    ) -> dict[str, Any]:
        if len(subs) >= MAX_SUBSCRIPTIONS:
            raise RpcError(BAD_PARAMS, f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        room = None if params.get("room") is None else self._room(params).room_id
        sub = Subscriber(room, text=param(params, "format", str, "json") == "text")
        self.subscribers.add(sub)
        subs.append(sub)

        async def forward() -> None:
            while True:
                event = await sub.queue.get()
                if event is None:
                    with contextlib.suppress(Exception):
                        await write(
                            {
                                "jsonrpc": "2.0",
                                "method": "dropped",
                                "params": {"reason": "too far behind, or the daemon stopped"},
                            }
                        )
                    return
                await write({"jsonrpc": "2.0", "method": "line", "params": event})

        self._spawn(forward())
        return {"subscribed": True}

    async def _sock(self, room: Room) -> RelaySocket:
        if room.status != "active":
            raise ClientError("you are no longer a member of this room")
        event = self.connected.get(room.relay)
        if event is None:
            raise RpcError(OFFLINE, "this room's relay is not connected")
        try:
            async with asyncio.timeout(CONNECT_WAIT):
                while (sock := self.socks.get(room.relay)) is None:
                    await event.wait()
                    await asyncio.sleep(0)  # the link may have dropped again meanwhile
        except TimeoutError:
            raise RpcError(OFFLINE, "the relay is unreachable; try again later") from None
        return sock

    # --- the send queue: many callers, one batch per room at a time ------------------------

    async def _enqueue(self, room: Room, text: str) -> Outgoing:
        if sum(len(q) for q in self._queued.values()) >= MAX_QUEUED:
            raise RpcError(BUSY, "too many messages waiting; slow down")
        future: asyncio.Future[Outgoing] = asyncio.get_running_loop().create_future()
        queue = self._queued.setdefault(room.room_id, [])
        queue.append((text, future))
        if room.room_id not in self._wake:
            self._wake[room.room_id] = asyncio.Event()
            self._spawn(self._room_sender(room))
        self._wake[room.room_id].set()
        return await future

    async def _room_sender(self, room: Room) -> None:
        try:
            await self._room_sender_loop(room)
        finally:
            # Whatever ended it (a bug, a cancel): nobody waits for ever, and the
            # next send starts a new one.
            self._wake.pop(room.room_id, None)
            for _, future in self._queued.pop(room.room_id, []):
                if not future.done():
                    future.set_exception(RpcError(INTERNAL, "the room's sender stopped"))

    async def _room_sender_loop(self, room: Room) -> None:
        wake = self._wake[room.room_id]
        window = asyncio.Semaphore(2)
        while True:
            await wake.wait()
            wake.clear()
            queue = self._queued[room.room_id]
            size = await self._batch_size(room)
            while queue:
                batch = queue[:size]
                del queue[:size]
                # Kept to the relay's advertised rate: a script is paced here rather
                # than refused there (a refused message goes again later, behind
                # those sent meanwhile).
                await self._paced(room, len(batch))
                # Acknowledgements are awaited while the next batch is sealed;
                # two batches in flight keep the relay busy, and stay under its
                # `max_inflight_writes`, past which it would say busy (and a
                # message sent again later would land after those behind it).
                await window.acquire()
                try:
                    sock = await self._sock(room)
                    async with self.lock:
                        items = await self.pipeline.seal(sock, room, [t for t, _ in batch])
                except Exception as exc:  # every caller of the batch hears why
                    window.release()
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                settling = self._spawn(self._settle(sock, room, items, [f for _, f in batch]))
                settling.add_done_callback(lambda _t: window.release())

    async def _batch_size(self, room: Room) -> int:
        """Half of what the relay lets one connection have in flight (two batches
        are), less a margin for the pairwise sends and acks that share the count,
        and no more than its rate limit lets go at once."""
        try:
            limits = await self.client.http(room.relay).limits()
        except Exception:  # an unreadable answer too: the safe size
            return MIN_BATCH
        _, item = self._pace_for(room.relay, limits)
        size = min(MAX_BATCH, (limits["max_inflight_writes"] - 16) // 2, item.amount)
        return max(1, size)

    def _pace_for(self, relay: str, limits: dict[str, Any]) -> tuple[MovingWindowRateLimiter, Any]:
        if relay not in self._pace:
            rate, burst = float(limits["send_rate_per_second"]), int(limits["send_burst"])
            # A moving window of `burst` per burst/rate seconds never exceeds the
            # relay's token bucket; a few sends are left for pairwise messages.
            amount = max(1, burst - PACE_MARGIN)
            seconds = max(1, math.ceil(burst / rate))
            self._pace[relay] = (
                MovingWindowRateLimiter(MemoryStorage()),
                RateLimitItemPerSecond(amount, seconds),
            )
        return self._pace[relay]

    async def _paced(self, room: Room, count: int) -> None:
        try:
            limits = await self.client.http(room.relay).limits()
        except Exception:
            return  # the relay's own limits still hold; nothing to keep to
        limiter, item = self._pace_for(room.relay, limits)
        count = min(count, item.amount)
        while not await limiter.hit(item, "send", cost=count):
            stats = await limiter.get_window_stats(item, "send")
            await asyncio.sleep(max(0.01, stats.reset_time - time.time()))

    async def _settle(
        self,
        sock: RelaySocket,
        room: Room,
        items: list[Outgoing],
        futures: list[asyncio.Future[Outgoing]],
    ) -> None:
        try:
            await self.pipeline.settle(sock, room, items)
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for item, future in zip(items, futures, strict=True):
            if not future.done():
                future.set_result(item)


METHODS: dict[str, Callable[[Daemon, dict[str, Any]], Awaitable[Any]]] = {
    "version": Daemon.m_version,
    "rooms": Daemon.m_rooms,
    "members": Daemon.m_members,
    "read": Daemon.m_read,
    "send": Daemon.m_send,
    "stop": Daemon.m_stop,
    "subscribe": Daemon.m_rooms,  # dispatched by name in _answer (it needs the connection)
}
