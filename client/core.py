"""The client library's façade: one person's profile and their rooms, on any relays.

Async, no terminal code. The command and the chat screen use only this class;
the work is done by the parts it wires together (docs/client.md, "Code map"):

- :mod:`.room` — a room and where rooms are kept;
- :mod:`.membership` — the room log: create, invite, join, remove, leave, sync;
- :mod:`.admin` and :mod:`.rulechanges` — roles, rules and invites, and what members
  make of changes to them;
- :mod:`.prekeys` and :mod:`.sessions` — pairwise channels to each member;
- :mod:`.senderkeys` — our sender key (sealed under, rotated, handed out) and others';
- :mod:`.sending` and :mod:`.outbox` — connecting, sending, resending;
- :mod:`.receive` — frames from the relay become lines and state;
- :mod:`.forks` — a room is locked only on evidence (two signed events at one position);
- :mod:`.peers` and :mod:`.transcript` — names, verification, and what is shown.

State lives in the sealed :class:`~.store.Store`, as the typed records of
:mod:`.records`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from backchannel.protocol import roomlog as L
from backchannel.protocol.errors import ProtocolError
from backchannel.protocol.invite import check_relay_url
from backchannel.protocol.safety import SafetyNumber
from backchannel.protocol.shortcode import AnyCode

from .admin import Admin, InviteView
from .context import Context
from .errors import ClientError
from .forks import Forks
from .membership import Membership
from .outbox import Outbox
from .peers import MemberView, NameTag, Peers, pseudonym
from .prekeys import Prekeys
from .receive import Receiver
from .records import ProfileRecord, Table
from .relay import Frame, RelayHttp, RelaySocket
from .room import Room, Rooms
from .senderkeys import SenderKeys
from .sending import Sender
from .sessions import Sessions
from .store import Store
from .transcript import Line, Transcript

__all__ = [
    "Client",
    "ClientError",
    "InviteView",
    "Line",
    "MemberView",
    "NameTag",
    "Room",
    "pseudonym",
]


def _profiles(store: Store) -> Table[ProfileRecord]:
    return Table(store, "profile", ProfileRecord)


def _own_name(store: Store) -> str | None:
    found = _profiles(store).get(b"me")
    return None if found is None else found.name


class Client:
    """One person's profile: their rooms on any number of relays."""

    def __init__(
        self,
        store: Store,
        *,
        proxy: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ctx = ctx = Context(store, proxy=proxy, clock=clock)
        self.transcript = Transcript(ctx)
        self.room_store = Rooms(store)
        self.peers = Peers(store, own_name=lambda: _own_name(store))
        self.prekeys = Prekeys(ctx, self.transcript)
        self.sessions = Sessions(ctx, self.prekeys, self.peers, self.transcript)
        self.senderkeys = SenderKeys(ctx, self.sessions, self.peers, self.transcript)
        self.outbox = Outbox(ctx, self.transcript)
        self.membership = Membership(
            ctx, self.room_store, self.senderkeys, self.prekeys, self.peers, self.transcript
        )
        self.admin = Admin(ctx, self.membership, self.transcript)
        self.forks = Forks(
            ctx, self.room_store, self.membership, self.sessions, self.peers, self.transcript
        )
        self.receiver = Receiver(
            ctx,
            self.room_store,
            self.membership,
            self.senderkeys,
            self.sessions,
            self.peers,
            self.transcript,
            self.forks,
        )
        self.receiver.profile = self.profile
        self.sender = Sender(
            ctx,
            self.membership,
            self.senderkeys,
            self.sessions,
            self.prekeys,
            self.outbox,
            self.transcript,
            self.profile,
        )
        # Disappearing messages: lapsed local copies go as soon as the profile is opened.
        store.purge_expired(self.now())

    # --- profile -------------------------------------------------------------------------

    @staticmethod
    def init_profile(store: Store, relay: str, name: str, affiliation: str | None = None) -> None:
        profiles = _profiles(store)
        if profiles.get(b"me") is not None:
            raise ClientError("a profile already exists here", hint="use another --home")
        try:
            check_relay_url(relay)
        except ProtocolError as exc:
            raise ClientError(f"not a usable relay URL: {exc}") from None
        profiles.put(b"me", ProfileRecord(name=name, relay=relay, affiliation=affiliation or None))

    def update_profile(
        self, *, name: str | None = None, relay: str | None = None, affiliation: str | None = None
    ) -> ProfileRecord:
        """Change our name, affiliation (``""`` clears it) or the relay new rooms are
        made on. Rooms keep the relay they are on; a new name or affiliation goes to
        every member again at our next connection to each room."""
        current = self.profile()
        if relay is not None:
            try:
                check_relay_url(relay)
            except ProtocolError as exc:
                raise ClientError(f"not a usable relay URL: {exc}") from None
        updated = ProfileRecord(
            name=current.name if name is None else name,
            relay=current.relay if relay is None else relay,
            affiliation=current.affiliation if affiliation is None else affiliation or None,
        )
        with self.store.transaction():
            _profiles(self.store).put(b"me", updated)
            if (updated.name, updated.affiliation) != (current.name, current.affiliation):
                for room in self.rooms():
                    self.senderkeys.redistribute(room)
        for room in self.rooms():
            self.peers.refresh(room)  # our own label is in each room's table
        return updated

    def profile(self) -> ProfileRecord:
        found = _profiles(self.store).get(b"me")
        if found is None:
            raise ClientError(
                "no profile yet", hint="run `backchannel init --relay URL --name NAME`"
            )
        return found

    def now(self) -> int:
        return self.ctx.now()

    def http(self, relay: str) -> RelayHttp:
        return self.ctx.http(relay)

    async def aclose(self) -> None:
        await self.ctx.aclose()

    @property
    def notices(self) -> list[tuple[bytes, str]]:
        return self.transcript.notices

    @property
    def on_line(self) -> Callable[[Room, Line], None] | None:
        return self.transcript.on_line

    @on_line.setter
    def on_line(self, callback: Callable[[Room, Line], None] | None) -> None:
        self.transcript.on_line = callback

    # --- rooms -----------------------------------------------------------------------------

    def rooms(self) -> list[Room]:
        return self.room_store.all()

    def room(self, query: str) -> Room:
        """A room by local name, title or unique id prefix."""
        return self.room_store.find(query)

    async def create_room(self, title: str, rules: L.Rules, *, token: str | None = None) -> Room:
        return await self.membership.create_room(self.profile().relay, title, rules, token=token)

    async def invite(self, room: Room, role: L.Role, expires: int, uses: int) -> str:
        return await self.membership.invite(room, role, expires, uses)

    async def preview(self, code_text: str) -> tuple[AnyCode, L.RoomLog, L.Invite]:
        return await self.membership.preview(code_text, self._own_relay())

    async def join(self, code_text: str, *, accept_rules: Callable[[L.Rules], bool]) -> Room:
        return await self.membership.join(
            code_text, accept_rules=accept_rules, relay=self._own_relay()
        )

    def _own_relay(self) -> str | None:
        # A short code read aloud may come without the address: most often it is
        # for the relay the joiner's organiser gave them at `init`.
        found = _profiles(self.store).get(b"me")
        return None if found is None else found.relay

    async def remove(self, room: Room, member: bytes) -> None:
        await self.membership.remove(room, member)

    async def leave(self, room: Room, *, force: bool = False) -> None:
        await self.membership.leave(room, force=force)

    async def sync_log(self, room: Room) -> list[L.Event]:
        return await self.membership.sync_log(room)

    # --- a facilitator's levers (client/admin.py) ------------------------------------------

    async def set_role(self, room: Room, member_sign: bytes, role: L.Role) -> None:
        await self.admin.set_role(room, member_sign, role)

    async def set_rules(self, room: Room, rules: L.Rules) -> None:
        await self.admin.set_rules(room, rules)

    async def invites(self, room: Room) -> list[InviteView]:
        return await self.admin.invites(room)

    async def revoke_invite(self, room: Room, invite: bytes | str) -> InviteView:
        return await self.admin.revoke_invite(room, invite)

    # --- what is shown ---------------------------------------------------------------------

    def lines(self, room: Room, after: int = -1) -> list[Line]:
        return self.transcript.lines(room, after)

    def display_name(self, room: Room, sign: bytes, *, as_you: bool = True) -> str:
        return self.peers.display_name(room, sign, as_you=as_you)

    def tag(self, room: Room, sign: bytes, *, as_you: bool = True) -> NameTag:
        return self.peers.tag(room, sign, as_you=as_you)

    def tags(self, room: Room) -> dict[bytes, NameTag]:
        return self.peers.tags(room)

    def members(self, room: Room) -> list[MemberView]:
        return self.peers.members(room)

    def member(
        self, room: Room, query: str, *, yourself: ClientError | None = None
    ) -> MemberView:
        return self.peers.find(room, query, yourself=yourself)

    def safety(self, room: Room, member: MemberView) -> SafetyNumber:
        return self.peers.safety(room, member)

    def mark_verified(self, room: Room, member: MemberView) -> None:
        with self.store.transaction():
            self.peers.mark_verified(room, member)

    # --- live connection -------------------------------------------------------------------

    def connect(self, rooms: list[Room]) -> AbstractAsyncContextManager[RelaySocket]:
        return self.sender.connect(rooms)

    async def send_text(
        self, sock: RelaySocket, room: Room, text: str, *, to: bytes | None = None
    ) -> bytes:
        """Send ``text`` (a sidebar with ``to``); returns its message id."""
        return await self.sender.send_text(sock, room, text, to=to)

    def queue_text(self, room: Room, text: str) -> bytes:
        """Seal and queue a room message while the relay is unreachable; its id."""
        return self.sender.queue_text(room, text)

    async def replenish_prekeys(self, room: Room) -> None:
        await self.prekeys.replenish(room)

    async def pump(
        self, sock: RelaySocket, rooms: list[Room], *, idle: float = 0.5, forever: bool = False
    ) -> None:
        await self.receiver.pump(sock, rooms, idle=idle, forever=forever)

    async def handle_frame(self, sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        await self.receiver.handle_frame(sock, rooms, frame)

    async def handle_frames(
        self, sock: RelaySocket, rooms: dict[bytes, Room], frames: list[Frame]
    ) -> None:
        """Several frames in order; room messages share one local transaction."""
        await self.receiver.handle_frames(sock, rooms, frames)

    async def retry_stash(self, room: Room) -> None:
        await self.receiver.retry_stash(room)

