"""Rooms: creation, the hash-chained log and the validated state it yields, membership.

The log head and validated room state live in ``rooms`` and membership in
``room_members``, so any relay instance can validate the next event without
in-process state; concurrent appends are settled by a conditional update on
the head (see :meth:`RoomStore.append_event`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backchannel.protocol import errors as perr
from backchannel.protocol import roomlog

from ..errors import RelayError, from_protocol
from .engine import BaseStore
from .housekeeping import spend_token
from .models import LogEvent, Room, RoomMember, coarse


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
                if not await spend_token(session, token):
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
            return await self.commit_once(run)
        except RelayError as exc:
            if exc.code != "conflict":
                raise
            return Appended(0, state.head, False, event)  # a concurrent identical create won

    async def append_event(
        self,
        room_id: bytes,
        data: bytes,
        *,
        limits: roomlog.LogLimits,
        skew: int,
    ) -> Appended:
        """Validate ``data`` against the stored state and append it, or raise.

        Two appends racing for one position: the conditional update on
        ``(log_len, head)`` lets exactly one commit; the other is re-validated
        against the new head and so fails with ``chain_broken`` (or succeeds
        idempotently if it was the very same event).
        """
        for _ in range(4):
            try:
                async with self.transaction() as session:
                    return await self._append(session, room_id, data, limits, skew)
            except (_Conflict, IntegrityError):
                await asyncio.sleep(0)
        raise RelayError("conflict", 409, "the log moved on concurrently; fetch it and retry")

    async def _append(
        self,
        session: AsyncSession,
        room_id: bytes,
        data: bytes,
        limits: roomlog.LogLimits,
        skew: int,
    ) -> Appended:
        room = await session.get(Room, room_id)
        if room is None:
            raise RelayError("unknown_room", 404)
        digest = roomlog.event_hash(data)
        dup = await session.scalar(
            select(LogEvent.pos).where(LogEvent.room_id == room_id, LogEvent.hash == digest)
        )
        try:
            event = roomlog.decode_event(data, max_size=limits.max_event_size)
            if dup is not None:
                return Appended(dup, digest, False, event)
            state = roomlog.RoomState.from_bytes(room.state)
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
        moved = await session.execute(
            update(Room)
            .where(Room.id == room_id, Room.log_len == state.length, Room.head == state.head)
            .values(
                log_len=new.length,
                head=new.head,
                state=new.to_bytes(),
                retention_seconds=new.rules.retention,
            )
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
        elif isinstance(event, roomlog.SetRoleEvent):
            await session.execute(
                update(RoomMember)
                .where(RoomMember.room_id == room_id, RoomMember.member == event.target)
                .values(role=event.role)
            )
        await session.flush()
        return Appended(new.pos, new.head, True, event)

    async def room_state(self, room_id: bytes) -> roomlog.RoomState:
        async with self.reading() as session:
            data = await session.scalar(select(Room.state).where(Room.id == room_id))
        if data is None:
            raise RelayError("unknown_room", 404)
        return roomlog.RoomState.from_bytes(data)

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
