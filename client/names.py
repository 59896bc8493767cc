"""Names as shown: one per member of a room, none a lookalike of another's or of "you".

A display name is whatever a member says it is (its profile arrives over our
pairwise session), so two members can both be "Farida Zaman" and one can call
itself "you". Names are compared by their :func:`skeleton` (Unicode NFKC/NFKD
folding, case, format and invisible characters, combining marks, punctuation
and spacing, and common Latin/Cyrillic/Greek homoglyphs all ignored), and every
member whose name collides with another's gets a short suffix from its key's
fingerprint (``Farida Zaman ·3f2a``), as does any member calling itself
"you" (shown quoted: ``"You" ·3f2a``). docs/client.md, "Names", states the rules.

Anonymous rooms show a :func:`pseudonym` derived from the member key instead.
"""

# ruff: noqa: RUF001 - this module's tables are made of lookalike characters on purpose

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from backchannel.protocol import primitives as P

from .render import inert

#: Characters of a chosen name shown before any suffix: with the longest
#: usual suffix the whole label fits the 40 columns the front ends give a name.
BASE_LIMIT = 32
#: Hex digits of the fingerprint in a suffix, at least; more while they would not tell
#: two colliding members apart.
SUFFIX_DIGITS = 4
SEPARATOR = " ·"

# Keyed by case: an upper-case Greek eta looks like H, the lower-case one like n.
_HOMOGLYPHS = str.maketrans(
    {
        **dict(zip("АВЕЅІЈКМНОРСТХУ", "ABESIJKMHOPCTXY", strict=True)),  # Cyrillic capitals
        **dict(zip("аеорсухѕіјһԁԛԝӏьвкмнпт", "aeopcyxsijhdqwlbbkmhnt", strict=True)),
        **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX", strict=True)),  # Greek capitals
        **dict(zip("αβγεηικνορτυχωϲ", "abyenikvoptuxwc", strict=True)),
        **dict(zip("ıɩǀɑɡ", "iiiag", strict=True)),
    }
)
# After case folding: shapes that differ by a stroke in many fonts.
_SHAPES = str.maketrans({"i": "l", "1": "l", "|": "l", "0": "o"})
_LIGATURES = (("rn", "m"), ("vv", "w"))

_QUOTES = "\"'“”„‟«»＂"
# A trailing group that looks like one of our suffixes ("·3f2a", "(3F2A)", ". 3f2a"); not
# after a hyphen or an apostrophe, which join parts of real names ("Jean-Abed").
_FAKE_SUFFIX = re.compile(
    r"^(?P<stem>.*?\w)[\W_]*[^\w\s\-‐‑‒–—'’][\W_]*[0-9a-f]{4,}\W*$", re.IGNORECASE
)


def skeleton(text: str) -> str:
    """What a name looks like, for comparing: two names with one skeleton are confusable."""
    text = unicodedata.normalize("NFKD", text).translate(_HOMOGLYPHS)
    text = unicodedata.normalize("NFKD", text.casefold()).translate(_SHAPES)
    # Combining marks, format and invisible characters, spaces and punctuation
    # are not alphanumeric: none of them tells two names apart at a glance.
    text = "".join(ch for ch in text if ch.isalnum())
    for pair, single in _LIGATURES:
        text = text.replace(pair, single)
    return text


YOU = skeleton("you")
_HEXISH = frozenset(skeleton("0123456789abcdef"))


def _mimicked(claim: str) -> list[str]:
    """The shorter names ``claim`` could be one of followed by a suffix of ours."""
    hexish = len(claim) - len(claim.rstrip("".join(_HEXISH)))
    return [claim[:cut] for cut in range(max(1, len(claim) - hexish), len(claim) - 3)]


def clip(name: str, limit: int = BASE_LIMIT) -> tuple[str, str]:
    """``name`` made inert and cut to ``limit`` characters, and the part of ``name``
    that is shown (two names that differ only past the cut look the same)."""
    pieces = [inert(ch) for ch in name]
    if sum(len(p) for p in pieces) <= limit:
        return "".join(pieces), name
    out, used = [], 0
    for count, piece in enumerate(pieces):
        if used + len(piece) > limit - 1:
            return "".join(out) + "…", name[:count]
        out.append(piece)
        used += len(piece)
    raise AssertionError("unreachable: the pieces were longer than the limit")


@dataclass(frozen=True)
class Chosen:
    """One member as the room knows it: the name it chose (or its pseudonym)."""

    sign: bytes
    name: str
    fingerprint: str  # hex


@dataclass
class _Entry:
    chosen: Chosen
    shown: str
    claims: frozenset[str]  # skeletons of the name, and of it without a fake suffix
    stem: str | None  # the shown name without a fake suffix, if it has one
    reserved: bool
    digits: int = 0


def _entry(chosen: Chosen) -> _Entry:
    shown, visible = clip(chosen.name)
    claims = {skeleton(visible)}
    stem = None
    match = _FAKE_SUFFIX.match(unicodedata.normalize("NFKC", visible))
    if match and skeleton(match["stem"]):
        stem = clip(match["stem"])[0]
        claims.add(skeleton(match["stem"]))
    claims.discard("")
    reserved = any(c == YOU or YOU in _mimicked(c) for c in claims)
    return _Entry(chosen, shown, frozenset(claims), stem, reserved)


def _label(e: _Entry) -> str:
    if not e.digits:
        return e.shown
    base = e.stem or e.shown
    if e.reserved:
        base = f'"{base.strip(_QUOTES)}"'
    return f"{base}{SEPARATOR}{e.chosen.fingerprint[: e.digits]}"


def unique_names(members: Sequence[Chosen]) -> dict[bytes, str]:
    """Each member's label: no two labels share a skeleton and none is "you"'s.

    Colliding members all get a suffix (not only the later one: who came first
    says nothing about who is genuine), the same number of digits within a
    group of lookalikes, as many as tell them apart.
    """
    entries = [_entry(m) for m in members]
    # Lookalikes by union-find over the claims, in time linear in the room
    # (a name table is rebuilt whenever a profile arrives).
    parent = list(range(len(entries)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_claim: dict[str, int] = {}
    for i, e in enumerate(entries):
        for claim in e.claims:
            parent[root(i)] = root(by_claim.setdefault(claim, i))
    for i, e in enumerate(entries):
        for claim in e.claims:
            for other in _mimicked(claim):
                if other in by_claim:
                    parent[root(i)] = root(by_claim[other])
    groups: dict[int, list[_Entry]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(root(i), []).append(e)
    for group in groups.values():
        if len(group) == 1 and not group[0].reserved:
            continue
        digits = SUFFIX_DIGITS
        while len({x.chosen.fingerprint[:digits] for x in group}) < len(group) and digits < 64:
            digits += 1
        for x in group:
            x.digits = digits
    # A last check on the labels themselves (a chosen name can still end up
    # shaped like another's label): lengthen suffixes until none is confusable.
    while True:
        seen: dict[str, list[_Entry]] = {}
        for e in entries:
            seen.setdefault(skeleton(_label(e)), []).append(e)
        clashes = [e for key, same in seen.items() if len(same) > 1 or key == YOU for e in same]
        growable = [e for e in clashes if e.digits < len(e.chosen.fingerprint)]
        if not growable:
            break
        for e in growable:
            e.digits = max(SUFFIX_DIGITS, e.digits + 1)
    return {e.chosen.sign: _label(e) for e in entries}


# --- pseudonyms ------------------------------------------------------------------------------

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
#: Crockford's base32: no i, l, o or u, so a group read aloud or copied by hand survives.
_BASE32 = "0123456789abcdefghjkmnpqrstvwxyz"
_GROUPS, _GROUP_LEN = 3, 4
#: Distinct pseudonyms: two words for the ear, then 60 bits, ~2^69.8 in all, so that
#: grinding a key for someone else's pseudonym is out of reach (the words alone
#: are 900 values, found in a few hundred tries).
PSEUDONYM_SPACE = len(_ADJECTIVES) * len(_NOUNS) * len(_BASE32) ** (_GROUPS * _GROUP_LEN)
PSEUDONYM_BITS = math.log2(PSEUDONYM_SPACE)


def pseudonym(room_id: bytes, sign: bytes) -> str:
    """A stable per-room pseudonym for a member key (the same on every client), e.g.
    ``amber-heron-7k3q-9x2m-4tbc``."""
    # 128 bits of digest for a ~70-bit choice: the modulo bias is below 2^-58.
    x = int.from_bytes(P.hash_bytes(b"bc-pseudonym", room_id + sign, 16), "big")
    x, adjective = divmod(x, len(_ADJECTIVES))
    x, noun = divmod(x, len(_NOUNS))
    chars = []
    for _ in range(_GROUPS * _GROUP_LEN):
        x, c = divmod(x, len(_BASE32))
        chars.append(_BASE32[c])
    groups = ["".join(chars[i : i + _GROUP_LEN]) for i in range(0, len(chars), _GROUP_LEN)]
    return "-".join([_ADJECTIVES[adjective], _NOUNS[noun], *groups])
