"""Rooms: creation, the hash-chained log and the validated state it yields, membership.

The log head, a checkpoint of the validated room state and membership live in
``rooms`` and ``room_members``, so any relay instance can validate the next
event without in-process state; concurrent appends are settled by a
conditional update on the head (see :meth:`RoomStore.append_event`).

Decoding or encoding a room state costs time linear in its size (every invite,
member and departed key), so an append that did both cost 10 ms at 100 events
and 90 ms at 2,500. Instead each instance keeps the states it validated in a
bounded :class:`StateCache` and applies the new event to the cached state,
which costs the same at any length. The cache is only ever a shortcut: an entry
is used only if its head is the database's head, and an instance whose entry
is stale (another instance appended) or missing catches up from the events
after it or after the stored checkpoint, which is rewritten in the background
every so often (:func:`checkpoint_due`), never on the append's own path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backchannel.protocol import errors as perr
from backchannel.protocol import roomlog

from ..errors import RelayError, from_protocol
from ..logging import get_logger
from .engine import BaseStore
from .health import unavailable
from .housekeeping import spend_token
from .models import LogEvent, Room, RoomInvite, RoomMember, coarse

log = get_logger("backchannel.relay.storage")
T = TypeVar("T")

#: Events after the checkpoint that make a new one due: at least the first, at most
#: the second, and an eighth of the log in between, so encoding stays a small share
#: of the appends it covers while a catch-up replays at most a few hundred events.
CHECKPOINT_EVERY = (32, 256)
#: Work above this (state entries, or events to replay) runs in a worker thread, so
#: the event loop keeps serving others while a large state is decoded or encoded.
_OFF_LOOP = 512


def checkpoint_due(state_len: int, length: int) -> bool:
    least, most = CHECKPOINT_EVERY
    return length - state_len >= max(least, min(length // 8, most))


def weight(state: roomlog.RoomState) -> int:
    """A state's size in entries, roughly proportional to its memory and decoding time."""
    return 1 + len(state.members) + len(state.invites) + len(state.departed)


class StateCache:
    """Validated room states by room id, least recently used first, holding at most
    ``budget`` entries in all (see :func:`weight`)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self._states: OrderedDict[bytes, roomlog.RoomState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, room_id: bytes) -> roomlog.RoomState | None:
        state = self._states.get(room_id)
        if state is not None:
            self._states.move_to_end(room_id)
        return state

    def put(self, room_id: bytes, state: roomlog.RoomState) -> None:
        self.drop(room_id)
        cost = weight(state)
        if cost > self.budget:
            return
        while self.size + cost > self.budget:
            _, oldest = self._states.popitem(last=False)
            self.size -= weight(oldest)
        self._states[room_id] = state
        self.size += cost

    def drop(self, room_id: bytes) -> None:
        old = self._states.pop(room_id, None)
        if old is not None:
            self.size -= weight(old)


def _replay(state: roomlog.RoomState, events: Sequence[bytes]) -> roomlog.RoomState:
    # Stored events were accepted under the relay's limits, which never exceed the
    # protocol's defaults; the relay's current settings may be lower, and must not
    # strand a log that was valid when it grew.
    for data in events:
        state = roomlog.apply_event(state, data)
    return state


async def _off_loop(heavy: bool, fn: Callable[..., T], *args: Any) -> T:
    # The states are immutable, so a worker thread may read them while the loop runs.
    return await asyncio.to_thread(fn, *args) if heavy else fn(*args)


@dataclass(frozen=True, slots=True)
class Appended:
    """The outcome of a log append: where the event sits, and whether it is new."""

    pos: int
    head: bytes
    fresh: bool
    event: roomlog.Event


class _Conflict(Exception):
    """Another writer moved the room's head between our read and our write."""


class RoomStore(BaseStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.states = StateCache(self.quotas.state_cache_entries)
        self._checkpoints: dict[bytes, asyncio.Task[None]] = {}

    async def close(self) -> None:
        for task in list(self._checkpoints.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().close()

    # --- the room log ---------------------------------------------------------------

    def _check_not_future(self, event: roomlog.Event, skew: int) -> None:
        # The log only requires times never to decrease, so one far-future event
        # would force every later event to carry that time and make every
        # invite look expired: the relay holds every event to its own clock.
        if event.ts > int(self.clock()) + skew:
            raise RelayError("stale_event", 400, "event time is ahead of the relay's clock")

    async def create_room(
        self,
        data: bytes,
        *,
        limits: roomlog.LogLimits,
        token: str | None,
        need_token: bool,
        skew: int,
    ) -> Appended:
        try:
            state = roomlog.apply_event(None, data, limits=limits)
        except perr.ProtocolError as exc:
            raise from_protocol(exc) from exc
        event = roomlog.decode_event(data, max_size=limits.max_event_size)
        assert isinstance(event, roomlog.CreateEvent)
        self._check_not_future(event, skew)

        async def run(session: AsyncSession) -> Appended:
            existing = await session.scalar(
                select(LogEvent.hash).where(LogEvent.room_id == state.room_id, LogEvent.pos == 0)
            )
            if existing is not None:
                # The id is the hash of the create event: the same room, retried.
                return Appended(0, state.head, False, event)
            if need_token:
                if not token:
                    raise RelayError("creation_token_required", 403)
                spent = await spend_token(session, token, coarse(self.clock()))
                if spent == "used":
                    raise RelayError("creation_token_used", 403)
                if spent != "ok":
                    raise RelayError("bad_creation_token", 403)
            session.add(
                Room(
                    id=state.room_id,
                    head=state.head,
                    log_len=state.length,
                    last_seq=0,
                    retention_seconds=state.rules.retention,
                    created_at=coarse(self.clock()),
                    state=state.to_bytes(),
                    state_len=state.length,
                    stored_bytes=0,
                )
            )
            session.add(LogEvent(room_id=state.room_id, pos=0, hash=state.head, data=data))
            session.add(
                RoomMember(
                    room_id=state.room_id,
                    member=event.member.sign,
                    dh=event.member.dh,
                    role="facilitator",
                    left_pos=None,
                )
            )
            await session.flush()
            return Appended(0, state.head, True, event)

        try:
            appended = await self.commit_once(run)
        except RelayError as exc:
            if exc.code != "conflict":
                raise
            return Appended(0, state.head, False, event)  # a concurrent identical create won
        if appended.fresh:
            self.states.put(state.room_id, state)
        return appended

    async def append_event(
        self,
        room_id: bytes,
        data: bytes,
        *,
        limits: roomlog.LogLimits,
        skew: int,
    ) -> Appended:
        """Validate ``data`` against the room's state at its head and append it, or raise.

        Validation runs outside the write transaction, against the head state
        (:meth:`head_state`); the conditional update on ``(log_len, head)`` then
        commits only if the head is still the one validated against. Two appends
        racing for one position: exactly one commits; the other is re-validated
        against the new head and so fails with ``chain_broken`` (or succeeds
        idempotently if it was the very same event).
        """
        try:
            event = roomlog.decode_event(data, max_size=limits.max_event_size)
        except perr.ProtocolError as exc:
            raise from_protocol(exc) from exc
        digest = roomlog.event_hash(data)
        for _ in range(4):
            try:
                return await self._append(room_id, data, event, digest, limits, skew)
            except (_Conflict, IntegrityError):
                await asyncio.sleep(0)
        raise RelayError("conflict", 409, "the log moved on concurrently; fetch it and retry")

    async def _append(
        self,
        room_id: bytes,
        data: bytes,
        event: roomlog.Event,
        digest: bytes,
        limits: roomlog.LogLimits,
        skew: int,
    ) -> Appended:
        async with self.reading() as session:
            dup = await session.scalar(
                select(LogEvent.pos).where(LogEvent.room_id == room_id, LogEvent.hash == digest)
            )
        if dup is not None:
            return Appended(dup, digest, False, event)
        state, state_len = await self._head_state(room_id)
        try:
            new = roomlog.apply_event(state, data, limits=limits)
        except perr.ProtocolError as exc:
            raise from_protocol(exc) from exc
        self._check_not_future(event, skew)
        now = int(self.clock())
        if isinstance(event, roomlog.JoinEvent):
            # apply_event has no clock; the relay holds joins to its own.
            if abs(event.ts - now) > skew:
                raise RelayError("stale_event", 400, "join time is too far from the relay's clock")
            if now > state.invites[event.invite].expires:
                raise RelayError("invalid_invite", 403, "invite has expired")

        async def run(session: AsyncSession) -> None:
            moved = await session.execute(
                update(Room)
                .where(Room.id == room_id, Room.log_len == state.length, Room.head == state.head)
                .values(log_len=new.length, head=new.head, retention_seconds=new.rules.retention)
            )
            if (moved.rowcount or 0) != 1:  # type: ignore[attr-defined]
                raise _Conflict
            session.add(LogEvent(room_id=room_id, pos=new.pos, hash=new.head, data=data))
            if isinstance(event, roomlog.JoinEvent):
                session.add(
                    RoomMember(
                        room_id=room_id,
                        member=event.member.sign,
                        dh=event.member.dh,
                        role=new.members[event.member.sign].role,
                        left_pos=None,
                    )
                )
            elif isinstance(event, roomlog.RemoveEvent | roomlog.LeaveEvent):
                gone = event.target if isinstance(event, roomlog.RemoveEvent) else event.author
                await session.execute(
                    update(RoomMember)
                    .where(RoomMember.room_id == room_id, RoomMember.member == gone)
                    .values(left_pos=new.pos)
                )
            elif isinstance(event, roomlog.InviteEvent):
                if await session.get(RoomInvite, event.invite) is None:
                    session.add(RoomInvite(invite=event.invite, room_id=room_id))
            elif isinstance(event, roomlog.SetRoleEvent):
                await session.execute(
                    update(RoomMember)
                    .where(RoomMember.room_id == room_id, RoomMember.member == event.target)
                    .values(role=event.role)
                )
            await session.flush()

        async with self.transaction() as session:
            await run(session)
        self.states.put(room_id, new)
        if checkpoint_due(state_len, new.length):
            self._checkpoint_later(room_id, new)
        return Appended(new.pos, new.head, True, event)

    async def _head_state(self, room_id: bytes) -> tuple[roomlog.RoomState, int]:
        """The validated state at the room's head in the database, and the length its
        stored checkpoint was taken at."""
        async with self.reading() as session:
            row = (
                await session.execute(
                    select(Room.head, Room.log_len, Room.state_len).where(Room.id == room_id)
                )
            ).first()
            if row is None:
                raise RelayError("unknown_room", 404)
            cached = self.states.get(room_id)
            if cached is not None and cached.length == row.log_len and cached.head == row.head:
                return cached, row.state_len
            base: roomlog.RoomState | None = None
            if cached is not None and cached.length < row.log_len:
                # Another instance appended since: the cached state still holds if the
                # log it was the head of is a prefix of the stored one.
                at = await session.scalar(
                    select(LogEvent.hash).where(
                        LogEvent.room_id == room_id, LogEvent.pos == cached.length - 1
                    )
                )
                if at == cached.head:
                    base = cached
            try:
                if base is None:
                    blob = await session.scalar(select(Room.state).where(Room.id == room_id))
                    if blob is None:
                        raise RelayError("unknown_room", 404)
                    decoded: roomlog.RoomState = await _off_loop(
                        len(blob) > 64 * _OFF_LOOP, roomlog.RoomState.from_bytes, blob
                    )
                    base = decoded
                events = list(
                    await session.scalars(
                        select(LogEvent.data)
                        .where(
                            LogEvent.room_id == room_id,
                            LogEvent.pos >= base.length,
                            LogEvent.pos < row.log_len,
                        )
                        .order_by(LogEvent.pos)
                    )
                )
                state = await _off_loop(len(events) > _OFF_LOOP // 16, _replay, base, events)
            except perr.ProtocolError as exc:
                log.error("room.state_unreadable", error=exc.code)
                raise RelayError(
                    "internal", 500, "the stored room state does not validate"
                ) from exc
        if state.head != row.head or state.length != row.log_len:
            raise _Conflict  # the checkpoint moved on between our reads; read again
        self.states.put(room_id, state)
        return state, row.state_len

    def _checkpoint_later(self, room_id: bytes, state: roomlog.RoomState) -> None:
        if room_id in self._checkpoints:
            return  # the one under way is recent enough; the next due append retries
        task = asyncio.create_task(self._checkpoint(room_id, state), name="room-checkpoint")
        self._checkpoints[room_id] = task
        task.add_done_callback(lambda _: self._checkpoints.pop(room_id, None))

    async def _checkpoint(self, room_id: bytes, state: roomlog.RoomState) -> None:
        """Store ``state`` (a committed head state) as the room's checkpoint. Best
        effort: a failure only leaves the older checkpoint, and more to replay."""
        try:
            if weight(state) > _OFF_LOOP:
                blob = await asyncio.to_thread(state.to_bytes)
            else:
                blob = state.to_bytes()
            async with self.transaction() as session:
                await session.execute(
                    update(Room)
                    .where(Room.id == room_id, Room.state_len < state.length)
                    .values(state=blob, state_len=state.length)
                )
        except Exception as exc:
            if not unavailable(exc):
                log.warning("room.checkpoint_failed", error=type(exc).__name__)

    async def room_state(self, room_id: bytes) -> roomlog.RoomState:
        for _ in range(4):
            try:
                state, _ = await self._head_state(room_id)
                return state
            except _Conflict:
                await asyncio.sleep(0)
        raise RelayError("conflict", 409, "the log moved on concurrently; retry")

    async def invite_room(self, invite: bytes) -> bytes | None:
        """The room that first published the invite key ``invite``, if any."""
        async with self.reading() as session:
            return await session.scalar(
                select(RoomInvite.room_id).where(RoomInvite.invite == invite)
            )

    async def membership(self, room_id: bytes, member: bytes) -> RoomMember | None:
        async with self.reading() as session:
            return await session.get(RoomMember, (room_id, member))

    async def current_member_among(self, room_id: bytes, keys: list[bytes]) -> bytes | None:
        """One of ``keys`` that is a current member of the room, if any."""
        if not keys:
            return None
        async with self.reading() as session:
            return await session.scalar(
                select(RoomMember.member)
                .where(
                    RoomMember.room_id == room_id,
                    RoomMember.member.in_(keys),
                    RoomMember.left_pos.is_(None),
                )
                .order_by(RoomMember.member)
                .limit(1)
            )

    async def read_events(
        self, room_id: bytes, after: int, limit: int, upto: int | None = None
    ) -> tuple[list[bytes], int]:
        """Events with ``after < pos`` (and ``pos <= upto``), and the log's length."""
        async with self.reading() as session:
            length = await session.scalar(select(Room.log_len).where(Room.id == room_id))
            if length is None:
                raise RelayError("unknown_room", 404)
            query = select(LogEvent.data).where(LogEvent.room_id == room_id, LogEvent.pos > after)
            if upto is not None:
                query = query.where(LogEvent.pos <= upto)
            rows = await session.scalars(query.order_by(LogEvent.pos).limit(limit))
            return list(rows), length

    # --- the catch-up tick (see handlers/fanout.py) -------------------------------------

    async def room_marks(self, rooms: list[bytes]) -> dict[bytes, tuple[int, int, bytes]]:
        """``room -> (last_seq, log_len, head)`` for the listed rooms."""
        out: dict[bytes, tuple[int, int, bytes]] = {}
        async with self.reading() as session:
            for i in range(0, len(rooms), 500):
                rows = await session.execute(
                    select(Room.id, Room.last_seq, Room.log_len, Room.head).where(
                        Room.id.in_(rooms[i : i + 500])
                    )
                )
                out.update({r.id: (r.last_seq, r.log_len, r.head) for r in rows})
        return out

    async def departed_among(self, pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The ``(room, member)`` pairs whose member has left or was removed."""
        gone: list[tuple[bytes, bytes]] = []
        wanted = set(pairs)
        rooms = sorted({room for room, _ in pairs})
        async with self.reading() as session:
            for i in range(0, len(rooms), 500):
                rows = await session.execute(
                    select(RoomMember.room_id, RoomMember.member).where(
                        RoomMember.room_id.in_(rooms[i : i + 500]),
                        RoomMember.left_pos.is_not(None),
                    )
                )
                gone += [(r.room_id, r.member) for r in rows if (r.room_id, r.member) in wanted]
        return gone
