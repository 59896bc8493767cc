"""Sender keys: ours (made, rotated, sealed under, handed out) and other members'.

Each member encrypts to the room under its own sender key (rooms.md). Ours is
one row per room with a record of who already holds its current generation;
we make a new one whenever someone leaves or is removed, and hand it to every
current member over our pairwise sessions. Inbound keys are one row per
``(owner, generation)``, so opening a message reads and writes the one key it
names. A departure retires every inbound key: later epochs under it are refused.
"""

from __future__ import annotations

from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import Value
from backchannel.protocol.envelope import RoomEnvelope
from backchannel.protocol.errors import (
    NotAuthorized,
    ProtocolError,
    StaleSenderKey,
    UnknownSenderKey,
)
from backchannel.protocol.senderkey import (
    InboundSenderKey,
    OutboundSenderKey,
    SenderKeyDistribution,
)

from .context import Context
from .errors import Departed
from .peers import Peers
from .records import CounterRecord, DistributionRecord, ProfileRecord, Ring, StashItem, Table
from .relay import RelayError, RelaySocket
from .room import Room, names_shared
from .sessions import Sessions
from .store import Store
from .transcript import Transcript

#: Generations of one member's key held at once (older ones are dropped).
KEEP_GENERATIONS = 4
#: Room messages kept per sender while their key is on the way, and their bytes.
MAX_STASH_PER_SENDER = 100
MAX_STASH_BYTES_PER_SENDER = 2 << 20


def _inbound_key(room: Room, owner: bytes, generation: int) -> bytes:
    return room.room_id + owner + generation.to_bytes(4, "big")


class _Inbound:
    """Inbound keys, decoded once per store transaction and written back at its commit.

    A batch of messages from one sender reads and advances the same key: decoding
    and re-sealing it for every message was a fifth of the receiver's time. Only
    :meth:`get` and :meth:`put` use the held copies; every other access writes
    them back first and works on the table, so nothing reads a stale row. A
    rollback drops them: the table still holds the state from before it.
    """

    def __init__(self, store: Store, table: Table[InboundSenderKey]) -> None:
        self.store, self.table = store, table
        self.held: dict[bytes, InboundSenderKey] = {}
        #: Held keys changed since read, with the scope they are stored under.
        self.dirty: dict[bytes, bytes] = {}

    def get(self, k: bytes) -> InboundSenderKey | None:
        found = self.held.get(k)
        if found is None:
            found = self.table.get(k)
            if found is not None and self.store.in_transaction:
                self.held[k] = found
                self.store.at_end(self._end)
        return found

    def put(self, k: bytes, key: InboundSenderKey, scope: bytes) -> None:
        if not self.store.in_transaction:
            self.table.put(k, key, scope=scope)
            return
        self.held[k] = key
        self.dirty[k] = scope
        self.store.at_end(self._end)

    def settle(self) -> None:
        """Write back what changed (within the transaction that changed it)."""
        for k, scope in self.dirty.items():
            self.table.put(k, self.held[k], scope=scope)
        self.dirty.clear()

    def scan(self, scope: bytes) -> list[InboundSenderKey]:
        self.settle()
        self.held.clear()
        return list(self.table.scan(scope))

    def delete(self, k: bytes) -> None:
        self.settle()
        self.held.pop(k, None)
        self.table.delete(k)

    def _end(self, committing: bool) -> None:
        if committing:
            self.settle()
        self.held.clear()
        self.dirty.clear()


class SenderKeys:
    def __init__(
        self, ctx: Context, sessions: Sessions, peers: Peers, transcript: Transcript
    ) -> None:
        self.ctx, self.sessions, self.peers, self.transcript = ctx, sessions, peers, transcript
        self._out: Table[OutboundSenderKey] = Table(ctx.store, "outkey", OutboundSenderKey)
        self._dist: Table[DistributionRecord] = Table(ctx.store, "dist", DistributionRecord)
        self._in = _Inbound(ctx.store, Table(ctx.store, "inkey", InboundSenderKey))
        #: The highest generation we hold per sender (generations only go up).
        self._latest: Table[CounterRecord] = Table(ctx.store, "ingen", CounterRecord)
        self._stash: Ring[StashItem] = Ring(
            ctx.store, "stash", StashItem, MAX_STASH_PER_SENDER, MAX_STASH_BYTES_PER_SENDER
        )

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

    def seal_many(self, room: Room, bodies: list[bytes]) -> list[bytes]:
        """:meth:`seal` for a batch: the key's state is stored once, after the last
        (inside the caller's transaction, so the batch commits with it or not at all)."""
        out = self.outbound(room)
        envelopes = [out.seal(body, room.state.epoch) for body in bodies]
        self._out.put(room.room_id, out)
        return envelopes

    def redistribute(self, room: Room) -> None:
        """Hand our current key, and with it our profile, to every member again at the
        next :meth:`distribute` (our name or affiliation changed)."""
        record = self._dist.get(room.room_id)
        if record is not None and record.to:
            self._dist.put(room.room_id, DistributionRecord(generation=record.generation, to=[]))

    async def distribute(self, sock: RelaySocket, room: Room, profile: ProfileRecord) -> None:
        """Make sure every current member has our current sender key (and our profile)."""
        out = self.outbound(room)
        record = self._dist.get(room.room_id)
        done = set() if record is None else set(record.to)
        named = names_shared(room)  # never once anonymous while we were in (room.py)
        for member in room.state.members.values():
            sign = member.key.sign
            if sign == room.me or sign in done:
                continue
            payload: dict[str, Value] = {"skd": out.distribution().to_bytes(), "t": "keys"}
            if named:
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
        return self._in.scan(room.room_id)

    def retire_all(self, room: Room, pos: int) -> None:
        """Someone left at ``pos``: no key made before it opens a later epoch."""
        for key in self.inbound_keys(room):
            key.retire(pos)
            self.save_inbound(room, key)

    def accept(self, room: Room, sender: bytes, dist: SenderKeyDistribution) -> bool:
        """A sender key ``sender`` handed us over our pairwise session; True if it is new.

        Generations only go up: one at or below what we hold is refused (or is
        the same one again). Once a newer generation arrives, the one before it
        is kept only while messages under it are still missing, and older ones go.
        """
        if dist.owner != sender or dist.room_id != room.room_id:
            raise UnknownSenderKey("a sender key for someone else")
        latest = self._latest.get(room.room_id + sender)
        if latest is not None and dist.generation <= latest.n:
            if self.inbound(room, sender, dist.generation) is not None:
                return False
            raise StaleSenderKey("a sender key generation that does not increase")
        key = InboundSenderKey.from_distribution(dist)
        # A departure after the key was made retires it like the others.
        for event_pos in range(dist.since + 1, room.state.length):
            if isinstance(room.log.decoded(event_pos), L.RemoveEvent | L.LeaveEvent):
                key.retire(event_pos)
                break
        self.save_inbound(room, key)
        self._latest.put(room.room_id + sender, CounterRecord(n=dist.generation))
        previous = self.inbound(room, sender, dist.generation - 1) if dist.generation else None
        if previous is not None and previous.index >= dist.prev_count and not previous.missing():
            self._in.delete(_inbound_key(room, sender, previous.generation))
        if dist.generation >= KEEP_GENERATIONS:
            # However fast a member rotates, we hold a bounded number of its keys.
            self._in.delete(_inbound_key(room, sender, dist.generation - KEEP_GENERATIONS))
        return True

    def report_lost_tails(self, room: Room) -> None:
        """Once caught up: what a replaced key never delivered is lost; say so, and drop it.

        A new generation declares how many messages were sent under the one
        before (``prev``). It travels pairwise and can arrive before the room
        backlog it speaks of, so the count is judged only after catching up.
        """
        for key in self.inbound_keys(room):
            newer = self.inbound(room, key.owner, key.generation + 1)
            if newer is None:
                continue
            lost = max(0, newer.prev_count - key.index) + sum(
                1 for i in key.missing() if i < newer.prev_count
            )
            if lost:
                self.transcript.warn(
                    room,
                    f"{lost} message(s) from {self.peers.display_name(room, key.owner)} "
                    "under their previous key never arrived",
                )
            self._in.delete(_inbound_key(room, key.owner, key.generation))

    def forget(self, room: Room, member: bytes) -> None:
        """``member`` left or was removed: nothing under its keys is read again."""
        for key in self.inbound_keys(room):
            if key.owner == member:
                self._in.delete(_inbound_key(room, member, key.generation))
        self._stash.drop(room.room_id + member)

    # --- messages that wait for their key -------------------------------------------------

    def stash(self, room: Room, envelope: RoomEnvelope, data: bytes) -> None:
        """Keep a message whose key has not arrived; raise to refuse it instead.

        Its signature cannot be checked without the key, so what is kept is
        bounded per sender (count and bytes) and only for current posting
        members and generations we do not hold yet.
        """
        role = room.state.role_of(envelope.sender)
        if role is None:
            raise Departed("its sender is not a member")
        if role == "observer":
            raise NotAuthorized("its sender may not post (observer)")
        latest = self._latest.get(room.room_id + envelope.sender)
        if latest is not None and envelope.generation <= latest.n:
            raise StaleSenderKey("under a sender key its owner replaced")
        scope = room.room_id + envelope.sender
        key = scope + P.hash_bytes(b"bc-stash", data, 16)
        if not self._stash.add(scope, key, StashItem(data=data), len(data)):
            raise NotAuthorized("too large to keep while its key is on the way")

    def take_stashed(self, room: Room, sender: bytes) -> list[bytes]:
        """What waited for ``sender``'s keys, in sending order; the stash forgets it."""
        scope = room.room_id + sender
        items = [item.data for item in self._stash.items.scan(scope)]
        if not items:
            return []
        self._stash.drop(scope)
        # In sending order, or a later message opened first would look like a gap.
        order = {data: RoomEnvelope.from_bytes(data) for data in items}
        return sorted(order, key=lambda d: (order[d].generation, order[d].index))
