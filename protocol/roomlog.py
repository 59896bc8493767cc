"""The room log: an append-only, hash-chained log of signed membership events.

Specification: DESIGN.md §3 "Room log", "Invites" and "Rules"; normative text in
docs/protocol.md, section "Room log" (docs/sections/log.md).

A room *is* its log. The first event, ``create``, names the first facilitator
and the rules; the room id is the hash of that event, so a relay cannot swap
rooms. Every later event names its position and the hash of its predecessor,
so the relay can neither reorder nor splice logs, and every event is signed by
its author's member key, so the relay cannot invent one. ``join`` is signed a
second time by the invite key, whose private half only travels out of band:
nobody but a facilitator (who made the invite) and the invitee (who holds the
code) can admit a member.

:func:`apply_event` is the one validator: the relay and every client call it
(through :class:`RoomLog`), so there is a single definition of a valid log.
It checks, then folds the event into a new immutable :class:`RoomState`; on
any error nothing changes. It takes no clock: the relay additionally compares
``join.ts`` with its own clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Final, Literal, TypeAlias

from . import primitives as P
from .encoding import Reader, Value, check_bytes, decode, encode
from .errors import (
    ChainBroken,
    DecodeError,
    ForkDetected,
    InvalidInvite,
    LogError,
    MembershipError,
    NotAuthorized,
)
from .keys import MemberKeyPair, MemberPublicKey, signing_input

EVENT_VERSION: Final = 1
RULES_VERSION: Final = 1
STATE_VERSION: Final = 1
LOG_VERSION: Final = 1

HASH_SIZE: Final = 32
NONCE_SIZE: Final = 16
#: Largest timestamp (seconds) any event may carry; about 8.9 million years.
MAX_TIME: Final = (1 << 48) - 1
#: Hard upper bound the decoder applies to ``pos`` and ``uses`` before any limit.
_MAX_COUNT: Final = (1 << 32) - 1

MIN_RETENTION: Final = 60
MAX_RETENTION: Final = 10 * 365 * 86_400
DEFAULT_RETENTION: Final = 7 * 86_400

LABEL_EVENT: Final = b"bc-log-event"
LABEL_RULES: Final = b"bc-rules"
CTX_EVENT: Final = "log-event"
CTX_JOIN_INVITE: Final = "log-join-invite"

Role: TypeAlias = Literal["facilitator", "participant", "observer"]
ROLES: Final[tuple[Role, ...]] = ("facilitator", "participant", "observer")
Mode: TypeAlias = Literal["chatham", "attributed", "anonymous"]
MODES: Final[tuple[Mode, ...]] = ("chatham", "attributed", "anonymous")
EVENT_TYPES: Final = (
    "create",
    "invite",
    "join",
    "remove",
    "leave",
    "set_role",
    "set_rules",
    "revoke",
)


# --- errors local to the log ------------------------------------------------------------


class DuplicateEvent(ChainBroken):
    """The exact event is already in the log (a retry or a replay).

    A relay may treat this as an idempotent success of a retried append.
    """

    code = "duplicate_event"


class LogFull(LogError):
    """The log already holds ``max_length`` events."""

    code = "log_full"


class RoomFull(MembershipError):
    """A join would exceed ``max_members`` current members."""

    code = "room_full"


class RulesMismatch(LogError):
    """A join acknowledges rules other than the room's current rules."""

    code = "rules_mismatch"


class UnknownPosition(LogError):
    """A position that is not (yet) in this log was asked for."""

    code = "unknown_position"


# --- limits -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogLimits:
    """Resource bounds. Every implementation MUST accept logs within the
    defaults; a relay MAY refuse appends beyond lower limits of its own, but a
    client must never use lower limits than its relay or it will reject a
    room the relay accepted.
    """

    #: Events in one log (create included).
    max_length: int = 10_000
    #: Current members at any time.
    max_members: int = 1_000
    #: ``uses`` of one invite.
    max_uses: int = 1_000
    #: Encoded size of one event in bytes.
    max_event_size: int = 1_024


DEFAULT_LIMITS: Final = LogLimits()


# --- rules --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rules:
    """A room's rules (DESIGN.md §3 "Rules").

    ``retention`` is in seconds, ``MIN_RETENTION``..``MAX_RETENTION``. There is
    deliberately no "keep forever" value: every room has a finite retention.
    """

    mode: Mode = "chatham"
    retention: int = DEFAULT_RETENTION

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DecodeError("rules: unknown mode")
        if (
            isinstance(self.retention, bool)
            or not isinstance(self.retention, int)
            or not MIN_RETENTION <= self.retention <= MAX_RETENTION
        ):
            raise DecodeError("rules: retention out of range")

    def to_value(self) -> Value:
        return {"mode": self.mode, "retention": self.retention, "v": RULES_VERSION}

    @classmethod
    def from_value(cls, value: Value, what: str = "rules") -> Rules:
        r = Reader.of(value, what)
        r.version(RULES_VERSION)
        mode = r.text("mode", 16, MODES)
        retention = r.integer("retention", MIN_RETENTION, MAX_RETENTION)
        r.done()
        return cls(mode=mode, retention=retention)  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        return encode(self.to_value())

    @classmethod
    def from_bytes(cls, data: bytes) -> Rules:
        return cls.from_value(decode(data, max_size=128))

    def rules_hash(self) -> bytes:
        """What a ``join`` signs to acknowledge these rules."""
        return P.hash_bytes(LABEL_RULES, self.to_bytes(), HASH_SIZE)


# --- events -------------------------------------------------------------------------------

_SIG = P.ED25519_SIGNATURE_SIZE
_NO_SIG: Final = bytes(_SIG)


@dataclass(frozen=True, slots=True)
class CreateEvent:
    """Position 0: the first facilitator, the rules, and a nonce so that equal
    rules still make distinct rooms."""

    KIND: ClassVar[str] = "create"
    member: MemberPublicKey
    rules: Rules
    nonce: bytes
    ts: int
    sig: bytes = field(default=_NO_SIG, repr=False)

    @property
    def pos(self) -> int:
        return 0

    @property
    def prev(self) -> bytes | None:
        return None

    @property
    def author(self) -> bytes:
        return self.member.sign

    def body(self) -> dict[str, Value]:
        return {
            "member": self.member.to_value(),
            "nonce": self.nonce,
            "rules": self.rules.to_value(),
        }


@dataclass(frozen=True, slots=True)
class InviteEvent:
    """A facilitator publishes an invite public key with a role, expiry and use limit."""

    KIND: ClassVar[str] = "invite"
    pos: int
    prev: bytes
    ts: int
    author: bytes
    invite: bytes
    role: Role
    expires: int
    uses: int
    sig: bytes = field(default=_NO_SIG, repr=False)

    def body(self) -> dict[str, Value]:
        return {
            "author": self.author,
            "expires": self.expires,
            "invite": self.invite,
            "role": self.role,
            "uses": self.uses,
        }


@dataclass(frozen=True, slots=True)
class JoinEvent:
    """A new member, signed by its member key (``sig``) and the invite key (``invite_sig``)."""

    KIND: ClassVar[str] = "join"
    pos: int
    prev: bytes
    ts: int
    member: MemberPublicKey
    invite: bytes
    rules_hash: bytes
    sig: bytes = field(default=_NO_SIG, repr=False)
    invite_sig: bytes = field(default=_NO_SIG, repr=False)

    @property
    def author(self) -> bytes:
        return self.member.sign

    def body(self) -> dict[str, Value]:
        return {
            "invite": self.invite,
            "member": self.member.to_value(),
            "rules_hash": self.rules_hash,
        }


@dataclass(frozen=True, slots=True)
class RemoveEvent:
    """A facilitator removes another member."""

    KIND: ClassVar[str] = "remove"
    pos: int
    prev: bytes
    ts: int
    author: bytes
    target: bytes
    sig: bytes = field(default=_NO_SIG, repr=False)

    def body(self) -> dict[str, Value]:
        return {"author": self.author, "target": self.target}


@dataclass(frozen=True, slots=True)
class LeaveEvent:
    """A member leaves."""

    KIND: ClassVar[str] = "leave"
    pos: int
    prev: bytes
    ts: int
    author: bytes
    sig: bytes = field(default=_NO_SIG, repr=False)

    def body(self) -> dict[str, Value]:
        return {"author": self.author}


@dataclass(frozen=True, slots=True)
class SetRoleEvent:
    """A facilitator changes a member's role (possibly its own)."""

    KIND: ClassVar[str] = "set_role"
    pos: int
    prev: bytes
    ts: int
    author: bytes
    target: bytes
    role: Role
    sig: bytes = field(default=_NO_SIG, repr=False)

    def body(self) -> dict[str, Value]:
        return {"author": self.author, "role": self.role, "target": self.target}


@dataclass(frozen=True, slots=True)
class SetRulesEvent:
    """A facilitator replaces the rules; later joins must acknowledge the new ones."""

    KIND: ClassVar[str] = "set_rules"
    pos: int
    prev: bytes
    ts: int
    author: bytes
    rules: Rules
    sig: bytes = field(default=_NO_SIG, repr=False)

    def body(self) -> dict[str, Value]:
        return {"author": self.author, "rules": self.rules.to_value()}


@dataclass(frozen=True, slots=True)
class RevokeEvent:
    """A facilitator withdraws an invite before it expires or is used up."""

    KIND: ClassVar[str] = "revoke"
    pos: int
    prev: bytes
    ts: int
    author: bytes
    invite: bytes
    sig: bytes = field(default=_NO_SIG, repr=False)

    def body(self) -> dict[str, Value]:
        return {"author": self.author, "invite": self.invite}


Event: TypeAlias = (
    CreateEvent
    | InviteEvent
    | JoinEvent
    | RemoveEvent
    | LeaveEvent
    | SetRoleEvent
    | SetRulesEvent
    | RevokeEvent
)


def _unsigned_value(event: Event) -> dict[str, Value]:
    out: dict[str, Value] = {
        "pos": event.pos,
        "ts": event.ts,
        "type": event.KIND,
        "v": EVENT_VERSION,
    }
    if event.prev is not None:
        out["prev"] = event.prev
    out.update(event.body())
    return out


def signed_bytes(event: Event) -> bytes:
    """The bytes both signatures cover: the whole event minus ``sig`` and ``isig``."""
    return encode(_unsigned_value(event))


def encode_event(event: Event) -> bytes:
    out = _unsigned_value(event)
    out["sig"] = event.sig
    if isinstance(event, JoinEvent):
        out["isig"] = event.invite_sig
    return encode(out)


def event_hash(data: bytes) -> bytes:
    """Hash of an encoded event, signatures included (so the chain commits to
    the exact bytes a client validated)."""
    return P.hash_bytes(LABEL_EVENT, bytes(data), HASH_SIZE)


def decode_event(data: bytes, *, max_size: int = DEFAULT_LIMITS.max_event_size) -> Event:
    """Strictly decode one event; any malformed input raises a :class:`~.errors.DecodeError`."""
    r = Reader.of(decode(data, max_size=max_size), "event")
    r.version(EVENT_VERSION)
    kind = r.text("type", 16, EVENT_TYPES)
    pos = r.integer("pos", 0, _MAX_COUNT)
    ts = r.integer("ts", 0, MAX_TIME)
    sig = r.blob("sig", _SIG)
    event: Event
    if kind == "create":
        if pos != 0:
            raise ChainBroken("create must be at position 0")
        event = CreateEvent(
            member=MemberPublicKey.from_value(r.raw("member"), "event.member"),
            rules=Rules.from_value(r.raw("rules"), "event.rules"),
            nonce=r.blob("nonce", NONCE_SIZE),
            ts=ts,
            sig=sig,
        )
        r.done()
        return event
    if pos == 0:
        raise ChainBroken("only create may sit at position 0")
    prev = r.blob("prev", HASH_SIZE)
    if kind == "join":
        event = JoinEvent(
            pos=pos,
            prev=prev,
            ts=ts,
            member=MemberPublicKey.from_value(r.raw("member"), "event.member"),
            invite=r.blob("invite", P.ED25519_PUBLIC_SIZE),
            rules_hash=r.blob("rules_hash", HASH_SIZE),
            sig=sig,
            invite_sig=r.blob("isig", _SIG),
        )
        r.done()
        return event
    author = r.blob("author", P.ED25519_PUBLIC_SIZE)
    if kind == "invite":
        event = InviteEvent(
            pos=pos,
            prev=prev,
            ts=ts,
            author=author,
            invite=r.blob("invite", P.ED25519_PUBLIC_SIZE),
            role=r.text("role", 16, ROLES),  # type: ignore[arg-type]
            expires=r.integer("expires", 0, MAX_TIME),
            uses=r.integer("uses", 1, _MAX_COUNT),
            sig=sig,
        )
    elif kind == "remove":
        event = RemoveEvent(
            pos=pos,
            prev=prev,
            ts=ts,
            author=author,
            target=r.blob("target", P.ED25519_PUBLIC_SIZE),
            sig=sig,
        )
    elif kind == "leave":
        event = LeaveEvent(pos=pos, prev=prev, ts=ts, author=author, sig=sig)
    elif kind == "set_role":
        event = SetRoleEvent(
            pos=pos,
            prev=prev,
            ts=ts,
            author=author,
            target=r.blob("target", P.ED25519_PUBLIC_SIZE),
            role=r.text("role", 16, ROLES),  # type: ignore[arg-type]
            sig=sig,
        )
    elif kind == "revoke":
        event = RevokeEvent(
            pos=pos,
            prev=prev,
            ts=ts,
            author=author,
            invite=r.blob("invite", P.ED25519_PUBLIC_SIZE),
            sig=sig,
        )
    else:  # "set_rules": EVENT_TYPES leaves no other value
        event = SetRulesEvent(
            pos=pos,
            prev=prev,
            ts=ts,
            author=author,
            rules=Rules.from_value(r.raw("rules"), "event.rules"),
            sig=sig,
        )
    r.done()
    return event


# --- state ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """A current member: its key, its role, and the position of its create/join."""

    key: MemberPublicKey
    role: Role
    since: int


@dataclass(frozen=True, slots=True)
class Invite:
    """An invite as the log knows it (its private seed is never in the log)."""

    role: Role
    expires: int
    uses_left: int
    created_pos: int
    creator: bytes


@dataclass(frozen=True, slots=True)
class RoomState:
    """The room after a prefix of its log. Immutable: :func:`apply_event`
    returns a new state and shares unchanged maps with the old one, so callers
    must not mutate the mappings.

    ``departed`` holds every member key ever removed or departed; such a key
    can never act or be admitted again.
    """

    room_id: bytes
    creator: MemberPublicKey
    rules: Rules
    members: Mapping[bytes, Member]
    departed: Mapping[bytes, MemberPublicKey]
    invites: Mapping[bytes, Invite]
    head: bytes
    length: int
    ts: int

    @property
    def pos(self) -> int:
        """Position of the last event folded in."""
        return self.length - 1

    @property
    def epoch(self) -> tuple[int, bytes]:
        """``(pos, head)``: what a room message names as the log state it was sent under."""
        return (self.length - 1, self.head)

    def role_of(self, sign: bytes) -> Role | None:
        member = self.members.get(sign)
        return None if member is None else member.role

    def facilitators(self) -> list[bytes]:
        return sorted(k for k, m in self.members.items() if m.role == "facilitator")

    def member_keys(self) -> list[MemberPublicKey]:
        """Current members' keys, sorted by signing key."""
        return [self.members[k].key for k in sorted(self.members)]

    def summary(self) -> dict[str, Value]:
        """A plain, canonical description of the state (for vectors and debugging)."""
        return {
            "creator": self.creator.to_value(),
            "departed": [self.departed[k].to_value() for k in sorted(self.departed)],
            "head": self.head,
            "invites": [
                {
                    "created_pos": inv.created_pos,
                    "creator": inv.creator,
                    "expires": inv.expires,
                    "pk": pk,
                    "role": inv.role,
                    "uses_left": inv.uses_left,
                }
                for pk, inv in sorted(self.invites.items())
            ],
            "length": self.length,
            "members": [
                {"key": m.key.to_value(), "role": m.role, "since": m.since}
                for _, m in sorted(self.members.items())
            ],
            "room_id": self.room_id,
            "rules": self.rules.to_value(),
            "ts": self.ts,
        }

    def to_bytes(self) -> bytes:
        """Canonical serialisation (for a store that trusts itself, e.g. the
        relay's database). A client that fetched events re-validates them."""
        value = self.summary()
        assert isinstance(value, dict)
        value["v"] = STATE_VERSION
        return encode(value)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = 4 << 20) -> RoomState:
        r = Reader.of(decode(data, max_size=max_size), "state")
        r.version(STATE_VERSION)
        creator = MemberPublicKey.from_value(r.raw("creator"), "state.creator")
        departed: dict[bytes, MemberPublicKey] = {}
        for item in r.array("departed", _MAX_COUNT):
            key = MemberPublicKey.from_value(item, "state.departed")
            departed[key.sign] = key
        invites: dict[bytes, Invite] = {}
        for item in r.array("invites", _MAX_COUNT):
            ir = Reader.of(item, "state.invite")
            pk = ir.blob("pk", P.ED25519_PUBLIC_SIZE)
            invites[pk] = Invite(
                role=ir.text("role", 16, ROLES),  # type: ignore[arg-type]
                expires=ir.integer("expires", 0, MAX_TIME),
                uses_left=ir.integer("uses_left", 0, _MAX_COUNT),
                created_pos=ir.integer("created_pos", 1, _MAX_COUNT),
                creator=ir.blob("creator", P.ED25519_PUBLIC_SIZE),
            )
            ir.done()
        members: dict[bytes, Member] = {}
        for item in r.array("members", _MAX_COUNT):
            mr = Reader.of(item, "state.member")
            key = MemberPublicKey.from_value(mr.raw("key"), "state.member.key")
            members[key.sign] = Member(
                key=key,
                role=mr.text("role", 16, ROLES),  # type: ignore[arg-type]
                since=mr.integer("since", 0, _MAX_COUNT),
            )
            mr.done()
        state = cls(
            room_id=r.blob("room_id", HASH_SIZE),
            creator=creator,
            rules=Rules.from_value(r.raw("rules"), "state.rules"),
            members=members,
            departed=departed,
            invites=invites,
            head=r.blob("head", HASH_SIZE),
            length=r.integer("length", 1, _MAX_COUNT),
            ts=r.integer("ts", 0, MAX_TIME),
        )
        r.done()
        if state.to_bytes() != bytes(data):
            # Unsorted or repeated entries: not the canonical form of any state.
            raise DecodeError("state: not in canonical order")
        return state


# --- the validator ------------------------------------------------------------------------


def apply_event(
    state: RoomState | None, data: bytes, *, limits: LogLimits = DEFAULT_LIMITS
) -> RoomState:
    """Validate one encoded event against ``state`` (``None`` for an empty log)
    and return the state after it. Raises a :class:`~.errors.ProtocolError`
    subclass and changes nothing if the event is not valid here.

    This checks only what the head state can tell; :meth:`RoomLog.append`
    also recognises duplicates and forks at earlier positions.
    """
    return _validate(state, decode_event(data, max_size=limits.max_event_size), data, limits)


def _validate(state: RoomState | None, event: Event, data: bytes, limits: LogLimits) -> RoomState:
    _check_chain(state, event, limits)
    _check_signatures(event)
    if state is not None:
        _check_authority(state, event, limits)
    return _fold(state, event, event_hash(data))


def _check_chain(state: RoomState | None, event: Event, limits: LogLimits) -> None:
    if state is None:
        if not isinstance(event, CreateEvent):
            raise ChainBroken("a log starts with create")
        return
    if isinstance(event, CreateEvent):
        raise ChainBroken("create may only be the first event")
    if event.pos != state.length:
        raise ChainBroken(f"event claims position {event.pos}, expected {state.length}")
    assert event.prev is not None  # only create lacks prev
    if not P.ct_equal(event.prev, state.head):
        raise ChainBroken("event does not name the current head")
    if event.ts < state.ts:
        raise ChainBroken("timestamp earlier than the previous event's")
    if state.length >= limits.max_length:
        raise LogFull(f"log already holds {limits.max_length} events")


def _check_signatures(event: Event) -> None:
    message = signed_bytes(event)
    P.ed25519_verify(event.author, signing_input(CTX_EVENT, message), event.sig)
    if isinstance(event, JoinEvent):
        P.ed25519_verify(event.invite, signing_input(CTX_JOIN_INVITE, message), event.invite_sig)


def _require_member(state: RoomState, sign: bytes) -> Member:
    member = state.members.get(sign)
    if member is None:
        if sign in state.departed:
            raise NotAuthorized("author was removed or has left")
        raise NotAuthorized("author is not a member")
    return member


def _require_facilitator(state: RoomState, sign: bytes) -> None:
    if _require_member(state, sign).role != "facilitator":
        raise NotAuthorized("only a facilitator may do this")


def _require_target(state: RoomState, sign: bytes) -> Member:
    member = state.members.get(sign)
    if member is None:
        if sign in state.departed:
            raise MembershipError("target was removed or has left")
        raise MembershipError("target is not a member")
    return member


def _check_authority(state: RoomState, event: Event, limits: LogLimits) -> None:
    if isinstance(event, InviteEvent):
        _require_facilitator(state, event.author)
        if event.invite in state.invites:
            raise InvalidInvite("invite key already used in this room")
        if event.invite in _all_halves(state):
            # The mirror of the join rule below: every code holder learns the
            # invite's private half, so it must not also be a member key's.
            raise InvalidInvite("invite key is a half of a member key of this room")
        if event.uses > limits.max_uses:
            raise InvalidInvite(f"invite allows more than {limits.max_uses} uses")
        if event.expires <= event.ts:
            raise InvalidInvite("invite expires before it is made")
    elif isinstance(event, JoinEvent):
        _check_join(state, event, limits)
    elif isinstance(event, RemoveEvent):
        _require_facilitator(state, event.author)
        _require_target(state, event.target)
        if event.target == event.author:
            raise MembershipError("a facilitator leaves with leave, not remove")
    elif isinstance(event, LeaveEvent):
        _require_member(state, event.author)
    elif isinstance(event, SetRoleEvent):
        _require_facilitator(state, event.author)
        target = _require_target(state, event.target)
        if (
            target.role == "facilitator"
            and event.role != "facilitator"
            and len(state.facilitators()) == 1
        ):
            raise MembershipError("cannot demote the last facilitator")
    elif isinstance(event, SetRulesEvent):
        _require_facilitator(state, event.author)
    elif isinstance(event, RevokeEvent):
        _require_facilitator(state, event.author)
        if event.invite not in state.invites:
            raise InvalidInvite("unknown invite")


def _check_join(state: RoomState, event: JoinEvent, limits: LogLimits) -> None:
    invite = state.invites.get(event.invite)
    if invite is None:
        raise InvalidInvite("unknown invite")
    if invite.uses_left == 0:
        raise InvalidInvite("invite is used up")
    if event.ts > invite.expires:
        raise InvalidInvite("invite has expired")
    if state.role_of(invite.creator) != "facilitator":
        # Invites die with their creator's authority: a removed (perhaps
        # compromised) facilitator's outstanding codes admit nobody.
        raise InvalidInvite("invite's creator is no longer a facilitator")
    if not P.ct_equal(event.rules_hash, state.rules.rules_hash()):
        raise RulesMismatch("join acknowledges rules other than the current ones")
    new = event.member
    if new.sign in state.invites or new.dh in state.invites:
        # Every holder of that invite code knows the invite's private half.
        raise MembershipError("member key is an invite key")
    # Either half against both halves of every key: comparing only like
    # halves would accept logs that the spec, and so other validators, refuse.
    seen = _all_halves(state)
    if new.sign in seen or new.dh in seen:
        raise MembershipError("member key is or was already in this room")
    if len(state.members) >= limits.max_members:
        raise RoomFull(f"room already has {limits.max_members} members")


def _all_member_keys(state: RoomState) -> Iterable[MemberPublicKey]:
    for member in state.members.values():
        yield member.key
    yield from state.departed.values()


def _all_halves(state: RoomState) -> set[bytes]:
    """Both halves of every current and departed member key, in one namespace."""
    return {half for key in _all_member_keys(state) for half in (key.sign, key.dh)}


def _fold(state: RoomState | None, event: Event, digest: bytes) -> RoomState:
    """The state after ``event``; assumes the event was validated against ``state``."""
    if isinstance(event, CreateEvent):
        return RoomState(
            room_id=digest,
            creator=event.member,
            rules=event.rules,
            members={event.member.sign: Member(key=event.member, role="facilitator", since=0)},
            departed={},
            invites={},
            head=digest,
            length=1,
            ts=event.ts,
        )
    assert state is not None
    members, departed, invites, rules = state.members, state.departed, state.invites, state.rules
    if isinstance(event, InviteEvent):
        invites = {
            **invites,
            event.invite: Invite(
                role=event.role,
                expires=event.expires,
                uses_left=event.uses,
                created_pos=event.pos,
                creator=event.author,
            ),
        }
    elif isinstance(event, JoinEvent):
        used = invites[event.invite]
        invites = {**invites, event.invite: replace(used, uses_left=used.uses_left - 1)}
        members = {
            **members,
            event.member.sign: Member(key=event.member, role=used.role, since=event.pos),
        }
    elif isinstance(event, RemoveEvent | LeaveEvent):
        gone = event.target if isinstance(event, RemoveEvent) else event.author
        departed = {**departed, gone: members[gone].key}
        members = {k: m for k, m in members.items() if k != gone}
    elif isinstance(event, SetRoleEvent):
        members = {**members, event.target: replace(members[event.target], role=event.role)}
    elif isinstance(event, RevokeEvent):
        # Kept, with no uses left, rather than deleted: the key must stay known so
        # that it can never be invited again or become a half of a member key.
        invites = {**invites, event.invite: replace(invites[event.invite], uses_left=0)}
    else:
        rules = event.rules
    return RoomState(
        room_id=state.room_id,
        creator=state.creator,
        rules=rules,
        members=members,
        departed=departed,
        invites=invites,
        head=digest,
        length=state.length + 1,
        ts=event.ts,
    )


# --- the log ----------------------------------------------------------------------------------


class RoomLog:
    """A validated room log with its history of states.

    Only :meth:`append` (and :meth:`extend`, :func:`validate_log`) admit
    events, so everything a ``RoomLog`` holds has passed :func:`apply_event`.
    Past states are kept as checkpoints every ``CHECKPOINT_EVERY`` events and
    rebuilt on demand, so memory stays linear in the log length.
    """

    CHECKPOINT_EVERY: ClassVar[int] = 32

    def __init__(self, *, limits: LogLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._events: list[bytes] = []
        self._decoded: list[Event] = []
        self._hashes: list[bytes] = []
        self._index: dict[bytes, int] = {}
        self._checkpoints: dict[int, RoomState] = {}
        self._state: RoomState | None = None

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        if self._state is None:
            return "RoomLog(empty)"
        return f"RoomLog(room={self._state.room_id.hex()[:16]}, length={len(self)})"

    @property
    def state(self) -> RoomState:
        """The state at the head."""
        if self._state is None:
            raise UnknownPosition("the log is empty")
        return self._state

    @property
    def room_id(self) -> bytes:
        return self.state.room_id

    @property
    def events(self) -> tuple[bytes, ...]:
        return tuple(self._events)

    def append(self, data: bytes) -> RoomState:
        """Validate ``data`` as the next event and fold it in.

        Raises :class:`DuplicateEvent` for an event already in the log and
        :class:`~.errors.ForkDetected` for a *valid* event that claims a
        position this log already fills with a different one (someone showed
        two members two histories). Nothing changes on any error.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError("event must be bytes")
        data = bytes(data)
        event = decode_event(data, max_size=self.limits.max_event_size)
        if self._state is not None and event.pos < self._state.length:
            self._reject_past(event, data)
        state = _validate(self._state, event, data, self.limits)
        self._commit(data, event, state)
        return state

    def _reject_past(self, event: Event, data: bytes) -> None:
        digest = event_hash(data)
        if digest in self._index:
            raise DuplicateEvent(f"event is already at position {self._index[digest]}")
        if isinstance(event, CreateEvent):
            raise ChainBroken("create may only be the first event")
        assert event.prev is not None
        if not P.ct_equal(event.prev, self._hashes[event.pos - 1]):
            raise ChainBroken(f"event does not follow position {event.pos - 1}")
        # A well-formed alternative to our event at this position: only a
        # valid one is evidence of equivocation (raises its own error otherwise).
        _validate(self.state_at(event.pos - 1), event, data, self.limits)
        raise ForkDetected(f"two different valid events at position {event.pos}")

    def _commit(self, data: bytes, event: Event, state: RoomState) -> None:
        self._events.append(data)
        self._decoded.append(event)
        self._hashes.append(state.head)
        self._index[state.head] = state.pos
        if state.pos % self.CHECKPOINT_EVERY == 0:
            self._checkpoints[state.pos] = state
        self._state = state

    def extend(self, events: Iterable[bytes]) -> RoomState:
        """Append several events, all or none."""
        mark = len(self._events)
        saved = self._state
        try:
            for data in events:
                self.append(data)
        except BaseException:
            self._truncate(mark, saved)
            raise
        return self.state

    def _truncate(self, length: int, state: RoomState | None) -> None:
        for digest in self._hashes[length:]:
            del self._index[digest]
        del self._events[length:], self._decoded[length:], self._hashes[length:]
        for pos in [p for p in self._checkpoints if p >= length]:
            del self._checkpoints[pos]
        self._state = state

    def _check_pos(self, pos: int) -> None:
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < len(self._events):
            raise UnknownPosition(f"position {pos!r} is not in this log")

    def event(self, pos: int) -> bytes:
        self._check_pos(pos)
        return self._events[pos]

    def decoded(self, pos: int) -> Event:
        self._check_pos(pos)
        return self._decoded[pos]

    def head_at(self, pos: int) -> bytes:
        """Hash of the event at ``pos``: the head of the log as it stood then."""
        self._check_pos(pos)
        return self._hashes[pos]

    def position_of(self, digest: bytes) -> int | None:
        """Position of the event with hash ``digest``, if it is in this log."""
        return self._index.get(bytes(digest))

    def state_at(self, pos: int) -> RoomState:
        """The room as it stood right after the event at ``pos`` (e.g. who could
        read a message sent under epoch ``pos``)."""
        self._check_pos(pos)
        if pos == len(self._events) - 1:
            return self.state
        base = pos - pos % self.CHECKPOINT_EVERY
        state = self._checkpoints[base]
        for at in range(base + 1, pos + 1):
            state = _fold(state, self._decoded[at], self._hashes[at])
        return state

    def check_epoch(self, pos: int, head: bytes) -> Literal["ok", "ahead"]:
        """Compare someone else's epoch ``(pos, head)`` with this log.

        ``"ok"``: our event at ``pos`` has that hash, so (the chain being
        hash-linked) we agree on the whole prefix. ``"ahead"``: ``pos`` is
        beyond our log; fetch more and ask again. Raises
        :class:`~.errors.ForkDetected` if our hash at ``pos`` differs.
        """
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
            raise UnknownPosition(f"position {pos!r} is not valid")
        check_bytes(head, "epoch head", size=HASH_SIZE)
        if pos >= len(self._events):
            return "ahead"
        if not P.ct_equal(self._hashes[pos], head):
            raise ForkDetected(f"our log differs at position {pos}")
        return "ok"

    def to_bytes(self) -> bytes:
        return encode({"events": list(self._events), "v": LOG_VERSION})

    @classmethod
    def from_bytes(cls, data: bytes, *, limits: LogLimits = DEFAULT_LIMITS) -> RoomLog:
        """Re-validates every event: a stored log is believed only after that."""
        max_size = 64 + limits.max_length * (limits.max_event_size + 8)
        r = Reader.of(decode(data, max_size=max_size), "log")
        r.version(LOG_VERSION)
        items = r.array("events", limits.max_length)
        r.done()
        events = [check_bytes(item, "log.event", max_size=limits.max_event_size) for item in items]
        return validate_log(events, limits=limits)


def validate_log(events: Sequence[bytes], *, limits: LogLimits = DEFAULT_LIMITS) -> RoomLog:
    """Validate a whole log from its ``create``; raises on the first bad event."""
    log = RoomLog(limits=limits)
    if not events:
        raise ChainBroken("a log starts with create")
    for data in events:
        log.append(data)
    return log


# --- builders ----------------------------------------------------------------------------------


def _finish(
    event: Event, author: MemberKeyPair, state: RoomState | None, check: bool, limits: LogLimits
) -> bytes:
    event = replace(event, sig=author.sign(CTX_EVENT, signed_bytes(event)))
    data = encode_event(event)
    if check:
        apply_event(state, data, limits=limits)
    return data


def _next(state: RoomState, ts: int) -> tuple[int, bytes, int]:
    # A lagging clock must not make an invalid event: never go below the head's time.
    return state.length, state.head, max(ts, state.ts)


def _target_key(target: MemberPublicKey | bytes) -> bytes:
    return target.sign if isinstance(target, MemberPublicKey) else bytes(target)


def make_create(
    facilitator: MemberKeyPair,
    rules: Rules,
    ts: int,
    rng: P.Rng = P.random_bytes,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> bytes:
    """A ``create`` event; its hash is the new room's id.

    Every builder signs with the author's member key and, with ``check`` (the
    default), validates the result against ``state`` so it never returns an
    event the log would refuse; ``check=False`` exists for tests of the
    validator. Builders do not change ``state``: append the event to the local
    log only after the relay accepted it, or the local log forks.
    """
    event = CreateEvent(member=facilitator.public, rules=rules, nonce=rng(NONCE_SIZE), ts=ts)
    return _finish(event, facilitator, None, check, limits)


def make_invite(
    facilitator: MemberKeyPair,
    state: RoomState,
    role: Role,
    expires: int,
    uses: int,
    ts: int,
    rng: P.Rng = P.random_bytes,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> tuple[bytes, bytes]:
    """An ``invite`` event and the invite's private seed (for the invite code)."""
    seed = rng(P.ED25519_SEED_SIZE)
    pos, prev, ts = _next(state, ts)
    event = InviteEvent(
        pos=pos,
        prev=prev,
        ts=ts,
        author=facilitator.public.sign,
        invite=P.ed25519_public(seed),
        role=role,
        expires=expires,
        uses=uses,
    )
    return _finish(event, facilitator, state, check, limits), seed


def make_join(
    member: MemberKeyPair,
    invite_seed: bytes,
    state: RoomState,
    ts: int,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> bytes:
    """A ``join`` acknowledging ``state``'s rules, signed by ``member`` and the invite key."""
    pos, prev, ts = _next(state, ts)
    event = JoinEvent(
        pos=pos,
        prev=prev,
        ts=ts,
        member=member.public,
        invite=P.ed25519_public(invite_seed),
        rules_hash=state.rules.rules_hash(),
    )
    message = signed_bytes(event)
    event = replace(
        event,
        invite_sig=P.ed25519_sign(invite_seed, signing_input(CTX_JOIN_INVITE, message)),
    )
    return _finish(event, member, state, check, limits)


def make_remove(
    facilitator: MemberKeyPair,
    state: RoomState,
    target: MemberPublicKey | bytes,
    ts: int,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> bytes:
    pos, prev, ts = _next(state, ts)
    event = RemoveEvent(
        pos=pos, prev=prev, ts=ts, author=facilitator.public.sign, target=_target_key(target)
    )
    return _finish(event, facilitator, state, check, limits)


def make_leave(
    member: MemberKeyPair,
    state: RoomState,
    ts: int,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> bytes:
    pos, prev, ts = _next(state, ts)
    event = LeaveEvent(pos=pos, prev=prev, ts=ts, author=member.public.sign)
    return _finish(event, member, state, check, limits)


def make_set_role(
    facilitator: MemberKeyPair,
    state: RoomState,
    target: MemberPublicKey | bytes,
    role: Role,
    ts: int,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> bytes:
    pos, prev, ts = _next(state, ts)
    event = SetRoleEvent(
        pos=pos,
        prev=prev,
        ts=ts,
        author=facilitator.public.sign,
        target=_target_key(target),
        role=role,
    )
    return _finish(event, facilitator, state, check, limits)


def make_set_rules(
    facilitator: MemberKeyPair,
    state: RoomState,
    rules: Rules,
    ts: int,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> bytes:
    pos, prev, ts = _next(state, ts)
    event = SetRulesEvent(pos=pos, prev=prev, ts=ts, author=facilitator.public.sign, rules=rules)
    return _finish(event, facilitator, state, check, limits)


def make_revoke(
    facilitator: MemberKeyPair,
    state: RoomState,
    invite: bytes,
    ts: int,
    *,
    check: bool = True,
    limits: LogLimits = DEFAULT_LIMITS,
) -> bytes:
    """A ``revoke``: the invite with public key ``invite`` admits nobody from now on."""
    pos, prev, ts = _next(state, ts)
    event = RevokeEvent(
        pos=pos, prev=prev, ts=ts, author=facilitator.public.sign, invite=bytes(invite)
    )
    return _finish(event, facilitator, state, check, limits)
