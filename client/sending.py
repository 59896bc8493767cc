"""The send path: connecting to a relay, and sending room messages and sidebars.

A room message is sealed under our sender key and queued in the outbox in one
transaction (:meth:`Sender.send_text`), then sent; the relay answers ``sent``
only once it is durable, and only then does it leave the outbox.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import encode

from .context import Context
from .errors import ClientError
from .membership import Membership
from .outbox import Outbox
from .prekeys import Prekeys
from .records import ProfileRecord
from .relay import RelaySocket
from .room import Room, require_usable
from .senderkeys import SenderKeys
from .sessions import Sessions
from .transcript import Transcript


class Sender:
    def __init__(
        self,
        ctx: Context,
        membership: Membership,
        senderkeys: SenderKeys,
        sessions: Sessions,
        prekeys: Prekeys,
        outbox: Outbox,
        transcript: Transcript,
        profile: Callable[[], ProfileRecord],
    ) -> None:
        self.ctx, self.membership, self.senderkeys = ctx, membership, senderkeys
        self.sessions, self.prekeys, self.outbox = sessions, prekeys, outbox
        self.transcript, self.profile = transcript, profile

    @contextlib.asynccontextmanager
    async def connect(self, rooms: list[Room]) -> AsyncIterator[RelaySocket]:
        relays = {r.relay for r in rooms}
        if len(relays) != 1:
            raise ClientError("one relay at a time")
        active = [r for r in rooms if r.status == "active"]
        sock = await RelaySocket.connect(
            relays.pop(), [r.key for r in active], proxy=self.ctx.proxy
        )
        try:
            await self.outbox.flush(sock, active)
            for room in active:
                await sock.send("sub", room=room.room_id, after=room.cursor)
            for room in active:
                # Newcomers get our sender key and profile as soon as we are
                # online, not only when we next speak.
                await self.membership.sync_log(room)
                if room.status == "active":
                    await self.senderkeys.distribute(sock, room, self.profile())
                    await self.prekeys.replenish(room)
            yield sock
        finally:
            await sock.close()

    async def send_text(
        self, sock: RelaySocket, room: Room, text: str, *, to: bytes | None = None
    ) -> None:
        await self.membership.sync_log(room)
        require_usable(room)
        if to is not None:
            peer = room.state.members.get(to)
            if peer is None:
                raise ClientError("that member is not in the room")
            payload = {"t": "sidebar", "text": text, "ts": self.ctx.now()}
            await self.sessions.send(sock, room, peer.key, payload)
            self.transcript.add(room, "sidebar", text, sender=room.me, to=to)
            return
        if room.state.role_of(room.me) == "observer":
            raise ClientError("observers cannot post in this room")
        await self.senderkeys.distribute(sock, room, self.profile())
        await self.outbox.flush(sock, [room])  # anything older goes first
        cid = P.random_bytes(16)
        with self.ctx.store.transaction():
            body = encode({"t": "text", "text": text, "ts": self.ctx.now()})
            envelope = self.senderkeys.seal(room, body)
            self.outbox.queue(room, cid, envelope)
            self.transcript.add(room, "message", text, sender=room.me)
        await self.outbox.send(sock, room, cid, envelope)
