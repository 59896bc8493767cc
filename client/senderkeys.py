"""Sender keys: ours (made, rotated, sealed under, handed out) and other members'.

Each member encrypts to the room under its own sender key (rooms.md). Ours is
one row per room with a record of who already holds its current generation;
we make a new one whenever someone leaves or is removed, and hand it to every
current member over our pairwise sessions. Inbound keys are one row per
``(owner, generation)``, so opening a message reads and writes the one key it
names. A departure retires every inbound key: later epochs under it are refused.
"""

from __future__ import annotations

from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import Value
from backchannel.protocol.errors import ProtocolError, UnknownSenderKey
from backchannel.protocol.senderkey import (
    InboundSenderKey,
    OutboundSenderKey,
    SenderKeyDistribution,
)

from .context import Context
from .peers import Peers
from .records import DistributionRecord, ProfileRecord, Table
from .relay import RelayError, RelaySocket
from .room import Room
from .sessions import Sessions
from .transcript import Transcript


def _inbound_key(room: Room, owner: bytes, generation: int) -> bytes:
    return room.room_id + owner + generation.to_bytes(4, "big")


class SenderKeys:
    def __init__(
        self, ctx: Context, sessions: Sessions, peers: Peers, transcript: Transcript
    ) -> None:
        self.ctx, self.sessions, self.peers, self.transcript = ctx, sessions, peers, transcript
        self._out: Table[OutboundSenderKey] = Table(ctx.store, "outkey", OutboundSenderKey)
        self._dist: Table[DistributionRecord] = Table(ctx.store, "dist", DistributionRecord)
        self._in: Table[InboundSenderKey] = Table(ctx.store, "inkey", InboundSenderKey)

    # --- ours ------------------------------------------------------------------------------

    def outbound(self, room: Room) -> OutboundSenderKey:
        key = self._out.get(room.room_id)
        if key is None:
            raise ProtocolError("no sender key for this room")
        return key

    def rotate(self, room: Room, since: int) -> None:
        """A new generation from log position ``since``; nobody holds it yet."""
        out = OutboundSenderKey.generate(
            room.room_id, room.me, since=since, previous=self._out.get(room.room_id)
        )
        self._out.put(room.room_id, out)
        self._dist.put(room.room_id, DistributionRecord(generation=out.generation, to=[]))

    def seal(self, room: Room, body: bytes) -> bytes:
        """Encrypt and sign ``body`` for the room (inside the caller's transaction)."""
        out = self.outbound(room)
        envelope = out.seal(body, room.state.epoch)
        self._out.put(room.room_id, out)
        return envelope

    async def distribute(self, sock: RelaySocket, room: Room, profile: ProfileRecord) -> None:
        """Make sure every current member has our current sender key (and our profile)."""
        out = self.outbound(room)
        record = self._dist.get(room.room_id)
        done = set() if record is None else set(record.to)
        for member in room.state.members.values():
            sign = member.key.sign
            if sign == room.me or sign in done:
                continue
            payload: dict[str, Value] = {"skd": out.distribution().to_bytes(), "t": "keys"}
            if room.state.rules.mode != "anonymous":
                payload["name"] = profile.name
                if profile.affiliation:
                    payload["aff"] = profile.affiliation
            if room.state.role_of(room.me) == "facilitator" and room.title:
                payload["title"] = room.title
            try:
                await self.sessions.send(sock, room, member.key, payload)
            except (RelayError, ProtocolError):
                continue  # reported; retried on the next send
            done.add(sign)
            self._dist.put(
                room.room_id, DistributionRecord(generation=out.generation, to=sorted(done))
            )

    # --- others' ---------------------------------------------------------------------------

    def inbound(self, room: Room, owner: bytes, generation: int) -> InboundSenderKey | None:
        return self._in.get(_inbound_key(room, owner, generation))

    def save_inbound(self, room: Room, key: InboundSenderKey) -> None:
        self._in.put(_inbound_key(room, key.owner, key.generation), key, scope=room.room_id)

    def inbound_keys(self, room: Room) -> list[InboundSenderKey]:
        return list(self._in.scan(room.room_id))

    def retire_all(self, room: Room, pos: int) -> None:
        """Someone left at ``pos``: no key made before it opens a later epoch."""
        for key in self.inbound_keys(room):
            key.retire(pos)
            self.save_inbound(room, key)

    def accept(self, room: Room, sender: bytes, dist: SenderKeyDistribution) -> None:
        """A sender key ``sender`` handed us over our pairwise session."""
        if dist.owner != sender or dist.room_id != room.room_id:
            raise UnknownSenderKey("a sender key for someone else")
        if self.inbound(room, sender, dist.generation) is not None:
            return
        previous = self.inbound(room, sender, dist.generation - 1) if dist.generation else None
        if previous is not None and previous.index < dist.prev_count:
            # The sender says how many it sent under its old key: a
            # dropped tail shows up here rather than as silence.
            lost = dist.prev_count - previous.index + len(previous.missing())
            self.transcript.warn(
                room,
                f"{lost} message(s) from {self.peers.display_name(room, sender)} "
                "under their previous key never arrived",
            )
        key = InboundSenderKey.from_distribution(dist)
        # A departure after the key was made retires it like the others.
        for event_pos in range(dist.since + 1, room.state.length):
            if isinstance(room.log.decoded(event_pos), L.RemoveEvent | L.LeaveEvent):
                key.retire(event_pos)
                break
        self.save_inbound(room, key)
