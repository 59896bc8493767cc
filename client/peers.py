"""Other members as we know them: display names, affiliations, verification, pseudonyms.

A member key is all the room log says about a person; the rest arrives over
our pairwise channel with them (their profile) or from us (verification).
One row per member (:class:`~.records.PeerRecord`). Under ``anonymous``
rules, names and affiliations are neither kept nor shown; every client derives
the same pseudonym from the member key instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from backchannel.protocol import primitives as P
from backchannel.protocol.keys import MemberPublicKey
from backchannel.protocol.safety import SafetyNumber, safety_number

from .errors import ClientError, unique_match
from .records import PeerRecord, Table
from .room import Room
from .store import Store

MAX_NAME = 64
MAX_AFFILIATION = 128


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


class Peers:
    def __init__(self, store: Store) -> None:
        self._rows: Table[PeerRecord] = Table(store, "peer", PeerRecord)

    def get(self, room: Room, sign: bytes) -> PeerRecord:
        return self._rows.get(room.room_id + sign) or PeerRecord()

    def _put(self, room: Room, sign: bytes, record: PeerRecord) -> None:
        self._rows.put(room.room_id + sign, record, scope=room.room_id)

    def learn(self, room: Room, sign: bytes, name: object, affiliation: object) -> None:
        """What a member said about itself, over our pairwise channel."""
        if room.state.rules.mode == "anonymous":
            return  # never kept, so never shown or exported
        record = self.get(room, sign)
        if isinstance(name, str):
            record = replace(record, name=name[:MAX_NAME])
        if isinstance(affiliation, str):
            record = replace(record, affiliation=affiliation[:MAX_AFFILIATION])
        self._put(room, sign, record)

    def display_name(self, room: Room, sign: bytes) -> str:
        if sign == room.me:
            return "you"
        if room.state.rules.mode != "anonymous":
            name = self.get(room, sign).name
            if name:
                return name
        return pseudonym(room.room_id, sign)

    def members(self, room: Room) -> list[MemberView]:
        anonymous = room.state.rules.mode == "anonymous"
        out = []
        for member in room.state.members.values():
            info = self.get(room, member.key.sign)
            out.append(
                MemberView(
                    key=member.key,
                    role=member.role,
                    name=self.display_name(room, member.key.sign),
                    affiliation=None if anonymous else info.affiliation,
                    verified=info.verified == member.key.fingerprint(),
                    me=member.key.sign == room.me,
                )
            )
        return sorted(out, key=lambda m: (not m.me, m.name))

    def find(self, room: Room, query: str) -> MemberView:
        return unique_match(
            [m for m in self.members(room) if not m.me],
            [
                lambda m: m.name == query,
                lambda m: len(query) >= 4
                and m.fingerprint.startswith(query.lower().replace(" ", "")),
            ],
            several=ClientError(f"{query!r} matches several members", hint="use a fingerprint"),
            missing=ClientError(
                f"no member {query!r} in this room", hint="`backchannel members ROOM`"
            ),
        )

    @staticmethod
    def safety(room: Room, member: MemberView) -> SafetyNumber:
        return safety_number(room.key.public, member.key, room_id=room.room_id)

    def mark_verified(self, room: Room, member: MemberView) -> None:
        record = self.get(room, member.key.sign)
        self._put(room, member.key.sign, replace(record, verified=member.key.fingerprint()))


_ADJECTIVES = (
    "amber", "azure", "brisk", "calm", "cedar", "coral", "dusk", "ember", "fern", "frost", "gold",
    "hazel", "indigo", "ivory", "jade", "lilac", "maple", "moss", "ochre", "olive", "pearl",
    "quiet", "rust", "sage", "slate", "stone", "teal", "umber", "violet", "willow",
)
_NOUNS = (
    "badger", "crane", "dove", "egret", "falcon", "finch", "fox", "gull", "hare", "heron", "ibis",
    "jay", "kestrel", "lark", "lynx", "marten", "otter", "owl", "plover", "raven", "robin", "seal",
    "stork", "swift", "tern", "thrush", "wren", "yak", "zebu", "wolf",
)


def pseudonym(room_id: bytes, sign: bytes) -> str:
    """A stable per-room pseudonym for a member key (the same on every client)."""
    digest = P.hash_bytes(b"bc-pseudonym", room_id + sign, 16)
    a = _ADJECTIVES[digest[0] % len(_ADJECTIVES)]
    b = _NOUNS[digest[1] % len(_NOUNS)]
    return f"{a}-{b}-{int.from_bytes(digest[2:4], 'big') % 100:02d}"
