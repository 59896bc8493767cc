"""The room log from this client's side: create, invite, join, remove, leave, and sync.

Everything the client believes about who is in a room comes from a log it
validated itself (:class:`~backchannel.protocol.roomlog.RoomLog`); the relay's
answers are hints. A log that does not validate locks the room (*compromised*,
with the reason) and nothing is encrypted to it again (DESIGN.md §1.3).
What follows an event locally (a departure retires inbound keys and rotates
ours; joins and rule changes are noticed) happens here too.
"""

from __future__ import annotations

from collections.abc import Callable

from backchannel.protocol import roomlog as L
from backchannel.protocol import shortcode as S
from backchannel.protocol.errors import ProtocolError
from backchannel.protocol.invite import InviteCode
from backchannel.protocol.keys import MemberKeyPair

from .context import Context
from .errors import ClientError
from .peers import Peers
from .prekeys import Prekeys
from .relay import RelayError
from .room import Room, Rooms, require_usable
from .rulechanges import after_admin_event
from .senderkeys import SenderKeys
from .transcript import Transcript


class Membership:
    def __init__(
        self,
        ctx: Context,
        rooms: Rooms,
        senderkeys: SenderKeys,
        prekeys: Prekeys,
        peers: Peers,
        transcript: Transcript,
    ) -> None:
        self.ctx, self.rooms, self.senderkeys = ctx, rooms, senderkeys
        self.prekeys, self.peers, self.transcript = prekeys, peers, transcript

    # --- create, invite, join ------------------------------------------------------------

    async def create_room(
        self, relay: str, title: str, rules: L.Rules, *, token: str | None = None
    ) -> Room:
        key = MemberKeyPair.generate()
        event = L.make_create(key, rules, self.ctx.now())
        await self.ctx.http(relay).create_room(event, token)
        room = Room(
            room_id=L.event_hash(event),
            name=self.rooms.local_name(title),
            title=title,
            relay=relay,
            key=key,
            log=L.validate_log([event]),
        )
        with self.ctx.store.transaction():
            self.rooms.add(room)
            self.transcript.raise_floor(room)  # nothing can have been sent here before
            self.senderkeys.rotate(room, since=0)
        await self.prekeys.upload(room, fresh=True)
        return room

    async def invite(self, room: Room, role: L.Role, expires: int, uses: int) -> str:
        await self.sync_log(room)
        require_usable(room)
        if room.state.role_of(room.me) != "facilitator":
            raise ClientError("only a facilitator can invite")
        now = self.ctx.now()
        event, secret = S.make_invite(room.key, room.state, role, now + expires, uses, now)
        await self._append(room, event)
        return S.ShortCode.for_room(room.relay, room.state, secret).to_text()

    async def preview(
        self, code_text: str, relay: str | None = None
    ) -> tuple[S.AnyCode, L.RoomLog, L.Invite]:
        """Fetch and validate the room an invite code names, before joining.
        ``relay`` is where a short code without an address is looked up."""
        try:
            code = S.read_invite(code_text, relay)
        except ProtocolError as exc:
            raise ClientError(f"this is not a valid invite code: {exc}") from None
        http = self.ctx.http(code.relay_url)
        try:
            if isinstance(code, InviteCode):
                events = await http.preview(code.room_id, code.invite_seed)
            else:
                events = await http.invite_log(code.invite_seed)
        except RelayError as exc:
            if exc.code in ("invalid_invite", "not_found", "unknown_invite"):
                raise ClientError(
                    "the invite is expired, used up or unknown", hint="ask for a new one"
                ) from None
            raise
        try:
            log = L.validate_log(events)
            invite = code.check_state(log.state)
        except ProtocolError as exc:
            raise ClientError(f"the relay served a room that does not check out: {exc}") from None
        if invite.uses_left <= 0 or invite.expires <= self.ctx.now():
            raise ClientError("the invite is expired or used up", hint="ask for a new one")
        return code, log, invite

    async def join(
        self,
        code_text: str,
        *,
        accept_rules: Callable[[L.Rules], bool],
        relay: str | None = None,
    ) -> Room:
        code, log, _invite = await self.preview(code_text, relay)
        room_id = log.state.room_id  # the code's own, checked (a short code has none)
        if not accept_rules(log.state.rules):
            raise ClientError("you did not accept the room's rules; nothing was done")
        key = MemberKeyPair.generate()
        event = L.make_join(key, code.invite_seed, log.state, self.ctx.now())
        try:
            await self.ctx.http(code.relay_url).append(room_id, event)
        except RelayError as exc:
            raise ClientError(f"the relay refused the join: {exc}") from None
        log.append(event)
        room = Room(
            room_id=room_id,
            name=self.rooms.local_name(self.rooms.placeholder(room_id)),
            title="",
            relay=code.relay_url,
            key=key,
            log=log,
        )
        with self.ctx.store.transaction():
            self.rooms.add(room)
            self.transcript.raise_floor(room)  # nothing before our join is ours to read
            self.senderkeys.rotate(room, since=log.state.pos)
        await self.prekeys.upload(room, fresh=True)
        return room

    async def _append(self, room: Room, event: bytes) -> None:
        try:
            await self.ctx.http(room.relay).append(room.room_id, event)
        except RelayError as exc:
            if exc.code in ("chain_broken", "conflict"):
                raise ClientError(
                    "the room changed meanwhile; try again", hint="run `backchannel read`"
                ) from None
            raise
        await self.sync_log(room)

    async def remove(self, room: Room, member: bytes) -> None:
        await self.sync_log(room)
        require_usable(room)
        if room.state.role_of(room.me) != "facilitator":
            raise ClientError("only a facilitator can remove members")
        await self._append(room, L.make_remove(room.key, room.state, member, self.ctx.now()))

    async def leave(self, room: Room, *, force: bool = False) -> None:
        if room.status == "left":
            raise ClientError("you already left this room")
        await self.sync_log(room)
        if room.status == "removed":
            raise ClientError("you were removed from this room; there is nothing to leave")
        require_usable(room)
        state = room.state
        others = [m for m in state.members.values() if m.key.sign != room.me]
        if (
            not force
            and state.role_of(room.me) == "facilitator"
            and others
            and not any(m.role == "facilitator" for m in others)
        ):
            # Nobody could invite, remove or change the rules after us, for good.
            raise ClientError(
                "you are this room's only facilitator: without you nobody could invite, "
                "remove or change the rules again",
                hint="invite a co-facilitator first (`backchannel invite ROOM --role "
                "facilitator`), or leave anyway with --force",
            )
        await self._append(room, L.make_leave(room.key, state, self.ctx.now()))

    # --- the log ---------------------------------------------------------------------------

    async def sync_log(self, room: Room) -> list[L.Event]:
        """Fetch and validate new log events; act on joins and departures."""
        if room.status == "compromised":
            return []
        first = len(room.log)
        try:
            events = await self.ctx.http(room.relay).events(
                room.room_id, first - 1, room.key.sign_seed
            )
        except RelayError as exc:
            if exc.status in (401, 403) and room.status == "active":
                # We can no longer read the log: we were removed. Confirmed
                # only by the log itself, so keep the status until we see it.
                return []
            raise
        new: list[L.Event] = []
        for data in events:
            try:
                room.log.append(data)
            except L.DuplicateEvent:
                # Harmless (the chain makes it a no-op) but not what an honest relay does.
                self.transcript.warn(room, "the relay re-sent a log event we already had; ignored")
                continue
            except ProtocolError as exc:
                self.compromise(room, f"the room log does not validate ({exc.code})")
                break
            new.append(room.log.decoded(room.log.state.pos))
        with self.ctx.store.transaction():
            self.rooms.save_events(room, first)
            for event in new:
                self.after_event(room, event)
            self.rooms.save(room)
        if new:
            # Now rather than at the next line shown (members came or went, so
            # names may collide): a room message then reads only its sender's row.
            self.peers.refresh(room)
        return new

    def after_event(self, room: Room, event: L.Event) -> None:
        if isinstance(event, L.RemoveEvent | L.LeaveEvent):
            removed = isinstance(event, L.RemoveEvent)
            gone = event.target if isinstance(event, L.RemoveEvent) else event.author
            if gone == room.me:
                room.status = "removed" if removed else "left"
                self.transcript.notice(
                    room, "you were removed from this room" if removed else "you left this room"
                )
                return
            self.senderkeys.retire_all(room, event.pos)
            self.senderkeys.forget(room, gone)
            self.senderkeys.rotate(room, since=event.pos)
            # The name is filled in when the line is shown (records.LineRecord):
            # one baked in now would keep a pseudonym after the profile arrives.
            self.transcript.notice(
                room,
                f"{{who}} {'was removed' if removed else 'left'}; keys rotated",
                about=gone,
                sent=event.ts * 1000,
            )
        elif isinstance(event, L.JoinEvent) and event.member.sign != room.me:
            # At the join's own time, so that what the joiner said since comes after it.
            self.transcript.notice(
                room, "{who} joined", about=event.member.sign, sent=event.ts * 1000
            )
        elif isinstance(event, L.SetRoleEvent | L.SetRulesEvent | L.RevokeEvent):
            after_admin_event(self.transcript, room, event)

    def compromise(self, room: Room, reason: str) -> None:
        room.status = "compromised"
        room.problem = reason
        with self.ctx.store.transaction():
            self.rooms.save(room)
            self.transcript.warn(room, reason)
