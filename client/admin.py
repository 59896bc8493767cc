"""A facilitator's levers: roles, rule changes and invites (docs/client.md, "Roles
and rule changes").

Each is one log event (``set_role``, ``set_rules``, ``revoke``) appended through
the relay like a removal; what every member's client then does about it is in
:mod:`.rulechanges`, called from the log's receive path. Every check here
is a courtesy to the user: the log validator (relay and every client) refuses
the same events from anyone who is not a facilitator.

Keys: a role change rotates nothing. Who can *read* does not change (an observer
is still a member and keeps receiving sender keys), and who may *post* is judged
by every reader against its own log, now and at the message's epoch, so an
observer's sender key opens nothing that anyone accepts (client/receive.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from backchannel.protocol import roomlog as L

from .context import Context
from .errors import ClientError
from .membership import Membership
from .room import Room, require_usable
from .rulechanges import ID_LENGTH, ROLE_MEANS
from .transcript import Transcript


@dataclass(frozen=True)
class InviteView:
    """An outstanding invite as the log shows it (the code itself is never in the log)."""

    key: bytes
    role: str
    uses_left: int
    expires: int
    created_pos: int
    creator: bytes

    @property
    def id(self) -> str:
        """A short name for it: the first hex digits of the invite key."""
        return self.key.hex()[:ID_LENGTH]


class Admin:
    def __init__(self, ctx: Context, membership: Membership, transcript: Transcript) -> None:
        self.ctx, self.membership, self.transcript = ctx, membership, transcript

    async def _as_facilitator(self, room: Room, what: str) -> None:
        await self.membership.sync_log(room)
        require_usable(room)
        if room.state.role_of(room.me) != "facilitator":
            raise ClientError(f"only a facilitator can {what}")

    async def set_role(self, room: Room, member: bytes, role: L.Role) -> None:
        if role not in L.ROLES:
            raise ClientError(f"unknown role {role!r}", hint="participant, observer or facilitator")
        await self._as_facilitator(room, "change roles")
        state = room.state
        target = state.members.get(member)
        if target is None:
            raise ClientError("no such member in this room", hint="`backchannel members ROOM`")
        if target.role == role:
            raise ClientError(f"that member is already {ROLE_MEANS[role].split(' (')[0]}")
        if target.role == "facilitator" and state.facilitators() == [member]:
            raise ClientError(
                "you are this room's only facilitator and cannot step down: nobody could "
                "invite, remove or change the rules after you",
                hint="make another member a facilitator first "
                "(`backchannel role ROOM MEMBER facilitator`)",
            )
        event = L.make_set_role(room.key, state, member, role, self.ctx.now())
        await self.membership._append(room, event)

    async def set_rules(self, room: Room, rules: L.Rules) -> None:
        await self._as_facilitator(room, "change the rules")
        current = room.state.rules
        if rules == current:
            raise ClientError("the room already has these rules")
        if current.mode == "anonymous" and rules.mode != "anonymous":
            # Members joined on the promise that their names are never shared; a
            # rule change cannot take that back (their clients keep it regardless).
            raise ClientError(
                "an anonymous room cannot be made named: its members joined on the promise "
                "that their names are never shared",
                hint="create a new room with the rules you want and invite people to it",
            )
        event = L.make_set_rules(room.key, room.state, rules, self.ctx.now())
        await self.membership._append(room, event)

    async def invites(self, room: Room) -> list[InviteView]:
        """The room's outstanding invites: uses left, not expired, creator still a
        facilitator (the others admit nobody)."""
        if room.status == "active":
            await self.membership.sync_log(room)
        state, now = room.state, self.ctx.now()
        return [
            InviteView(pk, inv.role, inv.uses_left, inv.expires, inv.created_pos, inv.creator)
            for pk, inv in sorted(state.invites.items(), key=lambda kv: kv[1].created_pos)
            if inv.uses_left > 0
            and inv.expires > now
            and state.role_of(inv.creator) == "facilitator"
        ]

    async def revoke_invite(self, room: Room, invite: bytes | str) -> InviteView:
        """Withdraw an outstanding invite, named by its key or a hex prefix of it
        (at least 4 digits); returns the invite withdrawn."""
        await self._as_facilitator(room, "revoke invites")
        found = await self.invites(room)
        if isinstance(invite, bytes):
            matches = [i for i in found if i.key == invite]
        else:
            wanted = invite.strip().lower()
            if len(wanted) < 4 or any(c not in "0123456789abcdef" for c in wanted):
                raise ClientError(
                    f"not an invite id: {invite!r}", hint="`backchannel invites ROOM` lists them"
                )
            matches = [i for i in found if i.key.hex().startswith(wanted)]
        if len(matches) != 1:
            raise ClientError(
                "several open invites match that id" if matches else "no open invite with that id",
                hint="`backchannel invites ROOM` lists them",
            )
        event = L.make_revoke(room.key, room.state, matches[0].key, self.ctx.now())
        await self.membership._append(room, event)
        return matches[0]
