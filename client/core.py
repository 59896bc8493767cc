"""The client library: rooms, sessions, sender keys and the transcript, over one store.

Async, no terminal code. Everything the client believes comes from a room log
it validated itself (:class:`~backchannel.protocol.roomlog.RoomLog`); the
relay's answers are hints. A room whose log or messages fail validation is
marked *compromised* with the reason, and the client refuses to encrypt to it
until the user looks into it (DESIGN.md §1.3).

State (all sealed by :class:`~.store.Store`): one record per room (the member
key, the validated log's events, the relay cursor, status), the outbound
sender key, inbound sender keys, pairwise sessions, prekey privates, what
others told us about themselves (profiles), an outbox of sends not yet
acknowledged, and the transcript.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import Value, decode, encode
from backchannel.protocol.envelope import NotInEpoch, RoomEnvelope, check_epoch
from backchannel.protocol.errors import (
    DuplicateMessage,
    ForkDetected,
    NotAuthorized,
    ProtocolError,
    StaleSenderKey,
    UnknownSenderKey,
)
from backchannel.protocol.invite import InviteCode, check_relay_url
from backchannel.protocol.keys import (
    MemberKeyPair,
    MemberPublicKey,
    PreKey,
    PreKeyBundle,
    PreKeyKind,
    PreKeyPrivate,
    PreKeyUpload,
    generate_kem_prekey,
    generate_x25519_prekey,
)
from backchannel.protocol.ratchet import NewSession, PairwiseSession
from backchannel.protocol.safety import SafetyNumber, safety_number
from backchannel.protocol.senderkey import (
    InboundSenderKey,
    OutboundSenderKey,
    SenderKeyDistribution,
)

from .relay import Frame, RelayError, RelayHttp, RelaySocket
from .store import Store, StoreError

ONE_TIME_PREKEYS = 20
KEM_PREKEYS = 5
REPLENISH_BELOW = 5
MAX_STASH = 1000
MAX_SESSIONS_PER_PEER = 4
#: Mailbox item ids remembered per room, to recognise a redelivery after a lost ack.
MAX_PROCESSED = 1000
#: Longest wait for the relay to deliver what was stored for us (then we go on).
CATCH_UP_TIMEOUT = 30.0
#: Peers refuse a signed prekey older than this (a relay replaying a retired one) ...
SIGNED_PREKEY_MAX_AGE = 30 * 86_400
#: ... so we replace ours well before.
SIGNED_PREKEY_ROTATE = 7 * 86_400

Status = Literal["active", "removed", "left", "compromised"]
ROOM_RECORD_VERSION = 1


class ClientError(Exception):
    """Something the user asked for that cannot be done; ``str()`` is one clear line."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class Room:
    room_id: bytes
    name: str
    title: str
    relay: str
    key: MemberKeyPair
    log: L.RoomLog = field(repr=False)
    cursor: int = 0
    status: Status = "active"
    problem: str | None = None

    @property
    def state(self) -> L.RoomState:
        return self.log.state

    @property
    def me(self) -> bytes:
        return self.key.public.sign

    def to_bytes(self) -> bytes:
        out: dict[str, Value] = {
            "cursor": self.cursor,
            "events": list(self.log.events),
            "id": self.room_id,
            "key": self.key.to_bytes(),
            "name": self.name,
            "relay": self.relay,
            "status": self.status,
            "title": self.title,
            "v": ROOM_RECORD_VERSION,
        }
        if self.problem:
            out["problem"] = self.problem
        return encode(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Room:
        v = decode(data, max_size=64 << 20)
        if not isinstance(v, dict) or v.get("v") != ROOM_RECORD_VERSION:
            # Written by another release of the client: say so rather than guess.
            raise StoreError("this profile was written by another version of backchannel")
        return cls(
            room_id=_b(v["id"]),
            name=str(v["name"]),
            title=str(v["title"]),
            relay=str(v["relay"]),
            key=MemberKeyPair.from_bytes(_b(v["key"])),
            # Our own store, but re-validated: a log is believed only after that.
            log=L.validate_log([_b(e) for e in _list(v["events"])]),
            cursor=int(_i(v["cursor"])),
            status=str(v["status"]),  # type: ignore[arg-type]
            problem=str(v["problem"]) if "problem" in v else None,
        )


@dataclass(frozen=True)
class Line:
    """One transcript entry as the user sees it."""

    n: int
    kind: str  # "message", "sidebar", "notice", "warning"
    sender: bytes | None
    text: str
    ts: int
    mine: bool = False
    to: bytes | None = None


@dataclass(frozen=True)
class MemberView:
    key: MemberPublicKey
    role: str
    name: str
    affiliation: str | None
    verified: bool
    me: bool

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint().hex()


def _b(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise ValueError("expected bytes")
    return v


def _i(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected int")
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError("expected a list")
    return v


class Client:
    """One person's profile: their rooms on any number of relays."""

    def __init__(
        self,
        store: Store,
        *,
        proxy: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.proxy = proxy
        self.clock = clock
        self._http: dict[str, RelayHttp] = {}
        self.notices: list[tuple[bytes, str]] = []
        self.on_line: Callable[[Room, Line], None] | None = None
        # Disappearing messages: lapsed local copies go as soon as the profile is opened.
        store.purge_expired(self.now())

    # --- profile -------------------------------------------------------------------------

    @staticmethod
    def init_profile(store: Store, relay: str, name: str, affiliation: str | None = None) -> None:
        if store.get("profile", b"me") is not None:
            raise ClientError("a profile already exists here", hint="use another --home")
        try:
            check_relay_url(relay)
        except ProtocolError as exc:
            raise ClientError(f"not a usable relay URL: {exc}") from None
        profile: dict[str, Value] = {"name": name, "relay": relay}
        if affiliation:
            profile["affiliation"] = affiliation
        store.put("profile", b"me", encode(profile))

    def profile(self) -> dict[str, str]:
        data = self.store.get("profile", b"me")
        if data is None:
            raise ClientError(
                "no profile yet", hint="run `backchannel init --relay URL --name NAME`"
            )
        value = decode(data)
        assert isinstance(value, dict)
        return {k: str(v) for k, v in value.items()}

    async def aclose(self) -> None:
        for http in self._http.values():
            await http.aclose()
        self._http.clear()

    def http(self, relay: str) -> RelayHttp:
        if relay not in self._http:
            self._http[relay] = RelayHttp(relay, proxy=self.proxy, clock=self.clock)
        return self._http[relay]

    def now(self) -> int:
        return int(self.clock())

    # --- rooms on disk ---------------------------------------------------------------------

    def rooms(self) -> list[Room]:
        return sorted((Room.from_bytes(v) for v in self.store.values("room")), key=lambda r: r.name)

    def room(self, query: str) -> Room:
        """A room by local name, title or unique id prefix."""
        rooms = self.rooms()
        for test in (
            lambda r: r.name == query,
            lambda r: r.title == query,
            lambda r: len(query) >= 4 and r.room_id.hex().startswith(query.lower()),
        ):
            found = [r for r in rooms if test(r)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ClientError(f"{query!r} matches several rooms", hint="use the local name")
        raise ClientError(f"no room {query!r}", hint="`backchannel rooms` lists yours")

    def _save(self, room: Room) -> None:
        self.store.put("room", room.room_id, room.to_bytes())

    def _local_name(self, title: str) -> str:
        base = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")[:24] or "room"
        taken = {r.name for r in self.rooms()}
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    # --- create, invite, join --------------------------------------------------------------

    async def create_room(self, title: str, rules: L.Rules, *, token: str | None = None) -> Room:
        relay = self.profile()["relay"]
        key = MemberKeyPair.generate()
        event = L.make_create(key, rules, self.now())
        await self.http(relay).create_room(event, token)
        room = Room(
            room_id=L.event_hash(event),
            name=self._local_name(title),
            title=title,
            relay=relay,
            key=key,
            log=L.validate_log([event]),
        )
        with self.store.transaction():
            self._save(room)
            self._new_sender_key(room, since=0)
        await self._upload_prekeys(room, fresh=True)
        return room

    async def invite(self, room: Room, role: L.Role, expires: int, uses: int) -> str:
        await self.sync_log(room)
        self._require_usable(room)
        if room.state.role_of(room.me) != "facilitator":
            raise ClientError("only a facilitator can invite")
        event, seed = L.make_invite(
            room.key, room.state, role, self.now() + expires, uses, self.now()
        )
        await self._append(room, event)
        return InviteCode.for_room(room.relay, room.state, seed).to_text()

    async def preview(self, code_text: str) -> tuple[InviteCode, L.RoomLog, L.Invite]:
        """Fetch and validate the room an invite code names, before joining."""
        try:
            code = InviteCode.from_text(code_text)
        except ProtocolError as exc:
            raise ClientError(f"this is not a valid invite code: {exc}") from None
        try:
            events = await self.http(code.relay_url).preview(code.room_id, code.invite_seed)
        except RelayError as exc:
            if exc.code in ("invalid_invite", "not_found", "unknown_invite"):
                raise ClientError(
                    "the invite is expired, used up or unknown", hint="ask for a new one"
                ) from None
            raise
        try:
            log = L.validate_log(events)
            invite = code.check_state(log.state)
        except ProtocolError as exc:
            raise ClientError(f"the relay served a room that does not check out: {exc}") from None
        if invite.uses_left <= 0 or invite.expires <= self.now():
            raise ClientError("the invite is expired or used up", hint="ask for a new one")
        return code, log, invite

    async def join(self, code_text: str, *, accept_rules: Callable[[L.Rules], bool]) -> Room:
        code, log, _invite = await self.preview(code_text)
        if not accept_rules(log.state.rules):
            raise ClientError("you did not accept the room's rules; nothing was done")
        key = MemberKeyPair.generate()
        event = L.make_join(key, code.invite_seed, log.state, self.now())
        try:
            await self.http(code.relay_url).append(code.room_id, event)
        except RelayError as exc:
            raise ClientError(f"the relay refused the join: {exc}") from None
        log.append(event)
        room = Room(
            room_id=code.room_id,
            name=self._local_name(f"room-{code.room_id.hex()[:6]}"),
            title="",
            relay=code.relay_url,
            key=key,
            log=log,
        )
        with self.store.transaction():
            self._save(room)
            self._new_sender_key(room, since=log.state.pos)
        await self._upload_prekeys(room, fresh=True)
        return room

    async def _append(self, room: Room, event: bytes) -> None:
        try:
            await self.http(room.relay).append(room.room_id, event)
        except RelayError as exc:
            if exc.code in ("chain_broken", "conflict"):
                raise ClientError(
                    "the room changed meanwhile; try again", hint="run `backchannel read`"
                ) from None
            raise
        await self.sync_log(room)

    async def remove(self, room: Room, member: bytes) -> None:
        await self.sync_log(room)
        self._require_usable(room)
        if room.state.role_of(room.me) != "facilitator":
            raise ClientError("only a facilitator can remove members")
        await self._append(room, L.make_remove(room.key, room.state, member, self.now()))

    async def leave(self, room: Room) -> None:
        await self.sync_log(room)
        if room.status == "active":
            await self._append(room, L.make_leave(room.key, room.state, self.now()))

    # --- the log ---------------------------------------------------------------------------

    def _require_usable(self, room: Room) -> None:
        if room.status == "compromised":
            raise ClientError(
                f"this room failed validation and is locked: {room.problem}",
                hint="compare safety numbers with the facilitator out of band",
            )
        if room.status in ("removed", "left"):
            raise ClientError("you are no longer a member of this room")

    async def sync_log(self, room: Room) -> list[L.Event]:
        """Fetch and validate new log events; act on joins and departures."""
        if room.status == "compromised":
            return []
        signer = room.key.sign_seed
        try:
            events = await self.http(room.relay).events(room.room_id, len(room.log) - 1, signer)
        except RelayError as exc:
            if exc.status in (401, 403) and room.status == "active":
                # We can no longer read the log: we were removed. Confirmed
                # only by the log itself, so keep the status until we see it.
                return []
            raise
        new: list[L.Event] = []
        for data in events:
            try:
                room.log.append(data)
            except L.DuplicateEvent:
                # Harmless (the chain makes it a no-op) but not what an honest relay does.
                self._warn(room, "the relay re-sent a log event we already had; ignored")
                continue
            except ProtocolError as exc:
                self._compromise(room, f"the room log does not validate ({exc.code})")
                return new
            new.append(room.log.decoded(room.log.state.pos))
        with self.store.transaction():
            for event in new:
                self._after_event(room, event)
            self._save(room)
        return new

    def _after_event(self, room: Room, event: L.Event) -> None:
        pos = event.pos
        if isinstance(event, L.RemoveEvent | L.LeaveEvent):
            gone = event.target if isinstance(event, L.RemoveEvent) else event.author
            if gone == room.me:
                room.status = "removed" if isinstance(event, L.RemoveEvent) else "left"
                self._notice(
                    room,
                    "you were removed from this room"
                    if room.status == "removed"
                    else "you left this room",
                )
                return
            self._retire_inbound(room, pos)
            self._new_sender_key(room, since=pos)
            self._notice(
                room,
                f"{self.display_name(room, gone)} "
                f"{'was removed' if isinstance(event, L.RemoveEvent) else 'left'}"
                "; keys rotated",
            )
        elif isinstance(event, L.JoinEvent) and event.member.sign != room.me:
            self._notice(room, f"{self.display_name(room, event.member.sign)} joined")
        elif isinstance(event, L.SetRulesEvent):
            self._notice(
                room,
                f"the rules changed: {event.rules.mode}, "
                f"messages kept {event.rules.retention // 3600} h",
            )

    def _compromise(self, room: Room, reason: str) -> None:
        room.status = "compromised"
        room.problem = reason
        with self.store.transaction():
            self._save(room)
            self._warn(room, reason)

    # --- transcript ------------------------------------------------------------------------

    def _add_line(self, room: Room, entry: dict[str, Value], ts: int | None = None) -> None:
        ts = self.now() if ts is None else ts
        entry["ts"] = ts
        expires = self.now() + room.state.rules.retention
        n = self.store.add_message(room.room_id, encode(entry), expires)
        if self.on_line is not None:
            self.on_line(room, _line(n, entry, room.me))

    def _notice(self, room: Room, text: str) -> None:
        self._add_line(room, {"kind": "notice", "text": text})

    def _warn(self, room: Room, text: str) -> None:
        self.notices.append((room.room_id, text))
        self._add_line(room, {"kind": "warning", "text": text})

    def lines(self, room: Room, after: int = -1) -> list[Line]:
        self.store.purge_expired(self.now())
        out = []
        for n, data in self.store.messages(room.room_id, after=after):
            value = decode(data)
            assert isinstance(value, dict)
            out.append(_line(n, value, room.me))
        return out

    # --- members and profiles --------------------------------------------------------------

    def _peers(self, room: Room) -> dict[bytes, dict[str, Value]]:
        data = self.store.get("peers", room.room_id)
        if data is None:
            return {}
        value = decode(data)
        assert isinstance(value, dict)
        return {bytes.fromhex(k): v for k, v in value.items()}  # type: ignore[misc]

    def _save_peers(self, room: Room, peers: dict[bytes, dict[str, Value]]) -> None:
        self.store.put("peers", room.room_id, encode({k.hex(): v for k, v in peers.items()}))

    def display_name(self, room: Room, sign: bytes) -> str:
        if sign == room.me:
            return "you"
        if room.state.rules.mode != "anonymous":
            name = self._peers(room).get(sign, {}).get("name")
            if isinstance(name, str) and name:
                return name
        return pseudonym(room.room_id, sign)

    def members(self, room: Room) -> list[MemberView]:
        peers = self._peers(room)
        out = []
        for member in room.state.members.values():
            info = peers.get(member.key.sign, {})
            out.append(
                MemberView(
                    key=member.key,
                    role=member.role,
                    name=self.display_name(room, member.key.sign),
                    affiliation=None
                    if room.state.rules.mode == "anonymous"
                    else (str(info["aff"]) if "aff" in info else None),
                    verified=info.get("verified") == member.key.fingerprint(),
                    me=member.key.sign == room.me,
                )
            )
        return sorted(out, key=lambda m: (not m.me, m.name))

    def member(self, room: Room, query: str) -> MemberView:
        views = [m for m in self.members(room) if not m.me]
        for test in (
            lambda m: m.name == query,
            lambda m: len(query) >= 4 and m.fingerprint.startswith(query.lower().replace(" ", "")),
        ):
            found = [m for m in views if test(m)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ClientError(f"{query!r} matches several members", hint="use a fingerprint")
        raise ClientError(f"no member {query!r} in this room", hint="`backchannel members ROOM`")

    def safety(self, room: Room, member: MemberView) -> SafetyNumber:
        return safety_number(room.key.public, member.key, room_id=room.room_id)

    def mark_verified(self, room: Room, member: MemberView) -> None:
        with self.store.transaction():
            peers = self._peers(room)
            peers.setdefault(member.key.sign, {})["verified"] = member.key.fingerprint()
            self._save_peers(room, peers)

    # --- prekeys -----------------------------------------------------------------------------

    def _prekeys(self, room: Room) -> dict[str, Any]:
        data = self.store.get("prekeys", room.room_id)
        if data is None:
            return {"next": 1, "keys": []}
        value = decode(data, max_size=16 << 20)
        assert isinstance(value, dict)
        return value

    def _prekey_lookup(
        self, room: Room
    ) -> tuple[Callable[[PreKeyKind, int], tuple[PreKey, PreKeyPrivate] | None], dict[str, Any]]:
        record = self._prekeys(room)
        table = {
            (str(k), int(i)): (PreKey.from_value(decode(pk)), PreKeyPrivate(k, i, priv))
            for k, i, pk, priv in record["keys"]
        }
        return (lambda kind, key_id: table.get((kind, key_id))), record

    async def _upload_prekeys(
        self,
        room: Room,
        *,
        fresh: bool,
        rotate_spk: bool = False,
        opk: int = 0,
        kem: int = 0,
    ) -> None:
        record = self._prekeys(room)
        next_id = int(record["next"])
        made: list[tuple[PreKey, PreKeyPrivate]] = []
        now = self.now()
        keys = list(record["keys"])
        if fresh:
            keys = [k for k in keys if k[0] not in ("spk", "kem-lr")]
            made.append(generate_kem_prekey(room.key, "kem-lr", next_id, now))
            next_id += 1
            opk, kem = ONE_TIME_PREKEYS, KEM_PREKEYS
        if fresh or rotate_spk:
            # Keep the newest previous signed prekey: a peer may have fetched it
            # just before the rotation and its first message is still on the way.
            spks = sorted((k for k in keys if k[0] == "spk"), key=lambda k: int(k[1]))
            keys = [k for k in keys if k[0] != "spk"] + spks[-1:]
            made.append(generate_x25519_prekey(room.key, "spk", next_id, now))
            next_id += 1
        for _ in range(opk):
            made.append(generate_x25519_prekey(room.key, "opk", next_id, now))
            next_id += 1
        for _ in range(kem):
            made.append(generate_kem_prekey(room.key, "kem", next_id, now))
            next_id += 1
        if not made:
            return
        keys += [[p.kind, p.id, encode(p.to_value()), priv.private] for p, priv in made]
        with self.store.transaction():
            self.store.put("prekeys", room.room_id, encode({"keys": keys, "next": next_id}))
        upload = PreKeyUpload(member=room.key.public, prekeys=[p for p, _ in made])
        await self.http(room.relay).upload_prekeys(upload.to_bytes())

    def _signed_prekey_time(self, room: Room) -> int:
        times = [
            PreKey.from_value(decode(_b(k[2]))).ts
            for k in self._prekeys(room)["keys"]
            if k[0] == "spk"
        ]
        return max(times, default=0)

    async def replenish_prekeys(self, room: Room) -> None:
        """Top up one-time prekeys on the relay when others have used most of them."""
        upload = PreKeyUpload(member=room.key.public, prekeys=[])
        try:
            counts = (await self.http(room.relay).upload_prekeys(upload.to_bytes()))["counts"]
            opk, kem = int(counts.get("opk", 0)), int(counts.get("kem", 0))
            rotate = self.now() - self._signed_prekey_time(room) > SIGNED_PREKEY_ROTATE
            if min(opk, kem) < REPLENISH_BELOW or rotate:
                await self._upload_prekeys(
                    room,
                    fresh=False,
                    rotate_spk=rotate,
                    opk=max(0, ONE_TIME_PREKEYS - opk),
                    kem=max(0, KEM_PREKEYS - kem),
                )
        except RelayError as exc:
            # Sessions still open without one-time prekeys (the last-resort KEM
            # prekey and the signed prekey remain); try again next time.
            self._warn(room, f"could not top up prekeys ({exc.code})")

    # --- sender keys ---------------------------------------------------------------------------

    def _new_sender_key(self, room: Room, since: int) -> None:
        previous = self.store.get("out", room.room_id)
        out = OutboundSenderKey.generate(
            room.room_id,
            room.me,
            since=since,
            previous=None if previous is None else OutboundSenderKey.from_bytes(previous),
        )
        self.store.put("out", room.room_id, out.to_bytes())
        self.store.put("dist", room.room_id, encode({"gen": out.generation, "to": []}))

    def _inbound(self, room: Room) -> dict[tuple[bytes, int], InboundSenderKey]:
        data = self.store.get("in", room.room_id)
        if data is None:
            return {}
        value = decode(data, max_size=64 << 20)
        assert isinstance(value, list)
        keys = [InboundSenderKey.from_bytes(_b(v)) for v in value]
        return {(k.owner, k.generation): k for k in keys}

    def _save_inbound(self, room: Room, keys: dict[tuple[bytes, int], InboundSenderKey]) -> None:
        self.store.put("in", room.room_id, encode([k.to_bytes() for k in keys.values()]))

    def _retire_inbound(self, room: Room, pos: int) -> None:
        keys = self._inbound(room)
        for key in keys.values():
            key.retire(pos)
        self._save_inbound(room, keys)

    # --- pairwise ------------------------------------------------------------------------------

    def _sessions(self, room: Room, peer: bytes) -> list[PairwiseSession]:
        data = self.store.get("sessions", room.room_id + peer)
        if data is None:
            return []
        value = decode(data, max_size=64 << 20)
        assert isinstance(value, list)
        return [PairwiseSession.from_bytes(_b(v)) for v in value]

    def _save_sessions(self, room: Room, peer: bytes, sessions: list[PairwiseSession]) -> None:
        self.store.put(
            "sessions",
            room.room_id + peer,
            encode([s.to_bytes() for s in sessions[-MAX_SESSIONS_PER_PEER:]]),
        )

    async def _session_for(self, room: Room, peer: MemberPublicKey) -> list[PairwiseSession]:
        sessions = self._sessions(room, peer.sign)
        if sessions:
            return sessions
        raw = await self.http(room.relay).claim(peer.sign, room.key.sign_seed)
        try:
            bundle = PreKeyBundle.from_bytes(raw)
            session = PairwiseSession.initiate(
                room.key, bundle, peer, now=self.now(), max_spk_age=SIGNED_PREKEY_MAX_AGE
            )
        except ProtocolError as exc:
            self._warn(
                room,
                f"the relay served a bad key bundle for {self.display_name(room, peer.sign)}"
                f" ({exc.code}); not sending to them",
            )
            raise
        return [session]

    async def _pairwise(
        self, sock: RelaySocket, room: Room, peer: MemberPublicKey, payload: dict[str, Value]
    ) -> None:
        """Encrypt ``payload`` to ``peer`` and put it in its mailbox (durably, then ack)."""
        sessions = await self._session_for(room, peer)
        cid = P.random_bytes(16)
        # Sending session: the newest we initiated, else the newest at all.
        sender = next((s for s in reversed(sessions) if s.is_initiator), sessions[-1])
        data = sender.encrypt(encode(payload))
        with self.store.transaction():
            self._save_sessions(room, peer.sign, sessions)
        await sock.request(
            "psend", room=room.room_id, **{"from": room.me}, to=peer.sign, cid=cid, data=data
        )

    async def _distribute(self, sock: RelaySocket, room: Room) -> None:
        """Make sure every current member has our current sender key (and our profile)."""
        out = OutboundSenderKey.from_bytes(_b(self.store.get("out", room.room_id)))
        dist_value = decode(_b(self.store.get("dist", room.room_id)))
        assert isinstance(dist_value, dict)
        done = {_b(x) for x in _list(dist_value["to"])}
        profile = self.profile()
        for member in room.state.members.values():
            sign = member.key.sign
            if sign == room.me or sign in done:
                continue
            payload: dict[str, Value] = {"skd": out.distribution().to_bytes(), "t": "keys"}
            if room.state.rules.mode != "anonymous":
                payload["name"] = profile["name"]
                if profile.get("affiliation"):
                    payload["aff"] = profile["affiliation"]
            if room.state.role_of(room.me) == "facilitator" and room.title:
                payload["title"] = room.title
            try:
                await self._pairwise(sock, room, member.key, payload)
            except (RelayError, ProtocolError):
                continue  # reported; retried on the next send
            done.add(sign)
            self.store.put(
                "dist", room.room_id, encode({"gen": out.generation, "to": sorted(done)})
            )

    # --- live connection -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connect(self, rooms: list[Room]) -> AsyncIterator[RelaySocket]:
        relays = {r.relay for r in rooms}
        if len(relays) != 1:
            raise ClientError("one relay at a time")
        active = [r for r in rooms if r.status == "active"]
        sock = await RelaySocket.connect(relays.pop(), [r.key for r in active], proxy=self.proxy)
        try:
            await self._flush_outbox(sock, active)
            for room in active:
                await sock.send("sub", room=room.room_id, after=room.cursor)
            for room in active:
                # Newcomers get our sender key and profile as soon as we are
                # online, not only when we next speak.
                await self.sync_log(room)
                if room.status == "active":
                    await self._distribute(sock, room)
                    await self.replenish_prekeys(room)
            yield sock
        finally:
            await sock.close()

    async def send_text(
        self, sock: RelaySocket, room: Room, text: str, *, to: bytes | None = None
    ) -> None:
        await self.sync_log(room)
        self._require_usable(room)
        if to is not None:
            peer = room.state.members.get(to)
            if peer is None:
                raise ClientError("that member is not in the room")
            await self._pairwise(
                sock, room, peer.key, {"t": "sidebar", "text": text, "ts": self.now()}
            )
            self._add_line(room, {"kind": "sidebar", "text": text, "from": room.me, "to": to})
            return
        if room.state.role_of(room.me) == "observer":
            raise ClientError("observers cannot post in this room")
        await self._distribute(sock, room)
        await self._flush_outbox(sock, [room])  # anything older goes first
        cid = P.random_bytes(16)
        with self.store.transaction():
            out = OutboundSenderKey.from_bytes(_b(self.store.get("out", room.room_id)))
            body = encode({"t": "text", "text": text, "ts": self.now()})
            envelope = out.seal(body, room.state.epoch)
            self.store.put("out", room.room_id, out.to_bytes())
            self.store.put(
                "outbox",
                room.room_id + cid,
                encode({"cid": cid, "data": envelope, "room": room.room_id}),
            )
            self._add_line(room, {"kind": "message", "text": text, "from": room.me})
        await self._send_envelope(sock, room, cid, envelope)

    async def _send_envelope(self, sock: RelaySocket, room: Room, cid: bytes, data: bytes) -> None:
        # The relay stores a retried cid once, so resending after a crash is safe.
        await sock.request("send", room=room.room_id, **{"from": room.me}, cid=cid, data=data)
        self.store.delete("outbox", room.room_id + cid)

    async def _flush_outbox(self, sock: RelaySocket, rooms: list[Room]) -> None:
        """Send what a previous run sealed and stored but never saw acknowledged."""
        by_id = {r.room_id: r for r in rooms}
        queued = []
        for raw in self.store.values("outbox"):
            item = decode(raw)
            assert isinstance(item, dict)
            room = by_id.get(_b(item["room"]))
            if room is not None:
                envelope = RoomEnvelope.from_bytes(_b(item["data"]))
                queued.append(((envelope.generation, envelope.index), room, item))
        # In the order they were sealed, so receivers see no reordering.
        for _order, room, item in sorted(queued, key=lambda q: q[0]):
            await self._send_envelope(sock, room, _b(item["cid"]), _b(item["data"]))

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
                caught_up = True
                continue
            await self.handle_frame(sock, by_id, frame)

    async def handle_frame(self, sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        if frame.type == "pmsg":
            await self._on_pairwise(sock, rooms, frame)
        elif frame.type == "msg":
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                await self._on_room_message(room, frame)
        elif frame.type in ("event", "removed"):
            room = rooms.get(_b(frame["room"]))
            if room is not None:
                await self.sync_log(room)
        elif frame.type == "error":
            room_id = frame.get("room")
            text = f"the relay reported: {frame.get('detail')} ({frame.get('code')})"
            if isinstance(room_id, bytes) and room_id in rooms:
                self._warn(rooms[room_id], text)

    async def _on_pairwise(self, sock: RelaySocket, rooms: dict[bytes, Room], frame: Frame) -> None:
        room = rooms.get(_b(frame["room"]))
        item = frame["id"]
        if room is None:
            await sock.send("ack", ids=[item])
            return
        sender = _b(frame["from"])
        member = room.state.members.get(sender)
        if member is None:
            await self.sync_log(room)
            member = room.state.members.get(sender)
        if member is None:
            self._warn(room, "a pairwise message from someone who is not a member was refused")
            await sock.send("ack", ids=[item])
            return
        data = _b(frame["data"])
        done = self._processed(room)
        # The relay's id alone is not enough: ids may be reused once acknowledged.
        # Only the same id with the same bytes is the redelivery of what we did.
        mark = [_i(item), P.hash_bytes(b"bc-pmsg-seen", data, 16)]
        if mark in done:
            # Processed and committed before, but our ack never reached the
            # relay (a crash or a dropped connection): acknowledge it again.
            await sock.send("ack", ids=[item])
            return
        try:
            # Session state, what the message carried and the fact that we
            # processed it commit together, or not at all.
            with self.store.transaction():
                plaintext = self._decrypt_pairwise(room, member.key, data)
                kind = self._on_payload(room, member.key.sign, plaintext)
                self._mark_processed(room, done, mark)
        except (ProtocolError, ValueError, KeyError, TypeError) as exc:
            code = exc.code if isinstance(exc, ProtocolError) else "malformed"
            self._warn(
                room,
                f"a pairwise message from {self.display_name(room, sender)} was refused ({code})",
            )
        else:
            if kind == "keys":
                await self.retry_stash(room)  # messages that waited for this key
        await sock.send("ack", ids=[item])

    def _processed(self, room: Room) -> list[list[Any]]:
        data = self.store.get("processed", room.room_id)
        return [] if data is None else [list(x) for x in _list(decode(data, max_size=1 << 20))]

    def _mark_processed(self, room: Room, done: list[list[Any]], mark: list[Any]) -> None:
        self.store.put("processed", room.room_id, encode([*done, mark][-MAX_PROCESSED:]))

    def _decrypt_pairwise(self, room: Room, peer: MemberPublicKey, data: bytes) -> bytes:
        sessions = self._sessions(room, peer.sign)
        duplicate: DuplicateMessage | None = None
        for session in reversed(sessions):
            try:
                plaintext = session.decrypt(data)
            except DuplicateMessage as exc:
                duplicate = exc
                continue
            except (NewSession, ProtocolError):
                continue
            self._save_sessions(room, peer.sign, sessions)
            return plaintext
        if duplicate is not None:
            # One of our sessions already used this message's key: a replay,
            # not a new session (whose prekeys would be gone anyway).
            raise duplicate
        lookup, record = self._prekey_lookup(room)
        accepted = PairwiseSession.accept(room.key, data, initiator=peer, prekeys=lookup)
        consumed = {(k, i) for k, i in accepted.consumed if k in ("opk", "kem")}
        record["keys"] = [k for k in record["keys"] if (k[0], k[1]) not in consumed]
        self.store.put("prekeys", room.room_id, encode(record))
        self._save_sessions(room, peer.sign, [*sessions, accepted.session])
        return accepted.plaintext

    def _on_payload(self, room: Room, sender: bytes, plaintext: bytes) -> str:
        value = decode(plaintext)
        if not isinstance(value, dict):
            raise ProtocolError("pairwise payload is not a map")
        kind = value.get("t")
        if kind == "keys":
            dist = SenderKeyDistribution.from_bytes(_b(value["skd"]))
            if dist.owner != sender or dist.room_id != room.room_id:
                raise UnknownSenderKey("a sender key for someone else")
            keys = self._inbound(room)
            if (sender, dist.generation) not in keys:
                previous = keys.get((sender, dist.generation - 1))
                if previous is not None and previous.index < dist.prev_count:
                    # The sender says how many it sent under its old key: a
                    # dropped tail shows up here rather than as silence.
                    lost = dist.prev_count - previous.index + len(previous.missing())
                    self._warn(
                        room,
                        f"{lost} message(s) from {self.display_name(room, sender)} "
                        "under their previous key never arrived",
                    )
                keys[(sender, dist.generation)] = InboundSenderKey.from_distribution(dist)
                # A departure after the key was made retires it like the others.
                for event_pos in range(dist.since + 1, room.state.length):
                    if isinstance(room.log.decoded(event_pos), L.RemoveEvent | L.LeaveEvent):
                        keys[(sender, dist.generation)].retire(event_pos)
                        break
                self._save_inbound(room, keys)
            peers = self._peers(room)
            info = peers.setdefault(sender, {})
            if room.state.rules.mode != "anonymous":
                if isinstance(value.get("name"), str):
                    info["name"] = _clip(str(value["name"]), 64)
                if isinstance(value.get("aff"), str):
                    info["aff"] = _clip(str(value["aff"]), 128)
            self._save_peers(room, peers)
            title = value.get("title")
            if (
                isinstance(title, str)
                and not room.title
                and room.state.role_of(sender) == "facilitator"
            ):
                room.title = _clip(title, 200)
                self._save(room)
        elif kind == "sidebar":
            self._add_line(
                room,
                {
                    "kind": "sidebar",
                    "text": str(value.get("text", "")),
                    "from": sender,
                    "to": room.me,
                },
            )
        return str(kind)

    async def _on_room_message(self, room: Room, frame: Frame) -> None:
        seq = _i(frame["seq"])
        data = _b(frame["data"])
        try:
            envelope = RoomEnvelope.from_bytes(data)
        except ProtocolError as exc:
            self._warn(room, f"a malformed room message was refused ({exc.code})")
            self._advance(room, seq)
            return
        if envelope.room_id != room.room_id:
            self._warn(room, "a message from another room was refused")
            self._advance(room, seq)
            return
        mine = room.state.members.get(room.me)
        if envelope.sender == room.me or (mine is not None and envelope.epoch_pos < mine.since):
            self._advance(room, seq)  # our own, or from before we joined: not ours to read
            return
        if envelope.epoch_pos >= room.state.length:
            # Only a hint until the signature is checked: fetch what it names.
            await self.sync_log(room)
        if room.status == "compromised":
            return
        fork = False
        with self.store.transaction():
            keys = self._inbound(room)
            key = keys.get((envelope.sender, envelope.generation))
            if key is None:
                self._stash(room, data)  # its key may still be on the way
                self._advance(room, seq)
                return
            who = self.display_name(room, envelope.sender)
            try:
                body = key.open(envelope, authorise=lambda env: self._authorise(room, env))
            except NotInEpoch:
                pass  # sent before we joined or after we left: not ours to read
            except ForkDetected:
                fork = True
            except DuplicateMessage:
                self._warn(room, f"a replayed message from {who} was dropped")
            except StaleSenderKey:
                self._warn(room, f"a message under a retired key from {who} was refused")
            except NotAuthorized as exc:
                self._warn(room, f"a room message was refused ({exc})")
            except ProtocolError as exc:
                self._warn(room, f"a message claiming to be from {who} was refused ({exc.code})")
            else:
                value = decode(body)
                if isinstance(value, dict) and value.get("t") == "text":
                    self._add_line(
                        room,
                        {
                            "kind": "message",
                            "text": str(value.get("text", "")),
                            "from": envelope.sender,
                        },
                    )
                gaps = key.missing()
                if gaps:
                    self._warn(room, f"{len(gaps)} message(s) from {who} have not arrived")
                self._save_inbound(room, keys)
            self._advance(room, seq)
        if fork:
            self._compromise(room, "the relay showed members different room logs (fork)")

    @staticmethod
    def _authorise(room: Room, envelope: RoomEnvelope) -> None:
        """Judge a signature-checked envelope against our validated log."""
        if check_epoch(room.log, envelope, room.me) == "ahead":
            raise ForkDetected("the message names log events the relay does not show us")

    def _stash(self, room: Room, data: bytes) -> None:
        stash = self.store.get("stash", room.room_id)
        items = [] if stash is None else _list(decode(stash, max_size=256 << 20))
        items = [*items, data][-MAX_STASH:]
        self.store.put("stash", room.room_id, encode(items))

    def _advance(self, room: Room, seq: int) -> None:
        if seq > room.cursor:
            room.cursor = seq
            self._save(room)

    async def retry_stash(self, room: Room) -> None:
        data = self.store.get("stash", room.room_id)
        if data is None:
            return
        self.store.delete("stash", room.room_id)
        for item in _list(decode(data, max_size=256 << 20)):
            await self._on_room_message(room, Frame("msg", {"seq": 0, "data": item}))


def _clip(text: str, limit: int) -> str:
    return text[:limit]


def _line(n: int, entry: dict[str, Value], me: bytes) -> Line:
    sender = entry.get("from")
    to = entry.get("to")
    return Line(
        n=n,
        kind=str(entry.get("kind")),
        sender=sender if isinstance(sender, bytes) else None,
        text=str(entry.get("text", "")),
        ts=int(_i(entry.get("ts", 0))),
        mine=sender == me,
        to=to if isinstance(to, bytes) else None,
    )


_ADJECTIVES = (
    "amber",
    "azure",
    "brisk",
    "calm",
    "cedar",
    "coral",
    "dusk",
    "ember",
    "fern",
    "frost",
    "gold",
    "hazel",
    "indigo",
    "ivory",
    "jade",
    "lilac",
    "maple",
    "moss",
    "ochre",
    "olive",
    "pearl",
    "quiet",
    "rust",
    "sage",
    "slate",
    "stone",
    "teal",
    "umber",
    "violet",
    "willow",
)
_NOUNS = (
    "badger",
    "crane",
    "dove",
    "egret",
    "falcon",
    "finch",
    "fox",
    "gull",
    "hare",
    "heron",
    "ibis",
    "jay",
    "kestrel",
    "lark",
    "lynx",
    "marten",
    "otter",
    "owl",
    "plover",
    "raven",
    "robin",
    "seal",
    "stork",
    "swift",
    "tern",
    "thrush",
    "wren",
    "yak",
    "zebu",
    "wolf",
)


def pseudonym(room_id: bytes, sign: bytes) -> str:
    """A stable per-room pseudonym for a member key (the same on every client)."""
    digest = P.hash_bytes(b"bc-pseudonym", room_id + sign, 16)
    a = _ADJECTIVES[digest[0] % len(_ADJECTIVES)]
    b = _NOUNS[digest[1] % len(_NOUNS)]
    return f"{a}-{b}-{int.from_bytes(digest[2:4], 'big') % 100:02d}"
