"""Our prekeys: made and uploaded, looked up by kind and id, used up, rotated."""

from __future__ import annotations

from collections import Counter

from backchannel.client.prekeys import KEM_PREKEYS, ONE_TIME_PREKEYS
from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.keys import PreKeyBundle
from tests.client.helpers import People


async def test_a_fresh_upload_stores_every_kind_and_the_relay_serves_them(
    people: People,
) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    stored = fac.prekeys.stored(room)
    assert Counter(p.kind for p in stored) == {
        "spk": 1, "kem-lr": 1, "opk": ONE_TIME_PREKEYS, "kem": KEM_PREKEYS,
    }
    assert (ONE_TIME_PREKEYS, KEM_PREKEYS) == (20, 5)
    ids = [p.id for p in stored]
    assert len(set(ids)) == len(ids)  # one id space for all kinds
    # What the relay hands out is what we keep the private halves of.
    bundle = PreKeyBundle.from_bytes(await fac.http(room.relay).claim(room.me, room.key.sign_seed))
    bundle.verify(room.key.public)
    lookup = fac.prekeys.lookup(room)
    for served in (bundle.spk, bundle.kem, bundle.opk):
        assert served is not None
        found = lookup(served.kind, served.id)
        assert found is not None
        assert found[0] == served


async def test_lookup_finds_each_prekey_by_kind_and_id(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    lookup = fac.prekeys.lookup(room)
    for row in fac.prekeys.stored(room):
        found = lookup(row.kind, row.id)  # type: ignore[arg-type]
        assert found is not None
        public, private = found
        assert (public.kind, public.id, private.kind, private.id) == (
            row.kind, row.id, row.kind, row.id,
        )
        public.verify(room.key.public)
        if row.kind in ("spk", "opk"):
            assert P.x25519_public(private.private) == public.public
    spk = next(p for p in fac.prekeys.stored(room) if p.kind == "spk")
    assert lookup("opk", spk.id) is None  # the kind is part of the key
    assert lookup("spk", 10_000) is None


async def test_consume_deletes_one_time_prekeys_only(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())
    by_kind = {p.kind: p for p in fac.prekeys.stored(room)}
    used = [(kind, by_kind[kind].id) for kind in ("spk", "kem-lr", "opk", "kem")]
    with fac.store.transaction():
        fac.prekeys.consume(room, used)
    lookup = fac.prekeys.lookup(room)
    assert lookup("spk", by_kind["spk"].id) is not None
    assert lookup("kem-lr", by_kind["kem-lr"].id) is not None
    assert lookup("opk", by_kind["opk"].id) is None
    assert lookup("kem", by_kind["kem"].id) is None
    left = Counter(p.kind for p in fac.prekeys.stored(room))
    assert left == {"spk": 1, "kem-lr": 1, "opk": ONE_TIME_PREKEYS - 1, "kem": KEM_PREKEYS - 1}


async def test_rotation_keeps_only_the_newest_previous_signed_prekey(people: People) -> None:
    fac = people.new("fac")
    room = await fac.create_room("t", L.Rules())

    def spk_ids() -> list[int]:
        return sorted(p.id for p in fac.prekeys.stored(room) if p.kind == "spk")

    (first,) = spk_ids()
    await fac.prekeys.upload(room, fresh=False, rotate_spk=True)
    second = max(spk_ids())
    assert spk_ids() == [first, second]
    await fac.prekeys.upload(room, fresh=False, rotate_spk=True)
    third = max(spk_ids())
    assert spk_ids() == [second, third]
    assert first < second < third
    # Rotating adds no one-time prekeys and keeps the last-resort one.
    left = Counter(p.kind for p in fac.prekeys.stored(room))
    assert left == {"spk": 2, "kem-lr": 1, "opk": ONE_TIME_PREKEYS, "kem": KEM_PREKEYS}
    bundle = PreKeyBundle.from_bytes(await fac.http(room.relay).claim(room.me, room.key.sign_seed))
    assert bundle.spk.id == third
