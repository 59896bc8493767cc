"""The outbox: room messages sealed and stored but not yet acknowledged by the relay.

A message is sealed and queued in one transaction with the sender-key step
that produced it, then sent; the relay stores a retried client id once, so
resending after a crash or a lost ack is safe. Queued messages go out in the
order they were sealed, before anything newer, so receivers see no reordering.

A refusal the relay would repeat for ever (:func:`permanent`) takes the message
out of the outbox with a warning, so that one bad message cannot block those
behind it; anything else (the connection, the relay's load) keeps it for the
next try.
"""

from __future__ import annotations

from datetime import datetime

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from backchannel.protocol.envelope import RoomEnvelope

from .context import Context
from .records import OutboxItem, Table
from .relay import RelayError, RelaySocket
from .room import Room
from .transcript import Transcript

#: Answers to a send that say nothing against the message itself: the
#: connection failed or the relay was busy, so the same bytes may be taken later.
#: ``not_authenticated`` is here because it judges the connection, and a room's
#: outbox is only flushed on a connection authenticated for that room.
TRANSIENT = frozenset(
    {
        "timeout",
        "disconnected",
        "unreachable",
        "protocol",
        "unsupported_version",
        "not_authenticated",
        "rate_limited",
        "busy",
        "conflict",
        "shutting_down",
        "storage_unavailable",
        "fanout_unavailable",
    }
)


#: Answers that say "not now": the same connection is retried after a pause.
BACK_OFF = frozenset({"busy", "rate_limited"})
#: Tries per message before a ``busy`` is left to the next flush.
BACK_OFF_TRIES = 4


def _loaded(exc: BaseException) -> bool:
    return isinstance(exc, RelayError) and exc.code in BACK_OFF


def permanent(code: str) -> bool:
    """Whether the relay's refusal ``code`` means it will never take that message.

    Unknown codes count as permanent: keeping a message the relay keeps refusing
    would block every later message of its room (and the connection they share).
    """
    return code not in TRANSIENT


class Outbox:
    def __init__(self, ctx: Context, transcript: Transcript) -> None:
        self.ctx, self.transcript = ctx, transcript
        self._rows: Table[OutboxItem] = Table(ctx.store, "outbox", OutboxItem)

    def queue(self, room: Room, cid: bytes, data: bytes, *, ts: int | None = None) -> None:
        item = OutboxItem(room=room.room_id, cid=cid, data=data, ts=ts)
        self._rows.put(room.room_id + cid, item, scope=room.room_id)

    def pending(self, room: Room | None = None) -> list[OutboxItem]:
        return list(self._rows.all() if room is None else self._rows.scan(room.room_id))

    async def send(
        self, sock: RelaySocket, room: Room, cid: bytes, data: bytes, *, ts: int | None = None
    ) -> None:
        """Send one message; it leaves the outbox once stored, or once refused for good
        (with a warning, and the refusal raised)."""
        try:
            # A loaded relay says so (`busy`, `rate_limited`): wait a little, with
            # jitter so that many clients do not come back at once, and try again.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_loaded),
                wait=wait_random_exponential(multiplier=0.2, max=3.0),
                stop=stop_after_attempt(BACK_OFF_TRIES),
                reraise=True,
            ):
                with attempt:
                    await sock.request(
                        "send", room=room.room_id, **{"from": room.me}, cid=cid, data=data
                    )
        except RelayError as exc:
            if permanent(exc.code):
                self.refused(room, cid, exc.code, ts)
            raise
        self._rows.delete(room.room_id + cid)

    def forget(self, room: Room, cid: bytes) -> None:
        """The relay stored it: it leaves the outbox (inside the caller's transaction)."""
        self._rows.delete(room.room_id + cid)

    def refused(self, room: Room, cid: bytes, code: str, ts: int | None) -> None:
        """The relay will never take it: out of the outbox, and the user is told."""
        with self.ctx.store.transaction():
            self._rows.delete(room.room_id + cid)
            self.transcript.warn(room, self._refused(code, ts))

    async def flush(self, sock: RelaySocket, rooms: list[Room]) -> None:
        """Send what was sealed and stored but never seen acknowledged.

        A message refused for good is dropped and the rest still go; any other
        failure stops here and raises, since sending later ones first would
        reorder them for receivers.
        """
        queued = []
        for room in rooms:
            for item in self._rows.scan(room.room_id):
                envelope = RoomEnvelope.from_bytes(item.data)
                queued.append(((envelope.generation, envelope.index), room, item))
        for _order, room, item in sorted(queued, key=lambda q: q[0]):
            try:
                await self.send(sock, room, item.cid, item.data, ts=item.ts)
            except RelayError as exc:
                if not permanent(exc.code):
                    raise

    def _refused(self, code: str, ts: int | None) -> str:
        # Never the text: a warning line may be read over a shoulder or exported.
        if ts is None:
            when = "earlier"  # queued by a release that did not record the time
        else:
            sent = datetime.fromtimestamp(ts)
            same_day = sent.date() == datetime.fromtimestamp(self.ctx.now()).date()
            when = "at " + sent.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M")
        return (
            f"a message you sent {when} was refused by the relay ({code}) and will not be delivered"
        )
