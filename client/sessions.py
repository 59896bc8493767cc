"""Pairwise sessions: the deniable channel to each member of a room.

Sessions carry sender keys, profiles and sidebars. With each peer we keep the
last few sessions (either side may have started a new one), newest last, in one
row per peer. A session's state and what its message carried commit together
(the caller holds the transaction), so a crash never reuses a message key.

Mailbox items processed are remembered in a bounded ring, one row per item, so
that a redelivery after a lost ack is recognised without rereading the rest.
"""

from __future__ import annotations

from collections.abc import Callable

from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import Value, encode
from backchannel.protocol.errors import DuplicateMessage, ProtocolError
from backchannel.protocol.keys import MemberPublicKey, PreKeyBundle
from backchannel.protocol.ratchet import NewSession, PairwiseSession

from .context import Context
from .peers import Peers
from .prekeys import SIGNED_PREKEY_MAX_AGE, Prekeys
from .records import Ring, SeenRecord, SessionsRecord, Table
from .relay import RelaySocket
from .room import Room
from .transcript import Transcript

MAX_SESSIONS_PER_PEER = 4
#: Mailbox item ids remembered per room, to recognise a redelivery after a lost ack.
MAX_PROCESSED = 1000


class Sessions:
    def __init__(
        self, ctx: Context, prekeys: Prekeys, peers: Peers, transcript: Transcript
    ) -> None:
        self.ctx, self.prekeys, self.peers, self.transcript = ctx, prekeys, peers, transcript
        self._rows: Table[SessionsRecord] = Table(ctx.store, "sessions", SessionsRecord)
        self._seen: Ring[SeenRecord] = Ring(ctx.store, "seen", SeenRecord, MAX_PROCESSED)

    def _load(self, room: Room, peer: bytes) -> list[PairwiseSession]:
        row = self._rows.get(room.room_id + peer)
        return [] if row is None else [PairwiseSession.from_bytes(s) for s in row.sessions]

    def _save(self, room: Room, peer: bytes, sessions: list[PairwiseSession]) -> None:
        kept = [s.to_bytes() for s in sessions[-MAX_SESSIONS_PER_PEER:]]
        self._rows.put(room.room_id + peer, SessionsRecord(sessions=kept), scope=room.room_id)

    async def _sessions_for(self, room: Room, peer: MemberPublicKey) -> list[PairwiseSession]:
        sessions = self._load(room, peer.sign)
        if sessions:
            return sessions
        raw = await self.ctx.http(room.relay).claim(peer.sign, room.key.sign_seed)
        try:
            bundle = PreKeyBundle.from_bytes(raw)
            session = PairwiseSession.initiate(
                room.key, bundle, peer, now=self.ctx.now(), max_spk_age=SIGNED_PREKEY_MAX_AGE
            )
        except ProtocolError as exc:
            self.transcript.warn(
                room,
                f"the relay served a bad key bundle for {self.peers.display_name(room, peer.sign)}"
                f" ({exc.code}); not sending to them",
            )
            raise
        return [session]

    async def send(
        self,
        sock: RelaySocket,
        room: Room,
        peer: MemberPublicKey,
        payload: dict[str, Value],
        *,
        check: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Encrypt ``payload`` to ``peer`` and put it in its mailbox (durably, then ack).

        ``check`` sees the ciphertext before the session step is stored; if it
        raises, nothing is stored or sent and the session has not moved on.
        """
        sessions = await self._sessions_for(room, peer)
        cid = P.random_bytes(16)
        # Sending session: the newest we initiated, else the newest at all.
        sender = next((s for s in reversed(sessions) if s.is_initiator), sessions[-1])
        data = sender.encrypt(encode(payload))
        if check is not None:
            check(data)
        with self.ctx.store.transaction():
            self._save(room, peer.sign, sessions)
        await sock.request(
            "psend", room=room.room_id, **{"from": room.me}, to=peer.sign, cid=cid, data=data
        )
        return data

    def decrypt(self, room: Room, peer: MemberPublicKey, data: bytes) -> bytes:
        """Open a pairwise message (inside the caller's transaction)."""
        sessions = self._load(room, peer.sign)
        duplicate: DuplicateMessage | None = None
        for session in reversed(sessions):
            try:
                plaintext = session.decrypt(data)
            except DuplicateMessage as exc:
                duplicate = exc
                continue
            except (NewSession, ProtocolError):
                continue
            self._save(room, peer.sign, sessions)
            return plaintext
        if duplicate is not None:
            # One of our sessions already used this message's key: a replay,
            # not a new session (whose prekeys would be gone anyway).
            raise duplicate
        accepted = PairwiseSession.accept(
            room.key, data, initiator=peer, prekeys=self.prekeys.lookup(room)
        )
        self.prekeys.consume(room, accepted.consumed)
        self._save(room, peer.sign, [*sessions, accepted.session])
        return accepted.plaintext

    # --- mailbox items already processed ------------------------------------------------------

    @staticmethod
    def mark(item: int, data: bytes) -> bytes:
        # The relay's id alone is not enough: ids may be reused once acknowledged.
        # Only the same id with the same bytes is the redelivery of what we did.
        return item.to_bytes(8, "big") + P.hash_bytes(b"bc-pmsg-seen", data, 16)

    def seen(self, room: Room, mark: bytes) -> bool:
        return self._seen.items.get(room.room_id + mark) is not None

    def remember(self, room: Room, mark: bytes) -> None:
        self._seen.add(room.room_id, room.room_id + mark, SeenRecord())
