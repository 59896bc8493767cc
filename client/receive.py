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

from collections.abc import Callable
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
from .forks import Forks
from .membership import Membership
from .peers import Peers
from .records import ProfileRecord
from .relay import Frame, RelaySocket
from .repair import Link, Repair
from .room import Room, Rooms
from .senderkeys import SenderKeys
from .sessions import Sessions
from .transcript import Transcript, message_id

#: Longest wait for the relay to deliver what was stored for us (then we go on).
CATCH_UP_TIMEOUT = 30.0
#: Most frames already arrived that are taken together (see handle_frames).
BATCH = 256
#: While messages are being asked for again, how long to wait for them, how often.
REPAIR_WAIT = 1.0
MAX_REPAIR_WAITS = 3
MAX_TITLE = 200


#: Refusals a damaged frame can cause (before a signature verified); asked for again.
_DAMAGE = ("bad_signature", "unknown_sender_key", "malformed", "decryption_failed")

#: What a hostile frame or payload can make parsing raise; refused, never propagated.
_MALFORMED = (ProtocolError, ValueError, KeyError, TypeError, OverflowError)
MALFORMED_FRAME = "a malformed frame from the relay was refused"


def _b(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise ValueError("expected bytes")
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError("expected a list")
    return v


def _i(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected int")
    return v


def _claimed(value: dict[str, Any]) -> int | None:
    """When a payload says it was sent (ms), or None; only a claim, bounded when shown.
    ``ms`` refines ``ts`` (seconds, what every release sends) where they agree."""
    ts, ms = value.get("ts"), value.get("ms")
    if isinstance(ts, bool) or not isinstance(ts, int):
        return None
    if isinstance(ms, int) and not isinstance(ms, bool) and ms // 1000 == ts:
        return ms
    return ts * 1000


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
        forks: Forks,
    ) -> None:
        self.ctx, self.rooms, self.membership = ctx, rooms, membership
        self.senderkeys, self.sessions = senderkeys, sessions
        self.peers, self.transcript = peers, transcript
        self.forks = forks
        self.repair = Repair(ctx.store, rooms)
        #: Our profile, handed out with our sender key (set by the client).
        self.profile: Callable[[], ProfileRecord] | None = None

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
        waits = 0
        while True:
            repairing = caught_up and self._repairing(sock, rooms)
            try:
                timeout = None if forever else (idle if caught_up else max(idle, CATCH_UP_TIMEOUT))
                if repairing and timeout is not None:
                    timeout = max(timeout, REPAIR_WAIT)
                frame = await sock.recv(timeout=timeout)
            except TimeoutError:
                waits += 1
                if repairing and waits < MAX_REPAIR_WAITS:
                    await self._ask_again(sock, by_id)
                    continue
                return
            # What else has arrived goes with it: room messages in one transaction.
            frames = [frame, *sock.ready(BATCH - 1)]
            while frames:
                pong = next((i for i, f in enumerate(frames) if f.type == "pong"), len(frames))
                await self.handle_frames(sock, by_id, frames[:pong])
                if pong < len(frames):
                    if not caught_up:
                        with self.ctx.store.transaction():
                            for room in rooms:
                                self.senderkeys.report_lost_tails(room)
                                room.live = True
                                self.transcript.raise_floor(room)
                    caught_up = True
                frames = frames[pong + 1 :]

    def _repairing(self, sock: RelaySocket, rooms: list[Room]) -> bool:
        return any(self.repair.outstanding(self.repair.link(sock, r)) for r in rooms)

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
                self.transcript.warn(rooms[room_id], MALFORMED_FRAME)
        await self.forks.send_questions(sock, rooms)
        await self._ask_again(sock, rooms)

    async def handle_frames(
        self, sock: RelaySocket, rooms: dict[bytes, Room], frames: list[Frame]
    ) -> None:
        """:meth:`handle_frame` for each of ``frames``, in order, except that a run of
        room messages that need nothing from the network is handled in one local
        transaction: one commit (one fsync) for the run, not one per message."""
        i = 0
        while i < len(frames):
            run: list[tuple[Room, int, bytes, RoomEnvelope]] = []
            while i < len(frames) and (quick := self._quick(rooms, frames[i])) is not None:
                run.append(quick)
                i += 1
            if run:
                with self.ctx.store.transaction():
                    for room, seq, data, envelope in run:
                        handled, link = self._arrive(sock, room, seq, data)
                        if handled:
                            continue
                        try:
                            self._read_now(room, seq, data, link, True, envelope)
                        except _MALFORMED:  # as handle_frame: refused, never raised
                            self.transcript.warn(room, MALFORMED_FRAME)
                await self.forks.send_questions(sock, rooms)
                await self._ask_again(sock, rooms)
            if i < len(frames):
                await self.handle_frame(sock, rooms, frames[i])
                i += 1

    def _quick(
        self, rooms: dict[bytes, Room], frame: Frame
    ) -> tuple[Room, int, bytes, RoomEnvelope] | None:
        """A room message whose handling needs no await (its room's log already
        covers it), parsed; ``None`` for anything else, which goes the long way."""
        if frame.type != "msg":
            return None
        try:
            room = rooms.get(_b(frame["room"]))
            seq, data = _i(frame["seq"]), _b(frame["data"])
            envelope = RoomEnvelope.from_bytes(data)
        except (*_MALFORMED, ProtocolError):
            return None
        if (
            room is None
            or room.status == "compromised"
            or envelope.room_id != room.room_id
            or envelope.epoch_pos >= room.state.length
        ):
            return None
        return room, seq, data, envelope

    async def _ask_again(self, sock: RelaySocket, rooms: dict[bytes, Room]) -> None:
        for room in rooms.values():
            seqs = self.repair.to_ask(self.repair.link(sock, room))
            if seqs:
                await sock.send("fetch", room=room.room_id, seqs=seqs)

    async def _dispatch(self, sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        if frame.type == "pmsg":
            await self._on_pairwise(sock, rooms, frame)
        elif frame.type == "msg":
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                await self._on_msg(sock, room, _i(frame["seq"]), _b(frame["data"]))
        elif frame.type == "synced":
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                self.repair.synced(self.repair.link(sock, room), _i(frame["seq"]))
        elif frame.type == "fetched":
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                asked = [_i(s) for s in _list(frame["seqs"])]
                held = {_i(s) for s in _list(frame["held"])}
                link = self.repair.link(sock, room)
                for seq, data in self.repair.answered(room, link, asked, held):
                    await self.on_room_message(room, seq, data, link, retry=False)
        elif frame.type in ("event", "removed"):
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                await self.membership.sync_log(room)
                await self._hand_out(sock, room)
        elif frame.type == "error":
            room_id = frame.get("room")
            text = f"the relay reported: {frame.get('detail')} ({frame.get('code')})"
            if isinstance(room_id, bytes) and room_id in rooms:
                self.transcript.warn(rooms[room_id], text)

    async def _hand_out(self, sock: RelaySocket, room: Room) -> None:
        """Our sender key to members who lack it (a joiner, on seeing its join)."""
        if room.status == "active" and self.profile is not None:
            await self.senderkeys.distribute(sock, room, self.profile())

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
                kind, value = self._on_payload(
                    room, member.key.sign, plaintext, message_id(data)
                )
                self.sessions.remember(room, mark)
        except _MALFORMED as exc:
            code = exc.code if isinstance(exc, ProtocolError) else "malformed"
            who = self.peers.display_name(room, sender)
            self.transcript.warn(room, f"a pairwise message from {who} was refused ({code})")
        else:
            if kind == "keys":
                await self.retry_stash(room, sender)  # messages that waited for this key
                # A newcomer handing out its key is online: ours (with the title and
                # our profile) goes to it now, not when we next speak.
                await self._hand_out(sock, room)
            elif kind == "log":
                # Judged after the transaction: it may ask the relay again.
                await self.forks.check(room, sender, value)
        await sock.send("ack", ids=[item])

    def _on_payload(
        self, room: Room, sender: bytes, plaintext: bytes, mid: bytes | None = None
    ) -> tuple[str, dict[str, Any]]:
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
                and title
                and not room.title
                and room.state.role_of(sender) == "facilitator"
            ):
                old = self.rooms.retitle(room, title[:MAX_TITLE])
                if old is not None:
                    self.transcript.notice(
                        room, f"this room is now called {room.name} here ({old} still works)"
                    )
        elif kind == "log?":
            member = room.state.members.get(sender)
            if member is not None:
                self.forks.answer(room, member.key, value)
        elif kind == "sidebar":
            text = value.get("text")
            if not isinstance(text, str):
                raise ProtocolError("a sidebar without text")
            self.transcript.add(
                room, "sidebar", text, sender=sender, to=room.me, sent=_claimed(value), mid=mid
            )
        return str(kind), value

    # --- room messages ---------------------------------------------------------------------

    async def _on_msg(self, sock: RelaySocket, room: Room, seq: int, data: bytes) -> None:
        handled, link = self._arrive(sock, room, seq, data)
        if not handled:
            await self.on_room_message(room, seq, data, link)

    def _arrive(self, sock: RelaySocket, room: Room, seq: int, data: bytes) -> tuple[bool, Link]:
        """Note a room message's arrival; whether it was handled already."""
        link = self.repair.link(sock, room)
        if self.repair.already_handled(room, seq, data):
            # A previous connection handled it (the relay resends from the cursor).
            if seq > room.cursor:
                self.repair.seen_before(room, link, seq)
            return True, link
        self.repair.arrived(link, seq)
        return False, link

    async def on_room_message(
        self, room: Room, seq: int, data: bytes, link: Link | None = None, *, retry: bool = True
    ) -> None:
        """Handle one room message. With ``link`` (a live connection), what a damaged
        or lost frame could explain is asked for again before it is reported."""
        try:
            envelope = RoomEnvelope.from_bytes(data)
        except ProtocolError as exc:
            if not self._retry(link, seq, data, retry):
                self.transcript.warn(room, f"a malformed room message was refused ({exc.code})")
                self._finish(room, seq, data, link)
            return
        if envelope.room_id != room.room_id:
            if not self._retry(link, seq, data, retry):
                self.transcript.warn(room, "a message from another room was refused")
                self._finish(room, seq, data, link)
            return
        mine = room.state.members.get(room.me)
        if envelope.sender == room.me or (mine is not None and envelope.epoch_pos < mine.since):
            self._finish(room, seq, data, link)  # our own, or from before we joined
            return
        if envelope.epoch_pos >= room.state.length:
            # Only a hint until the signature is checked: fetch what it names.
            await self.membership.sync_log(room)
        if room.status == "compromised":
            return
        self._read_now(room, seq, data, link, retry, envelope, checked=True)

    def _read_now(
        self,
        room: Room,
        seq: int,
        data: bytes,
        link: Link | None,
        retry: bool,
        envelope: RoomEnvelope,
        *,
        checked: bool = False,
    ) -> None:
        """Open, check and show a room message whose room's log covers it."""
        if not checked:
            mine = room.state.members.get(room.me)
            if envelope.sender == room.me or (mine is not None and envelope.epoch_pos < mine.since):
                self._finish(room, seq, data, link)  # our own, or from before we joined
                return
        with self.ctx.store.transaction():
            key = self.senderkeys.inbound(room, envelope.sender, envelope.generation)
            who = self.peers.display_name(room, envelope.sender)
            if key is None and self._retry(link, seq, data, retry):
                return  # a damaged header names a key nobody has: ask again first
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
                # The sender's claim, not evidence: refuse it and ask for its copy.
                self.forks.suspect(room, envelope.sender, envelope.epoch_pos)
                self.transcript.warn(
                    room,
                    f"a message from {who} names a room history we are not shown; refused "
                    f"(asking {who} for its copy)",
                )
            except DuplicateMessage:
                self.transcript.warn(room, f"a replayed message from {who} was dropped")
            except StaleSenderKey:
                self.transcript.warn(room, f"a message under a retired key from {who} was refused")
            except NotAuthorized as exc:
                self.transcript.warn(room, f"a message from {who} was refused: {exc}")
            except ProtocolError as exc:
                if exc.code in _DAMAGE and self._retry(link, seq, data, retry):
                    return
                self.transcript.warn(
                    room, f"a message claiming to be from {who} was refused ({exc.code})"
                )
            else:
                if key is not None and body is not None:
                    self._show(
                        room, envelope.sender, who, body, envelope.epoch_pos, message_id(data)
                    )
                    gaps = key.missing()
                    if gaps:
                        missing = f"{len(gaps)} message(s) from {who} have not arrived"
                        self.transcript.warn(room, missing)
                    self.senderkeys.save_inbound(room, key)
            self._finish(room, seq, data, link)

    def _retry(self, link: Link | None, seq: int, data: bytes, retry: bool) -> bool:
        """True if this failure could be the link's and the message is asked for again."""
        return retry and link is not None and self.repair.failed(link, seq, data)

    def _finish(self, room: Room, seq: int, data: bytes, link: Link | None) -> None:
        if link is not None:
            self.repair.done(room, link, seq, data)
        elif seq > room.cursor:
            room.cursor = seq
            self.rooms.save_cursor(room)

    def _show(
        self,
        room: Room,
        sender: bytes,
        who: str,
        body: bytes,
        epoch_pos: int | None = None,
        mid: bytes | None = None,
    ) -> None:
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
        # Under the rules it was sent under too: one sent before a rule change and read
        # after it is shown and exported as that stricter mode allows.
        mode = None
        if epoch_pos is not None and 0 <= epoch_pos < len(room.log):
            mode = room.log.state_at(epoch_pos).rules.mode
        self.transcript.add(
            room, "message", text, sender=sender, sent=_claimed(value), mode=mode, mid=mid
        )

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

    async def retry_stash(self, room: Room, sender: bytes | None = None) -> None:
        """Open what waited for a sender key (``sender``'s, or every member's)."""
        senders = [sender] if sender is not None else list(room.state.members)
        for who in senders:
            for data in self.senderkeys.take_stashed(room, who):
                await self.on_room_message(room, 0, data)
