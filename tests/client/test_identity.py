"""Issue 11, attack 4: "any member speaks as another".

Display names are self-asserted, so the client shows each member by a label
unique within the room (a fingerprint suffix on every name that collides, and
on any "you"), marks every line verified or not, derives anonymous pseudonyms
from more than 64 bits, and names members in notices as they are known when
the line is shown, not when it was recorded.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from textual.widgets import RichLog

from backchannel.client import names as N
from backchannel.client.core import Client, ClientError, Line, Room
from backchannel.client.names import Chosen, pseudonym, skeleton, unique_names
from backchannel.client.render import markdown_escape
from backchannel.client.store import Store
from backchannel.client.tui import ChatApp
from backchannel.client.views import format_line, render_export
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import MemberKeyPair
from tests.client.helpers import FAST, People, online, room_with, say

ATTRIBUTED = L.Rules(mode="attributed")


def person(people: People, home: str, name: str) -> Client:
    """A profile called ``name`` in its own directory (two people may share a name)."""
    store = Store.create(people.tmp_path / home, "pw", **FAST)
    Client.init_profile(store, people.relay.url, name)
    client = Client(store, clock=people.clock)
    people.clients.append(client)
    return client


async def room_of(
    people: People, fac_name: str, others: list[tuple[str, str]], rules: L.Rules
) -> tuple[Client, Room, list[tuple[Client, Room]]]:
    fac = person(people, "fac", fac_name)
    room = await fac.create_room("t", rules)
    joined = []
    for home, name in others:
        client = person(people, home, name)
        code = await fac.invite(room, "participant", 3600, 1)
        joined.append((client, await client.join(code, accept_rules=lambda r: True)))
    # Twice round, so that every profile has reached everyone.
    for _ in range(2):
        for client, r in [(fac, room), *joined]:
            await online(client, r)
    return fac, room, joined


def messages(client: Client, room: Room) -> dict[str, Line]:
    return {line.text: line for line in client.lines(room) if line.kind == "message"}


def suffix_of(label: str) -> tuple[str, str]:
    base, _, digits = label.rpartition(N.SEPARATOR)
    return base, digits


# --- (a) two members with one name ---------------------------------------------------------


async def test_two_members_named_alike_are_told_apart_everywhere(people: People) -> None:
    fac, room, [(imp, imp_room), (ann, ann_room)] = await room_of(
        people, "Farida Zaman", [("impostor", "Farida Zaman"), ("ann", "Ann")], ATTRIBUTED
    )
    await say(fac, room, "the facilitator speaks")
    await say(imp, imp_room, "the impostor speaks")
    await online(ann, ann_room)
    await online(fac, room)

    real = ann.display_name(ann_room, room.me)
    fake = ann.display_name(ann_room, imp_room.me)
    assert real != fake
    for label, key in ((real, room.key.public), (fake, imp_room.key.public)):
        base, digits = suffix_of(label)
        assert base == "Farida Zaman"  # both get a suffix: who came first proves nothing
        assert len(digits) >= N.SUFFIX_DIGITS
        assert key.fingerprint().hex().startswith(digits)
    assert ann.display_name(ann_room, ann_room.me) == "you"
    assert ann.display_name(ann_room, ann_room.me, as_you=False) == "Ann"  # no collision

    # On every line, in text and in JSON.
    lines = messages(ann, ann_room)
    for text, label in (("the facilitator speaks", real), ("the impostor speaks", fake)):
        line = lines[text]
        assert format_line(ann, ann_room, line, False).endswith(f"] ? {label}: {text}")
        assert json.loads(format_line(ann, ann_room, line, True))["from"] == label

    # In `members`, and in what one can type to name a member.
    shown = {m.key.sign: m.name for m in ann.members(ann_room)}
    assert shown == {ann_room.me: "Ann", room.me: real, imp_room.me: fake}  # ours: our name
    with pytest.raises(ClientError, match="several members"):
        ann.member(ann_room, "Farida Zaman")
    assert ann.member(ann_room, fake).key.sign == imp_room.me
    typed = fake.replace(N.SEPARATOR, " ").upper()  # "FARIDA ZAMAN 3F2A"
    assert ann.member(ann_room, typed).key.sign == imp_room.me

    # Every client agrees on the labels: the facilitator's own lines are "you" to
    # it, and in its export carry the label the others see it by.
    assert fac.display_name(room, imp_room.me) == fake
    assert fac.display_name(room, room.me) == "you"
    assert fac.display_name(room, room.me, as_you=False) == real
    notices = [format_line(fac, room, ln, False) for ln in fac.lines(room) if ln.kind == "notice"]
    assert any(n.endswith(f"* {fake} joined") for n in notices)

    # In attributed exports, md and json, from either side.
    for client, r in ((ann, ann_room), (fac, room)):
        md = render_export(client, r, "md")
        assert f"**{markdown_escape(real)}**: the facilitator speaks" in md
        assert f"**{markdown_escape(fake)}**: the impostor speaks" in md
        assert "**Farida Zaman**" not in md
        doc = json.loads(render_export(client, r, "json"))
        assert {m["text"]: m["from"] for m in doc["messages"]} == {
            "the facilitator speaks": real,
            "the impostor speaks": fake,
        }


def fingerprint(i: int) -> str:
    return f"{i:04x}" + "0" * 60


@pytest.mark.parametrize(
    "lookalike",
    [
        "Farida Zaman",
        "FARIDA  ZAMAN",
        "F\u0430rida Zaman",  # Cyrillic a
        "Farida\u200b Zaman",  # zero-width space
        "Farida Zam\u0430n\u202e",  # and a bidi override
        "\uff26\uff41\uff52\uff49\uff44\uff41 Zaman",  # fullwidth
        "Farí\u0301da Zaman",  # combining accent
        "FarIda Zaman",  # capital I for l
        "Farida Zaman ·0001",  # the real one's own suffix
        "Farida Zaman (0001)",
        "Farida Zaman 0001",
    ],
)
def test_lookalikes_collide_and_both_are_suffixed(lookalike: str) -> None:
    real = Chosen(b"real", "Farida Zaman", fingerprint(1))
    labels = unique_names([real, Chosen(b"fake", lookalike, fingerprint(2))])
    assert labels[b"real"] == "Farida Zaman ·0001"
    assert labels[b"fake"].endswith(" ·0002")
    assert skeleton(labels[b"real"]) != skeleton(labels[b"fake"])
    # A copied suffix is not shown as if it were the copier's.
    assert not labels[b"fake"].startswith(labels[b"real"])


def test_distinct_names_stay_bare_and_long_ones_keep_their_suffix() -> None:
    names = ["Ann", "Anna", "Bob Bakr", "Olga", "Jean-Abed"]
    labels = unique_names([Chosen(bytes([i]), n, fingerprint(i)) for i, n in enumerate(names)])
    assert list(labels.values()) == names
    # Two names that differ only past the part shown look the same: both suffixed.
    long = "Ambassador Extraordinary and Plenipotentiary of "
    labels = unique_names(
        [Chosen(b"a", long + "A", fingerprint(1)), Chosen(b"b", long + "B", fingerprint(2))]
    )
    assert labels[b"a"].endswith("… ·0001")
    assert labels[b"b"].endswith("… ·0002")
    # Fingerprints that share a prefix get more digits, as many as tell them apart.
    same = [Chosen(b"a", "X", "3f2a1" + "0" * 59), Chosen(b"b", "X", "3f2a2" + "0" * 59)]
    assert unique_names(same) == {b"a": "X ·3f2a1", b"b": "X ·3f2a2"}


# --- (b) "you" -----------------------------------------------------------------------------


async def test_a_member_called_you_never_shows_as_the_reader(people: People) -> None:
    calls = ["you", "You", "\uff59\uff4f\uff55", "y\u200bou", "\u0443\u043eu"]  # …, Cyrillic
    fac, room, joined = await room_of(
        people, "Farida", [(f"p{i}", name) for i, name in enumerate(calls)], ATTRIBUTED
    )
    for i, (client, r) in enumerate(joined):
        await say(client, r, f"said by {i}")
    await say(fac, room, "said by the facilitator")
    for client, r in [(fac, room), *joined]:
        await online(client, r)

    for reader, r in [(fac, room), joined[0]]:
        labels = set()
        for line in messages(reader, r).values():
            shown = json.loads(format_line(reader, r, line, True))
            text = format_line(reader, r, line, False)
            if line.mine:
                assert shown["from"] == "you"
                assert "• you: " in text
                continue
            label = shown["from"]
            labels.add(label)
            assert label != "you"
            assert skeleton(label) != skeleton("you")
            if skeleton(label).startswith("you"):
                assert label.startswith('"')  # quoted: `"You" ·3f2a`
                assert '" ·' in label
            assert " you: " not in text
        assert len(labels) == len(joined)  # everyone else, told apart
        listed = reader.members(r)
        # Nobody is listed as "you", not even we: `me` marks our own entry.
        assert "you" not in [m.name for m in listed]
        assert [m.me for m in listed].count(True) == 1
        md = render_export(reader, r, "md")
        assert "**you**" not in md
        assert '**"you" ·' in md  # the one who called itself "you", quoted and suffixed


# --- (c) pseudonyms ------------------------------------------------------------------------


def test_pseudonyms_encode_more_than_64_bits() -> None:
    name = pseudonym(P.random_bytes(32), P.random_bytes(32))
    adjective, noun, *groups = name.split("-")
    assert adjective in N._ADJECTIVES
    assert noun in N._NOUNS
    assert all(ch in N._BASE32 for group in groups for ch in group)
    # Every part of the format is drawn from its alphabet: count what it encodes.
    bits = (
        math.log2(len(set(N._ADJECTIVES)))
        + math.log2(len(set(N._NOUNS)))
        + sum(len(group) for group in groups) * math.log2(len(set(N._BASE32)))
    )
    assert bits >= 64
    assert bits == pytest.approx(N.PSEUDONYM_BITS)
    room_id = P.random_bytes(32)
    keys = [MemberKeyPair.generate().public.sign for _ in range(2000)]
    assert len({pseudonym(room_id, k) for k in keys}) == 2000

    # The old format (two words and two digits, 90,000 values) repeated among as many.
    def old(sign: bytes) -> str:
        d = P.hash_bytes(b"bc-pseudonym", room_id + sign, 16)
        a, b = N._ADJECTIVES[d[0] % 30], N._NOUNS[d[1] % 30]
        return f"{a}-{b}-{int.from_bytes(d[2:4], 'big') % 100:02d}"

    assert len({old(k) for k in keys}) < 2000


def test_grinding_a_key_for_someone_elses_pseudonym_fails() -> None:
    room_id = P.random_bytes(32)
    target = pseudonym(room_id, MemberKeyPair.generate().public.sign)
    # Against 90,000 values this many tries hit with probability ~43%; now ~2^-54.
    assert all(pseudonym(room_id, P.random_bytes(32)) != target for _ in range(50_000))


async def test_pseudonyms_agree_across_clients_and_collisions_are_flagged(
    people: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    fac, room, joined = await room_with(people, "ann", "bob", rules=L.Rules(mode="anonymous"))
    (ann, ann_room), (bob, bob_room) = joined["ann"], joined["bob"]
    for sign in (room.me, ann_room.me, bob_room.me):
        expected = pseudonym(room.room_id, sign)
        for client, r in ((fac, room), (ann, ann_room), (bob, bob_room)):
            if sign != r.me:
                assert client.display_name(r, sign) == expected
    # Impossible by chance now, but a collision would still be told apart.
    monkeypatch.setattr("backchannel.client.peers.pseudonym", lambda room_id, sign: "same")
    shown = {m.key.sign: m.name for m in fac.members(room)}
    assert shown[room.me] != "you"  # our own pseudonym, told apart like the others
    assert len({shown[room.me], shown[ann_room.me], shown[bob_room.me]}) == 3
    for sign in (ann_room.me, bob_room.me):
        base, digits = suffix_of(shown[sign])
        assert base == "same"
        assert room.state.members[sign].key.fingerprint().hex().startswith(digits)


# --- (d) notices name members as they are known now ----------------------------------------


async def test_a_join_notice_names_the_joiner_once_its_profile_arrives(people: People) -> None:
    fac = person(people, "fac", "Farida")
    room = await fac.create_room("t", L.Rules())
    ann = person(people, "ann", "Ann Aldridge")
    ann_room = await ann.join(
        await fac.invite(room, "participant", 3600, 1), accept_rules=lambda r: True
    )
    await fac.sync_log(room)  # the join is noticed before any profile has travelled
    interim = pseudonym(room.room_id, ann_room.me)

    def notices() -> list[str]:
        return [format_line(fac, room, ln, False) for ln in fac.lines(room) if ln.kind == "notice"]

    assert notices()[-1].endswith(f"* {interim} joined")
    await online(ann, ann_room)  # Ann's profile travels...
    await online(fac, room)  # ...and arrives
    assert notices()[-1].endswith("* Ann Aldridge joined")  # the line recorded before it
    (joined,) = [ln for ln in fac.lines(room) if ln.kind == "notice"]
    assert json.loads(format_line(fac, room, joined, True))["text"] == "Ann Aldridge joined"
    await fac.remove(room, ann_room.me)
    assert notices()[-1].endswith("* Ann Aldridge was removed; keys rotated")


async def test_the_chat_screen_redraws_a_notice_when_the_profile_arrives(people: People) -> None:
    fac = person(people, "fac", "Farida")
    room = await fac.create_room("t", L.Rules())
    ann = person(people, "ann", "Ann Aldridge")
    ann_room = await ann.join(
        await fac.invite(room, "participant", 3600, 1), accept_rules=lambda r: True
    )
    interim = pseudonym(room.room_id, ann_room.me)
    app = ChatApp(fac, room)

    def screen() -> str:
        return "\n".join(strip.text for strip in app.query_one("#log", RichLog).lines)

    async def wait_for(needle: str) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while needle not in screen():
            assert asyncio.get_running_loop().time() < deadline, screen()
            await pilot.pause(0.1)

    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(f"* {interim} joined")
        await online(ann, ann_room)  # the profile reaches the live screen
        await wait_for("* Ann Aldridge joined")
        assert interim not in screen()


# --- (e) the verified mark -----------------------------------------------------------------


async def test_every_line_carries_the_verified_mark(people: People) -> None:
    fac, room, joined = await room_with(people, "ann", "mal ✓")
    (ann, ann_room), (mal, mal_room) = joined["ann"], joined["mal ✓"]
    await say(ann, ann_room, "hello")
    await say(mal, mal_room, "trust me")
    await say(fac, room, "welcome")
    await online(fac, room)
    lines = messages(fac, room)

    def shown(text: str) -> tuple[str, bool]:
        line = lines[text]
        as_text = format_line(fac, room, line, False).split("] ", 1)[1]
        return as_text, json.loads(format_line(fac, room, line, True))["verified"]

    assert shown("hello") == ("? ann: hello", False)
    assert shown("welcome") == ("• you: welcome", False)  # our own: nothing to compare
    # A name cannot fake the mark: it comes before the name.
    assert shown("trust me") == ("? mal ✓: trust me", False)
    fac.mark_verified(room, fac.member(room, "ann"))
    assert shown("hello") == ("✓ ann: hello", True)
    assert shown("trust me") == ("? mal ✓: trust me", False)
    assert {m.name: m.verified for m in fac.members(room)}["ann"]
