"""Short invite codes through a real relay: join, old codes, and pins that do not match."""

from __future__ import annotations

import pytest

from backchannel.client.errors import ClientError
from backchannel.protocol import roomlog as L
from backchannel.protocol import shortcode as S
from backchannel.protocol.invite import InviteCode
from tests.client.helpers import People


async def test_join_with_a_short_code(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("Border talks", L.Rules())
    text = await fac.invite(room, "participant", 3600, 2)
    url, code = text.split(" ")
    assert url == room.relay
    assert code.startswith("bcinv2-")
    assert len(code) == 60
    ann_room = await people.new("ann").join(text, accept_rules=lambda rules: True)
    assert ann_room.room_id == room.room_id
    # Read aloud: the address left out (the joiner's own relay), upper case, spaces.
    spoken = code.upper().replace("-", " ")
    bob_room = await people.new("bob").join(spoken, accept_rules=lambda rules: True)
    assert bob_room.room_id == room.room_id
    await fac.sync_log(room)
    assert {ann_room.me, bob_room.me} <= set(room.state.members)
    with pytest.raises(ClientError, match="used up"):
        await people.new("cy").join(text, accept_rules=lambda rules: True)


async def test_an_old_bcinv1_code_still_joins(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    now = fac.now()
    event, seed = L.make_invite(room.key, room.state, "observer", now + 3600, 1, now)
    await fac.http(room.relay).append(room.room_id, event)
    await fac.sync_log(room)
    old = InviteCode.for_room(room.relay, room.state, seed).to_text()
    ann_room = await people.new("ann").join(old, accept_rules=lambda rules: True)
    assert ann_room.room_id == room.room_id
    assert ann_room.state.role_of(ann_room.me) == "observer"


async def test_a_code_whose_pin_does_not_match_the_served_log_is_refused(
    people: People,
) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    real = S.read_invite(await fac.invite(room, "participant", 3600, 1))
    assert isinstance(real, S.ShortCode)
    # Another room (another creator) that also published this invite key: the relay
    # keeps serving the first room, which the code below does not pin.
    other = people.new("other")
    elsewhere = await other.create_room("look-alike", L.Rules())
    now = other.now()
    seed = real.invite_seed
    copied, _ = L.make_invite(
        elsewhere.key, elsewhere.state, "participant", now + 3600, 1, now, rng=lambda _n: seed
    )
    await other.http(elsewhere.relay).append(elsewhere.room_id, copied)
    await other.sync_log(elsewhere)
    flipped = bytes([real.pin[0] ^ 1]) + real.pin[1:]
    for wrong in (
        S.ShortCode.for_room(room.relay, elsewhere.state, real.secret),
        S.ShortCode(room.relay, real.secret, flipped),
    ):
        ann = people.new(f"ann{wrong.pin.hex()}")
        with pytest.raises(ClientError, match="does not check out"):
            await ann.join(wrong.to_text(), accept_rules=lambda rules: True)
        assert ann.rooms() == []
    assert await fac.sync_log(room) == []  # nothing was signed or appended
    assert await other.sync_log(elsewhere) == []


async def test_typos_and_missing_relay_are_clear_errors(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    text = await fac.invite(room, "participant", 3600, 1)
    last = text[-1]
    typo = text[:-1] + ("7" if last != "7" else "8")
    ann = people.new("ann")
    with pytest.raises(ClientError, match="mistyped"):
        await ann.join(typo, accept_rules=lambda rules: True)
    with pytest.raises(ClientError, match="not a valid invite code"):
        await ann.join("hello", accept_rules=lambda rules: True)
    assert ann.rooms() == []
