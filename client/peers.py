"""Other members as we know them: display names, affiliations, verification, pseudonyms.

A member key is all the room log says about a person; the rest arrives over
our pairwise channel with them (their profile) or from us (verification).
One row per member (:class:`~.records.PeerRecord`). Under ``anonymous``
rules, names and affiliations are neither kept nor shown; every client derives
the same pseudonym from the member key instead.

Names are self-asserted, so what is shown is each member's label in the room's
name table (:func:`~.names.unique_names`): unique within the room, never
"you", with whether we verified the member. The table is cached per room.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import MemberPublicKey
from backchannel.protocol.safety import SafetyNumber, safety_number

from .errors import ClientError, unique_match
from .names import SEPARATOR, Chosen, pseudonym, skeleton, unique_names
from .records import PeerRecord, Table
from .room import Room, names_shared
from .store import Store

#: A label typed with its suffix: "Farida Zaman ·3f2a", "farida zaman 3f2a".
_SUFFIXED = re.compile(r"^(?P<stem>.*?\w)[\s·.:(]+(?P<digits>[0-9a-fA-F]{4,})\)?$")

__all__ = ["MAX_AFFILIATION", "MAX_NAME", "MemberView", "NameTag", "Peers", "pseudonym"]

MAX_NAME = 64
MAX_AFFILIATION = 128
#: Earlier names kept per member, to accept a name printed before it changed.
KEEP_EARLIER = 4


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


@dataclass(frozen=True)
class NameTag:
    """How a speaker is shown: its unique label, and whether we compared safety numbers."""

    name: str
    verified: bool


@dataclass
class _NameTable:
    key: tuple[int, int]  # (log length, this room's peer-row version)
    tags: dict[bytes, NameTag]  # everyone the log ever admitted; ours by our profile name
    rows: dict[bytes, PeerRecord] = field(default_factory=dict)  # what the tags were made of
    #: The store's version of the peer rows when they were read.
    stored: tuple[int, int] = (0, 0)


class Peers:
    def __init__(self, store: Store, own_name: Callable[[], str | None] = lambda: None) -> None:
        self._rows: Table[PeerRecord] = Table(store, "peer", PeerRecord)
        #: Our profile's name: others see us by it, so it takes part in the table.
        self._own_name = own_name
        self._versions: dict[bytes, int] = {}
        self._tables: dict[bytes, _NameTable] = {}
        self._admitted: dict[bytes, tuple[int, dict[bytes, MemberPublicKey]]] = {}

    def get(self, room: Room, sign: bytes) -> PeerRecord:
        return self._rows.get(room.room_id + sign) or PeerRecord()

    def _put(self, room: Room, sign: bytes, record: PeerRecord) -> None:
        self._rows.put(room.room_id + sign, record, scope=room.room_id)
        self._versions[room.room_id] = self._versions.get(room.room_id, 0) + 1
        # Now, not at the next line shown: a room message then costs one row read
        # (its sender's, to check the table) however large the room.
        self.refresh(room)

    def learn(self, room: Room, sign: bytes, name: object, affiliation: object) -> None:
        """What a member said about itself, over our pairwise channel."""
        if room.state.rules.mode == "anonymous":
            return  # never kept, so never shown or exported
        known = record = self.get(room, sign)
        if isinstance(name, str):
            fresh = name[:MAX_NAME]
            if record.name and record.name != fresh:
                old = record.name.encode()
                kept = [n for n in record.earlier or [] if n != old][-(KEEP_EARLIER - 1) :]
                record = replace(record, earlier=[*kept, old])
            record = replace(record, name=fresh)
        if isinstance(affiliation, str):
            record = replace(record, affiliation=affiliation[:MAX_AFFILIATION])
        if record != known:
            self._put(room, sign, record)

    # --- names as shown ----------------------------------------------------------------------

    def _members_ever(self, room: Room) -> dict[bytes, MemberPublicKey]:
        """Every key the log admitted, departed ones too: an old line keeps a name that
        is unique among everyone who could have written it."""
        length, keys = self._admitted.get(room.room_id, (0, {}))
        if length > len(room.log):  # another, shorter copy of the log: start again
            length, keys = 0, {}
        for pos in range(length, len(room.log)):
            event = room.log.decoded(pos)
            if isinstance(event, L.CreateEvent | L.JoinEvent):
                keys[event.member.sign] = event.member
        self._admitted[room.room_id] = (len(room.log), keys)
        return keys

    def _key(self, room: Room) -> tuple[int, int]:
        return len(room.log), self._versions.get(room.room_id, 0)

    def refresh(self, room: Room) -> None:
        """Rebuild the room's name table (after its log or a peer row changed)."""
        anonymous = room.state.rules.mode == "anonymous"
        keys = self._members_ever(room)
        rows = {sign: self.get(room, sign) for sign in keys if sign != room.me}
        # As the others know us: a room that was ever anonymous for us never got our name.
        own = self._own_name() if names_shared(room) else None
        chosen = []
        for sign, key in keys.items():
            name = own if sign == room.me else (None if anonymous else rows[sign].name)
            if not name or not skeleton(name):
                name = pseudonym(room.room_id, sign)
            chosen.append(Chosen(sign, name, key.fingerprint().hex()))
        labels = unique_names(chosen)
        tags = {
            sign: NameTag(
                labels[sign], sign in rows and rows[sign].verified == key.fingerprint()
            )
            for sign, key in keys.items()
        }
        self._tables[room.room_id] = _NameTable(self._key(room), tags, rows, self._rows.version())

    def _table(self, room: Room) -> _NameTable:
        table = self._tables.get(room.room_id)
        if table is None or table.key != self._key(room):
            self.refresh(room)
            table = self._tables[room.room_id]
        return table

    def tag(self, room: Room, sign: bytes, *, as_you: bool = True) -> NameTag:
        """How ``sign`` is shown in ``room``: "you" for us unless ``as_you`` is false
        (exports name us as others see us)."""
        if sign == room.me and as_you:
            return NameTag("you", False)
        table = self._table(room)
        # The store is the truth: a change the cache missed (a rolled-back
        # transaction) must not leave a stale name under a line. Anonymous rooms
        # keep no names to go stale, and skip the read.
        if (
            sign in table.rows
            and room.state.rules.mode != "anonymous"
            # Read (and decrypted, and decoded) only if the store may have changed.
            and table.stored != self._rows.version()
            and self.get(room, sign) != table.rows[sign]
        ):
            self.refresh(room)
            table = self._tables[room.room_id]
        return table.tags.get(sign) or NameTag(pseudonym(room.room_id, sign), False)

    def display_name(self, room: Room, sign: bytes, *, as_you: bool = True) -> str:
        return self.tag(room, sign, as_you=as_you).name

    def tags(self, room: Room) -> dict[bytes, NameTag]:
        """The room's whole name table, ours under our own name (front ends compare it
        to notice that names changed)."""
        return dict(self._table(room).tags)

    def members(self, room: Room) -> list[MemberView]:
        anonymous = room.state.rules.mode == "anonymous"
        self.refresh(room)  # a listing reads every row anyway: read them fresh
        table = self._tables[room.room_id]
        out = []
        for member in room.state.members.values():
            sign = member.key.sign
            me = sign == room.me
            info = table.rows.get(sign, PeerRecord())
            out.append(
                MemberView(
                    key=member.key,
                    role=member.role,
                    # Our own name as the others see it; ``me`` says it is ours.
                    name=table.tags[sign].name,
                    affiliation=None if anonymous else info.affiliation,
                    verified=table.tags[sign].verified,
                    me=me,
                )
            )
        return sorted(out, key=lambda m: (not m.me, m.name))

    def find(
        self, room: Room, query: str, *, yourself: ClientError | None = None
    ) -> MemberView:
        """The member ``query`` names: as ``members`` shows it now, or by a name or
        pseudonym it had earlier in this room while that names no one else; ``you``
        (or our own name) raises ``yourself``."""
        wanted = skeleton(query)
        views = self.members(room)
        rows = self._tables[room.room_id].rows
        several = ClientError(f"{query!r} matches several members", hint="use a fingerprint")
        missing = ClientError(
            f"no member {query!r} in this room", hint="`backchannel members ROOM`"
        )
        suffixed = _SUFFIXED.match(query.strip())

        def earlier(m: MemberView) -> list[str]:
            # Its pseudonym was its label until its profile arrived.
            row = rows.get(m.key.sign, PeerRecord())
            old = [n.decode("utf-8", "replace") for n in row.earlier or []]
            return [pseudonym(room.room_id, m.key.sign), *old]

        tests: list[Callable[[MemberView], bool]] = [
            lambda m: m.me and query.strip().casefold() in ("you", "me"),
            lambda m: m.name == query,
            # What one can type for what is shown: "farida zaman 3f2a" for
            # "Farida Zaman ·3f2a"; a name without its suffix names several.
            lambda m: bool(wanted) and skeleton(m.name) == wanted,
            lambda m: bool(wanted) and skeleton(m.name.rpartition(SEPARATOR)[0]) == wanted,
            # A line of `members` copied whole: "Chen (Observer NGO)".
            lambda m: bool(wanted) and skeleton(f"{m.name}{m.affiliation or ''}") == wanted,
            # A suffix that has grown since (more digits once more lookalikes came).
            lambda m: suffixed is not None
            and skeleton(m.name.rpartition(SEPARATOR)[0]) == skeleton(suffixed["stem"])
            and m.fingerprint.startswith(suffixed["digits"].lower()),
            lambda m: len(query) >= 4
            and m.fingerprint.startswith(query.lower().replace(" ", "")),
        ]
        former = [
            m for m in views if not m.me and wanted and any(
                skeleton(e) == wanted for e in earlier(m)
            )
        ]
        try:
            found = unique_match(views, tests, several=several, missing=missing)
        except ClientError as exc:
            if exc is not missing:
                raise
            if len(former) != 1:
                raise several if former else missing from None
            found = former[0]
        if any(m.key.sign != found.key.sign for m in former):
            raise several  # a name one member had before and another has now
        if found.me:
            raise yourself or ClientError(f"{query!r} is you", hint="name another member")
        return found

    @staticmethod
    def safety(room: Room, member: MemberView) -> SafetyNumber:
        return safety_number(room.key.public, member.key, room_id=room.room_id)

    def mark_verified(self, room: Room, member: MemberView) -> None:
        record = self.get(room, member.key.sign)
        self._put(room, member.key.sign, replace(record, verified=member.key.fingerprint()))
