"""A hostile member: the real client with its own checks removed.

:class:`Spoiler` is a :class:`~backchannel.client.core.Client` that can seal
whatever it likes under its real sender key (any plaintext, any epoch) and send
it through the honest relay exactly as the real client sends a message. Every
attack in ``test_malicious_member.py`` is made with it, so a defence that holds
only against well-formed input shows up as a failing test.
"""

from __future__ import annotations

from backchannel.client.core import Client, Room
from backchannel.client.relay import RelaySocket
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from tests.client.helpers import FAST, People


class Spoiler(Client):
    async def post(
        self,
        sock: RelaySocket,
        room: Room,
        body: bytes,
        *,
        epoch: tuple[int, bytes] | None = None,
    ) -> None:
        """Seal ``body`` as a room message under our real key, naming ``epoch``."""
        await self.senderkeys.distribute(sock, room, self.profile())
        out = self.senderkeys.outbound(room)
        with self.store.transaction():
            envelope = out.seal(body, epoch or room.state.epoch)
            self.senderkeys._out.put(room.room_id, out)
        await self.outbox.send(sock, room, P.random_bytes(16), envelope)


def new_spoiler(people: People, name: str, *, calls_itself: str | None = None) -> Spoiler:
    from backchannel.client.store import Store

    store = Store.create(people.tmp_path / name, "pw", **FAST)
    Client.init_profile(store, people.relay.url, calls_itself or name)
    spoiler = Spoiler(store, clock=people.clock)
    people.clients.append(spoiler)
    return spoiler


async def seat(people: People, fac: Client, room: Room, spoiler: Client) -> Room:
    """Invite and seat ``spoiler`` in ``room`` as a participant; everyone exchanges keys."""
    code = await fac.invite(room, "participant", 3600, 1)
    return await spoiler.join(code, accept_rules=lambda r: True)


__all__ = ["L", "Spoiler", "new_spoiler", "seat"]
