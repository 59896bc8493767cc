"""Forks: a room is locked only on evidence, never on a member's claim.

Every room message names the log position and head its sender had validated
(its *epoch*). That is the sender's claim, signed only by its sender key: a
spoiler can name a random head, or a position beyond the log, to make others
believe the relay forked. So a message whose epoch we cannot confirm is
refused, and we ask its sender, over our pairwise session, for its copy of the
log there (``log?``; it answers ``log`` with at most :data:`MAX_PROOF_EVENTS`
signed events). Its answer is checked against our own validated log:

- a validly signed event that differs from ours at a position we hold is two
  different valid events at one position: proof of a fork, and the room locks;
- validly signed events beyond our head that the relay, asked again, still does
  not serve: proof that the relay hides history from us (a hidden removal, say),
  and the room locks;
- anything that does not check out (bad signatures, a chain that does not join
  ours, events we never asked for) is the sender's problem: a warning names it,
  and nothing is locked.

Recovery from a lock is out of band (docs/sections/rooms.md, "Recovering a locked room").
"""

from __future__ import annotations

from typing import Any

from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import Value
from backchannel.protocol.errors import ForkDetected, ProtocolError
from backchannel.protocol.keys import MemberPublicKey

from .context import Context
from .membership import Membership
from .peers import Peers
from .records import AskRecord, Table
from .relay import RelayError, RelaySocket
from .room import Room, Rooms
from .sessions import Sessions
from .transcript import Transcript

#: Events one answer may carry (and so the depth at which a fork can be proven).
MAX_PROOF_EVENTS = 64
#: An unanswered question is asked again after this long.
ASK_AGAIN_AFTER = 3600


class Forks:
    def __init__(
        self,
        ctx: Context,
        rooms: Rooms,
        membership: Membership,
        sessions: Sessions,
        peers: Peers,
        transcript: Transcript,
    ) -> None:
        self.ctx, self.rooms, self.membership = ctx, rooms, membership
        self.sessions, self.peers, self.transcript = sessions, peers, transcript
        self._asks: Table[AskRecord] = Table(ctx.store, "ask", AskRecord)
        self._answers: list[tuple[Room, bytes, dict[str, Value]]] = []
        self._unsent: set[tuple[bytes, bytes]] = set()
        #: When we last answered each member: a question costs us an answer of up
        #: to 64 events, so a member gets at most one an hour.
        self._answered: dict[tuple[bytes, bytes], int] = {}

    # --- the asking side --------------------------------------------------------------------

    def suspect(self, room: Room, sender: bytes, claimed: int) -> None:
        """``sender`` signed a message naming position ``claimed`` with a head we do not
        have (or that the relay does not show us): ask it for its copy."""
        current = self._asks.get(room.room_id + sender)
        now = self.ctx.now()
        if current is not None and now - current.at < ASK_AGAIN_AFTER:
            return  # one question at a time: its answer is what we wait for
        end = max(1, claimed)
        start = max(1, min(end, len(room.log) - 1) - MAX_PROOF_EVENTS // 2)
        end = min(end, start + MAX_PROOF_EVENTS - 1)
        self._asks.put(
            room.room_id + sender,
            AskRecord(start=start, end=end, at=now, sent=False),
            scope=room.room_id,
        )
        self._unsent.add((room.room_id, sender))

    async def send_questions(self, sock: RelaySocket, rooms: dict[bytes, Room]) -> None:
        """Put the questions and answers queued while handling frames on the wire."""
        answers, self._answers = self._answers, []
        for room, peer, payload in answers:
            await self._send(sock, room, peer, payload)
        for room_id, peer in sorted(self._unsent):
            room = rooms.get(room_id)
            ask = self._asks.get(room_id + peer)
            self._unsent.discard((room_id, peer))
            if room is None or ask is None or ask.sent:
                continue
            payload: dict[str, Value] = {"t": "log?", "from": ask.start, "to": ask.end}
            if await self._send(sock, room, peer, payload):
                self._asks.put(room_id + peer, AskRecord(ask.start, ask.end, ask.at, True),
                               scope=room_id)

    async def _send(
        self, sock: RelaySocket, room: Room, peer: bytes, payload: dict[str, Value]
    ) -> bool:
        member = room.state.members.get(peer)
        if member is None:
            return False
        try:
            await self.sessions.send(sock, room, member.key, payload)
        except (RelayError, ProtocolError):
            return False  # asked again on its next unconfirmable message
        return True

    # --- the answering side -----------------------------------------------------------------

    def answer(self, room: Room, asker: MemberPublicKey, value: dict[str, Any]) -> None:
        """A member asks for our copy of the log between two positions."""
        start, end = value.get("from"), value.get("to")
        if not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool):
            raise ProtocolError("a malformed question about the log")
        now, who = self.ctx.now(), (room.room_id, asker.sign)
        if now - self._answered.get(who, now - ASK_AGAIN_AFTER) < ASK_AGAIN_AFTER:
            return
        self._answered[who] = now
        start = max(1, start)
        end = min(end, len(room.log) - 1, start + MAX_PROOF_EVENTS - 1)
        events: list[Value] = [room.log.event(pos) for pos in range(start, end + 1)]
        self._answers.append((room, asker.sign, {"t": "log", "events": events}))

    # --- checking an answer -----------------------------------------------------------------

    async def check(self, room: Room, sender: bytes, value: dict[str, Any]) -> None:
        """Judge ``sender``'s copy of the log against ours (see the module docstring)."""
        if self._asks.get(room.room_id + sender) is None:
            return  # we did not ask: checking it would be work a spoiler chooses for us
        self._asks.delete(room.room_id + sender)
        events = value.get("events")
        who = self.peers.display_name(room, sender)
        if (
            not isinstance(events, list)
            or len(events) > MAX_PROOF_EVENTS
            or not all(isinstance(e, bytes) for e in events)
        ):
            self.transcript.warn(room, f"{who} answered about the room's history in a bad form")
            return
        first = len(room.log)
        for data in events:
            try:
                room.log.append(data)
            except L.DuplicateEvent:
                continue
            except ForkDetected as exc:
                self.membership.compromise(
                    room,
                    f"{exc}: the relay showed members different room logs (fork); "
                    f"{who} holds the other one",
                )
                return
            except ProtocolError as exc:
                self.transcript.warn(
                    room, f"{who}'s copy of the room's history does not check out ({exc.code})"
                )
                break
        if len(room.log) > first:
            await self._learned(room, first, who)

    async def _learned(self, room: Room, first: int, who: str) -> None:
        """Validly signed events a member holds beyond what the relay showed us."""
        learned = [room.log.head_at(pos) for pos in range(first, len(room.log))]
        try:
            served = await self.ctx.http(room.relay).events(
                room.room_id, first - 1, room.key.sign_seed
            )
        except RelayError:
            served = []
        shown = {L.event_hash(data) for data in served}
        with self.ctx.store.transaction():
            self.rooms.save_events(room, first)
            self.rooms.save(room)
        if not all(head in shown for head in learned):
            self.membership.compromise(
                room,
                f"the relay hides room log events that {who} holds "
                "(members are shown different room logs: fork)",
            )
            return
        with self.ctx.store.transaction():
            for pos in range(first, len(room.log)):
                self.membership.after_event(room, room.log.decoded(pos))
            self.rooms.save(room)
