"""The outbox: room messages sealed and stored but not yet acknowledged by the relay.

A message is sealed and queued in one transaction with the sender-key step
that produced it, then sent; the relay stores a retried client id once, so
resending after a crash or a lost ack is safe. Queued messages go out in the
order they were sealed, before anything newer, so receivers see no reordering.
"""

from __future__ import annotations

from backchannel.protocol.envelope import RoomEnvelope

from .records import OutboxItem, Table
from .relay import RelaySocket
from .room import Room
from .store import Store


class Outbox:
    def __init__(self, store: Store) -> None:
        self._rows: Table[OutboxItem] = Table(store, "outbox", OutboxItem)

    def queue(self, room: Room, cid: bytes, data: bytes) -> None:
        item = OutboxItem(room=room.room_id, cid=cid, data=data)
        self._rows.put(room.room_id + cid, item, scope=room.room_id)

    def pending(self, room: Room | None = None) -> list[OutboxItem]:
        return list(self._rows.all() if room is None else self._rows.scan(room.room_id))

    async def send(self, sock: RelaySocket, room: Room, cid: bytes, data: bytes) -> None:
        await sock.request("send", room=room.room_id, **{"from": room.me}, cid=cid, data=data)
        self._rows.delete(room.room_id + cid)

    async def flush(self, sock: RelaySocket, rooms: list[Room]) -> None:
        """Send what was sealed and stored but never seen acknowledged."""
        queued = []
        for room in rooms:
            for item in self._rows.scan(room.room_id):
                envelope = RoomEnvelope.from_bytes(item.data)
                queued.append(((envelope.generation, envelope.index), room, item))
        for _order, room, item in sorted(queued, key=lambda q: q[0]):
            await self.send(sock, room, item.cid, item.data)
