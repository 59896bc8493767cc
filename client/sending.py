"""The send path: connecting to a relay, and sending room messages and sidebars.

A room message is sealed under our sender key and queued in the outbox in one
transaction (:meth:`Sender.send_text`), then sent; the relay answers ``sent``
only once it is durable, and only then does it leave the outbox.

A message the relay would refuse for its size is refused here instead, before
anything is stored, shown or sent: the relay's limits (``GET /v1/limits``) are
checked against the exact sealed bytes, inside the transaction that would
store them, so a refusal rolls the sender-key step back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from backchannel.protocol import padding
from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import encode
from backchannel.protocol.envelope import MAX_ENVELOPE_SIZE
from backchannel.protocol.errors import FieldTooLong
from backchannel.protocol.ratchet import MAX_PAIRWISE_SIZE

from .context import Context
from .errors import ClientError
from .membership import Membership
from .outbox import Outbox
from .prekeys import Prekeys
from .records import ProfileRecord
from .relay import RelayError, RelaySocket
from .room import Room, require_usable
from .senderkeys import SenderKeys
from .sessions import Sessions
from .transcript import Transcript, message_id

#: What a ``send`` or ``psend`` frame adds to its ``data`` (type, version, room,
#: from, to, cid and their CBOR framing come to under 200 bytes): a message the
#: relay would take but whose frame it would not is as stuck as one it refuses.
FRAME_HEADROOM = 256


@dataclass(frozen=True)
class Limit:
    """The most bytes a sealed message may have, who says so (for the error), and
    the protocol's bound on what sealing adds to the padded plaintext."""

    size: int
    by: str
    slack: int


#: Per kind of message: the protocol's largest sealed one, and what sealing may
#: add to the largest padded plaintext (header, tag, signature, framing).
ROOM_MESSAGE = (MAX_ENVELOPE_SIZE, MAX_ENVELOPE_SIZE - padding.MAX_BUCKET)
PAIRWISE_MESSAGE = (MAX_PAIRWISE_SIZE, MAX_PAIRWISE_SIZE - padding.MAX_BUCKET)


def require_fits(text: str, body: bytes, sealed: int | None, limit: Limit) -> None:
    """Refuse ``text`` (encoded as ``body``) if sealed it would exceed ``limit``.

    ``sealed`` is the exact sealed size; without it the padded plaintext and the
    AEAD tag are a lower bound, enough to refuse before any work is done.
    """
    try:
        padded: int | None = padding.bucket_size(len(body))
    except FieldTooLong:
        padded = None
    if padded is not None:
        size = sealed if sealed is not None else padded + P.AEAD_TAG_SIZE
        if size <= limit.size:
            return
    raw = len(text.encode())
    if padded is None:
        would = f"over {padding.MAX_BUCKET:,}"
    elif sealed is None:
        would = f"over {padded + P.AEAD_TAG_SIZE:,}"
    else:
        would = f"{sealed:,}"
    # Unmeasured, the protocol's bound: a hint may promise less than fits, not more.
    overhead = limit.slack if padded is None or sealed is None else sealed - padded
    fits = _text_that_fits(limit.size, overhead, len(body) - raw)
    hint = f"encrypted and padded to hide its length it would be {would} bytes"
    if fits:
        hint += f"; up to about {fits:,} bytes of text fit in one message"
    raise ClientError(
        f"this message is {raw:,} bytes; {limit.by} takes at most {limit.size:,}"
        " — shorten it or split it",
        hint=hint,
    )


def _text_that_fits(limit: int, overhead: int, framing: int) -> int:
    # Padding goes up in powers of two: the largest bucket that fits decides.
    bucket = padding.MIN_BUCKET
    if bucket + overhead > limit:
        return 0
    while bucket * 2 <= padding.MAX_BUCKET and bucket * 2 + overhead <= limit:
        bucket *= 2
    return max(0, bucket - 1 - framing)


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
        for room in rooms:
            # What this connection's catch-up brings may not precede the last time
            # we were caught up here; only once caught up again is it "now".
            self.membership.rooms.load_floor(room)
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

    async def limit(self, room: Room, kind: tuple[int, int]) -> Limit:
        """The most bytes of a sealed message of ``kind`` that ``room``'s relay takes."""
        protocol_max, slack = kind
        try:
            limits = await self.ctx.http(room.relay).limits()
        except RelayError:
            # Unreachable (the send itself will say so) or a relay without
            # /v1/limits (which refuses what is too large, and the outbox drops it).
            return Limit(protocol_max, "the protocol", slack)
        relay_max = min(limits["max_message_bytes"], limits["max_frame_bytes"] - FRAME_HEADROOM)
        if relay_max >= protocol_max:
            return Limit(protocol_max, "the protocol", slack)
        return Limit(relay_max, "the relay", slack)

    async def send_text(
        self, sock: RelaySocket, room: Room, text: str, *, to: bytes | None = None
    ) -> bytes:
        """Send ``text``; returns its message id (:func:`~.transcript.message_id`)."""
        await self.membership.sync_log(room)
        require_usable(room)
        ms = self.ctx.now_ms()
        now = ms // 1000
        if to is not None:
            peer = room.state.members.get(to)
            if peer is None:
                raise ClientError("that member is not in the room")
            payload = {"t": "sidebar", "text": text, "ts": now, "ms": ms}
            body = encode(payload)
            limit = await self.limit(room, PAIRWISE_MESSAGE)
            # Checked before a session is opened: opening one uses up a prekey of theirs.
            require_fits(text, body, None, limit)
            data = await self.sessions.send(
                sock,
                room,
                peer.key,
                payload,
                check=lambda data: require_fits(text, body, len(data), limit),
            )
            mid = message_id(data)
            self.transcript.add(room, "sidebar", text, sender=room.me, to=to, mid=mid)
            return mid
        _may_post(room)
        body = encode({"t": "text", "text": text, "ts": now, "ms": ms})
        limit = await self.limit(room, ROOM_MESSAGE)
        require_fits(text, body, None, limit)
        await self.senderkeys.distribute(sock, room, self.profile())
        await self.outbox.flush(sock, [room])  # anything older goes first
        cid, envelope = self._seal_and_queue(room, text, body, limit, now)
        await self.outbox.send(sock, room, cid, envelope, ts=now)
        return message_id(envelope)

    def queue_text(self, room: Room, text: str) -> bytes:
        """With the relay unreachable: seal and queue a room message, shown at once and
        sent by the next connection (:meth:`connect` flushes the outbox first). The
        log and the relay's limits are as last known; a message the relay then
        refuses for its size leaves the outbox with a warning, as any refused one."""
        require_usable(room)
        _may_post(room)
        ms = self.ctx.now_ms()
        now = ms // 1000
        body = encode({"t": "text", "text": text, "ts": now, "ms": ms})
        limit = Limit(ROOM_MESSAGE[0], "the protocol", ROOM_MESSAGE[1])
        require_fits(text, body, None, limit)
        return message_id(self._seal_and_queue(room, text, body, limit, now)[1])

    def _seal_and_queue(
        self, room: Room, text: str, body: bytes, limit: Limit, now: int
    ) -> tuple[bytes, bytes]:
        cid = P.random_bytes(16)
        with self.ctx.store.transaction():
            envelope = self.senderkeys.seal(room, body)
            # The exact size, not a reckoning of the envelope's layout; raising
            # here rolls the sender-key step back with everything else.
            require_fits(text, body, len(envelope), limit)
            self.outbox.queue(room, cid, envelope, ts=now)
            self.transcript.add(room, "message", text, sender=room.me, mid=message_id(envelope))
        return cid, envelope


def _may_post(room: Room) -> None:
    if room.state.role_of(room.me) == "observer":
        raise ClientError("observers cannot post in this room")
