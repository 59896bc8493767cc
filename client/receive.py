"""The receive path: frames from the relay become transcript lines, keys and state.

:meth:`Receiver.pump` reads frames and hands each to :meth:`Receiver.handle_frame`:
``msg`` (a room message: check, open under the sender's key, record),
``pmsg`` (a pairwise message: open under our session, act on what it carries,
acknowledge), ``event``/``removed`` (the log moved: sync it), ``error``.
A room message whose sender key has not arrived yet waits in a bounded stash
(:meth:`~.senderkeys.SenderKeys.stash`) and is retried when the key comes. The
room's cursor moves past every message handled, in the same transaction as what
the message changed.
"""

from __future__ import annotations

from typing import Any

from backchannel.protocol.encoding import decode
from backchannel.protocol.envelope import NotInEpoch, RoomEnvelope, check_epoch
from backchannel.protocol.errors import (
    DuplicateMessage,
    ForkDetected,
    NotAuthorized,
    ProtocolError,
    StaleSenderKey,
)
from backchannel.protocol.senderkey import SenderKeyDistribution

from .context import Context
from .errors import Departed
from .membership import Membership
from .peers import Peers
from .relay import Frame, RelaySocket
from .room import Room, Rooms
from .senderkeys import SenderKeys
from .sessions import Sessions
from .transcript import Transcript

#: Longest wait for the relay to deliver what was stored for us (then we go on).
CATCH_UP_TIMEOUT = 30.0
MAX_TITLE = 200


#: What a hostile frame or payload can make parsing raise; refused, never propagated.
_MALFORMED = (ProtocolError, ValueError, KeyError, TypeError, OverflowError)


def _b(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise ValueError("expected bytes")
    return v


def _i(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected int")
    return v


class Receiver:
    def __init__(
        self,
        ctx: Context,
        rooms: Rooms,
        membership: Membership,
        senderkeys: SenderKeys,
        sessions: Sessions,
        peers: Peers,
        transcript: Transcript,
    ) -> None:
        self.ctx, self.rooms, self.membership = ctx, rooms, membership
        self.senderkeys, self.sessions = senderkeys, sessions
        self.peers, self.transcript = peers, transcript

    async def pump(
        self, sock: RelaySocket, rooms: list[Room], *, idle: float = 0.5, forever: bool = False
    ) -> None:
        """Process frames: catch up, then return once nothing arrives for ``idle``
        seconds (or run forever).

        Catching up ends at a ``pong``: the relay answers frames in order and
        queues a subscription's stored messages and our pending mailbox before
        the answer to a later ``ping``, so everything that was waiting has
        arrived by then. ``idle`` then only bounds the wait for stragglers.
        """
        if not sock.authenticated:
            return  # no active room here: the relay has nothing for us
        by_id = {r.room_id: r for r in rooms}
        await sock.send("ping")
        caught_up = False
        while True:
            try:
                timeout = None if forever else (idle if caught_up else max(idle, CATCH_UP_TIMEOUT))
                frame = await sock.recv(timeout=timeout)
            except TimeoutError:
                return
            if frame.type == "pong":
                if not caught_up:
                    with self.ctx.store.transaction():
                        for room in rooms:
                            self.senderkeys.report_lost_tails(room)
                caught_up = True
                continue
            await self.handle_frame(sock, by_id, frame)

    async def handle_frame(self, sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        """Act on one frame. Nothing a frame contains raises out of here: a frame
        that does not parse is refused (and its room told, when it names one);
        only the connection's own failures (:class:`~.relay.RelayError`) and the
        local store's propagate."""
        try:
            await self._dispatch(sock, rooms, frame)
        except _MALFORMED:
            room_id = frame.get("room")
            if isinstance(room_id, bytes) and room_id in rooms:
                self.transcript.warn(rooms[room_id], "a malformed frame from the relay was refused")

    async def _dispatch(self, sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        if frame.type == "pmsg":
            await self._on_pairwise(sock, rooms, frame)
        elif frame.type == "msg":
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                await self.on_room_message(room, _i(frame["seq"]), _b(frame["data"]))
        elif frame.type in ("event", "removed"):
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                await self.membership.sync_log(room)
        elif frame.type == "error":
            room_id = frame.get("room")
            text = f"the relay reported: {frame.get('detail')} ({frame.get('code')})"
            if isinstance(room_id, bytes) and room_id in rooms:
                self.transcript.warn(rooms[room_id], text)

    # --- pairwise --------------------------------------------------------------------------

    async def _on_pairwise(self, sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        room = rooms.get(_b(frame["room"]))
        item = frame["id"]
        if room is None:
            await sock.send("ack", ids=[item])
            return
        sender = _b(frame["from"])
        member = room.state.members.get(sender)
        if member is None:
            await self.membership.sync_log(room)
            member = room.state.members.get(sender)
        if member is None:
            self.transcript.warn(
                room, "a pairwise message from someone who is not a member was refused"
            )
            await sock.send("ack", ids=[item])
            return
        data = _b(frame["data"])
        mark = self.sessions.mark(_i(item), data)
        if self.sessions.seen(room, mark):
            # Processed and committed before, but our ack never reached the
            # relay (a crash or a dropped connection): acknowledge it again.
            await sock.send("ack", ids=[item])
            return
        try:
            # Session state, what the message carried and the fact that we
            # processed it commit together, or not at all.
            with self.ctx.store.transaction():
                plaintext = self.sessions.decrypt(room, member.key, data)
                kind = self._on_payload(room, member.key.sign, plaintext)
                self.sessions.remember(room, mark)
        except _MALFORMED as exc:
            code = exc.code if isinstance(exc, ProtocolError) else "malformed"
            who = self.peers.display_name(room, sender)
            self.transcript.warn(room, f"a pairwise message from {who} was refused ({code})")
        else:
            if kind == "keys":
                await self.retry_stash(room, sender)  # messages that waited for this key
        await sock.send("ack", ids=[item])

    def _on_payload(self, room: Room, sender: bytes, plaintext: bytes) -> str:
        value = decode(plaintext)
        if not isinstance(value, dict):
            raise ProtocolError("pairwise payload is not a map")
        kind = value.get("t")
        if kind == "keys":
            self.senderkeys.accept(room, sender, SenderKeyDistribution.from_bytes(_b(value["skd"])))
            self.peers.learn(room, sender, value.get("name"), value.get("aff"))
            title = value.get("title")
            if (
                isinstance(title, str)
                and not room.title
                and room.state.role_of(sender) == "facilitator"
            ):
                room.title = title[:MAX_TITLE]
                self.rooms.save(room)
        elif kind == "sidebar":
            text = value.get("text")
            if not isinstance(text, str):
                raise ProtocolError("a sidebar without text")
            self.transcript.add(room, "sidebar", text, sender=sender, to=room.me)
        return str(kind)

    # --- room messages ---------------------------------------------------------------------

    async def on_room_message(self, room: Room, seq: int, data: bytes) -> None:
        try:
            envelope = RoomEnvelope.from_bytes(data)
        except ProtocolError as exc:
            self.transcript.warn(room, f"a malformed room message was refused ({exc.code})")
            self._advance(room, seq)
            return
        if envelope.room_id != room.room_id:
            self.transcript.warn(room, "a message from another room was refused")
            self._advance(room, seq)
            return
        mine = room.state.members.get(room.me)
        if envelope.sender == room.me or (mine is not None and envelope.epoch_pos < mine.since):
            self._advance(room, seq)  # our own, or from before we joined: not ours to read
            return
        if envelope.epoch_pos >= room.state.length:
            # Only a hint until the signature is checked: fetch what it names.
            await self.membership.sync_log(room)
        if room.status == "compromised":
            return
        fork = False
        with self.ctx.store.transaction():
            key = self.senderkeys.inbound(room, envelope.sender, envelope.generation)
            who = self.peers.display_name(room, envelope.sender)
            try:
                if key is None:
                    # Its key may still be on the way (refused if it cannot be).
                    self.senderkeys.stash(room, envelope, data)
                    body = None
                else:
                    body = key.open(envelope, authorise=lambda env: self._authorise(room, env))
            except Departed:
                self.transcript.warn(
                    room, f"a message from {who}, who is no longer a member, was refused"
                )
            except NotInEpoch:
                pass  # sent before we joined or after we left: not ours to read
            except ForkDetected:
                fork = True
            except DuplicateMessage:
                self.transcript.warn(room, f"a replayed message from {who} was dropped")
            except StaleSenderKey:
                self.transcript.warn(room, f"a message under a retired key from {who} was refused")
            except NotAuthorized as exc:
                self.transcript.warn(room, f"a message from {who} was refused: {exc}")
            except ProtocolError as exc:
                self.transcript.warn(
                    room, f"a message claiming to be from {who} was refused ({exc.code})"
                )
            else:
                if key is None or body is None:
                    self._advance(room, seq)
                    return
                self._show(room, envelope.sender, who, body)
                gaps = key.missing()
                if gaps:
                    missing = f"{len(gaps)} message(s) from {who} have not arrived"
                    self.transcript.warn(room, missing)
                self.senderkeys.save_inbound(room, key)
            self._advance(room, seq)
        if fork:
            self.membership.compromise(
                room, "the relay showed members different room logs (fork)"
            )

    def _show(self, room: Room, sender: bytes, who: str, body: bytes) -> None:
        """Record what an authenticated room message says. Its sender may be hostile:
        whatever the body holds is a refused message with a warning, never an error."""
        try:
            value = decode(body)
        except ProtocolError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("t"), str):
            self.transcript.warn(room, f"an unreadable message from {who} was refused")
            return
        if value["t"] != "text":
            return  # a kind of message a later release sends; nothing to show here
        text = value.get("text")
        if not isinstance(text, str):
            self.transcript.warn(room, f"an unreadable message from {who} was refused")
            return
        self.transcript.add(room, "message", text, sender=sender)

    def _authorise(self, room: Room, envelope: RoomEnvelope) -> None:
        """Judge a signature-checked envelope against our validated log.

        Authority is judged twice: at the epoch the sender names (it was a
        posting member then) and now, whatever epoch it names, so that a
        member who left, was removed or was made an observer cannot go on
        posting by naming an epoch from before (the epoch is the sender's
        claim). A key its owner has replaced stops at the ``prev`` count the
        next generation declares.
        """
        role = room.state.role_of(envelope.sender)
        if role is None:
            raise Departed("its sender is no longer a member")
        if role == "observer":
            raise NotAuthorized("its sender may not post (observer)")
        newer = self.senderkeys.inbound(room, envelope.sender, envelope.generation + 1)
        if newer is not None and envelope.index >= newer.prev_count:
            raise StaleSenderKey("under a key its owner has replaced")
        if check_epoch(room.log, envelope, room.me) == "ahead":
            raise ForkDetected("the message names log events the relay does not show us")

    def _advance(self, room: Room, seq: int) -> None:
        if seq > room.cursor:
            room.cursor = seq
            self.rooms.save_cursor(room)

    async def retry_stash(self, room: Room, sender: bytes | None = None) -> None:
        """Open what waited for a sender key (``sender``'s, or every member's)."""
        senders = [sender] if sender is not None else list(room.state.members)
        for who in senders:
            for data in self.senderkeys.take_stashed(room, who):
                await self.on_room_message(room, 0, data)
