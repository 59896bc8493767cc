"""The room log validator: happy path, every rejection, tampering, forks, and a model check."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.errors import (
    BadSignature,
    ChainBroken,
    DecodeError,
    FieldTooLong,
    ForkDetected,
    InvalidInvite,
    LogError,
    MembershipError,
    NotAuthorized,
    ProtocolError,
    UnsupportedVersion,
)
from backchannel.protocol.keys import MemberKeyPair, MemberPublicKey, signing_input
from tests.protocol.drbg import Drbg

T0 = 1_800_000_000
DAY = 86_400


def key(name: str) -> MemberKeyPair:
    return MemberKeyPair.generate(Drbg(f"roomlog-{name}"))


F, ALICE, BOB, CAROL, ALICE2, MALLORY = (
    key(n) for n in ("fac", "alice", "bob", "carol", "alice2", "mallory")
)


@dataclass
class Scenario:
    events: list[bytes]
    seeds: dict[str, bytes]
    log: L.RoomLog


def build_scenario() -> Scenario:
    """A realistic room: invites, joins, a promotion and a demotion, a removal,
    a departure, new rules, and the removed participant re-invited under a new key."""
    rng = Drbg("roomlog-scenario")
    log = L.RoomLog()
    seeds: dict[str, bytes] = {}

    def add(data: bytes) -> L.RoomState:
        return log.append(data)

    s = add(L.make_create(F, L.Rules(), T0, rng))  # 0
    ev, seeds["first"] = L.make_invite(F, s, "participant", T0 + DAY, 2, T0 + 10, rng)
    s = add(ev)  # 1
    s = add(L.make_join(ALICE, seeds["first"], s, T0 + 20))  # 2
    s = add(L.make_join(BOB, seeds["first"], s, T0 + 30))  # 3
    ev, seeds["co"] = L.make_invite(F, s, "facilitator", T0 + DAY, 1, T0 + 40, rng)
    s = add(ev)  # 4
    s = add(L.make_join(CAROL, seeds["co"], s, T0 + 50))  # 5
    s = add(L.make_set_role(F, s, BOB.public, "observer", T0 + 60))  # 6
    s = add(L.make_remove(CAROL, s, ALICE.public, T0 + 70))  # 7
    s = add(L.make_leave(BOB, s, T0 + 80))  # 8
    s = add(L.make_set_rules(F, s, L.Rules("attributed", 30 * DAY), T0 + 90))  # 9
    ev, seeds["again"] = L.make_invite(CAROL, s, "participant", T0 + 2 * DAY, 1, T0 + 100, rng)
    s = add(ev)  # 10
    s = add(L.make_join(ALICE2, seeds["again"], s, T0 + 110))  # 11
    s = add(L.make_set_role(CAROL, s, ALICE2.public, "facilitator", T0 + 120))  # 12
    return Scenario(events=list(log.events), seeds=seeds, log=log)


SCENARIO = build_scenario()
EVENTS = SCENARIO.events


def prefix_log(n: int) -> L.RoomLog:
    return L.validate_log(EVENTS[:n])


def resign(event: L.Event, author: MemberKeyPair, invite_seed: bytes | None = None) -> bytes:
    """Sign an arbitrary (possibly illegal) event, so only the rule under test fails."""
    message = L.signed_bytes(event)
    if isinstance(event, L.JoinEvent) and invite_seed is not None:
        event = replace(
            event,
            invite_sig=P.ed25519_sign(invite_seed, signing_input(L.CTX_JOIN_INVITE, message)),
        )
    return L.encode_event(replace(event, sig=author.sign(L.CTX_EVENT, message)))


def assert_rejected(log: L.RoomLog, data: bytes, error: type[ProtocolError]) -> ProtocolError:
    before_state, before_events = log.state, log.events
    with pytest.raises(error) as info:
        log.append(data)
    assert log.state is before_state
    assert log.events == before_events
    return info.value


# --- happy path -----------------------------------------------------------------------------


def test_happy_path_final_state() -> None:
    log = L.validate_log(EVENTS)
    s = log.state
    assert s.room_id == L.event_hash(EVENTS[0]) == log.room_id
    assert s.creator == F.public
    assert s.length == len(EVENTS) == 13
    assert s.epoch == (12, L.event_hash(EVENTS[12]))
    assert {k: m.role for k, m in s.members.items()} == {
        F.public.sign: "facilitator",
        CAROL.public.sign: "facilitator",
        ALICE2.public.sign: "facilitator",
    }
    assert set(s.departed) == {ALICE.public.sign, BOB.public.sign}
    assert s.rules == L.Rules("attributed", 30 * DAY)
    assert s.members[ALICE2.public.sign].since == 11
    uses = {pk: inv.uses_left for pk, inv in s.invites.items()}
    assert sorted(uses.values()) == [0, 0, 0]
    assert s.ts == T0 + 120


def test_events_round_trip_and_lookup() -> None:
    log = SCENARIO.log
    for pos, data in enumerate(EVENTS):
        event = L.decode_event(data)
        assert L.encode_event(event) == data
        assert event.pos == pos
        assert log.decoded(pos) == event
        assert log.event(pos) == data
        assert log.position_of(L.event_hash(data)) == pos
        assert log.head_at(pos) == L.event_hash(data)
    assert log.position_of(bytes(32)) is None
    kinds = [L.decode_event(d).KIND for d in EVENTS]
    assert kinds[:4] == ["create", "invite", "join", "join"]


def test_log_and_state_serialisation() -> None:
    log = SCENARIO.log
    again = L.RoomLog.from_bytes(log.to_bytes())
    assert again.events == log.events
    assert again.state == log.state
    for pos in range(len(log)):
        state = log.state_at(pos)
        assert L.RoomState.from_bytes(state.to_bytes()) == state


def test_state_bytes_reject_non_canonical_order() -> None:
    value = decode(SCENARIO.log.state.to_bytes())
    assert isinstance(value, dict)
    members = value["members"]
    assert isinstance(members, list)
    value["members"] = list(reversed(members))
    with pytest.raises(DecodeError):
        L.RoomState.from_bytes(encode(value))


def test_rules_validation_and_hash() -> None:
    assert L.Rules().mode == "chatham"
    assert L.Rules.from_bytes(L.Rules("anonymous", 3600).to_bytes()) == L.Rules("anonymous", 3600)
    assert L.Rules().rules_hash() != L.Rules("attributed").rules_hash()
    for bad in (
        {"mode": "secret", "retention": 3600},
        {"mode": "chatham", "retention": 0},
        {"mode": "chatham", "retention": L.MAX_RETENTION + 1},
    ):
        with pytest.raises(DecodeError):
            L.Rules.from_bytes(encode({**bad, "v": 1}))
        with pytest.raises(DecodeError):
            L.Rules(**bad)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedVersion):
        L.Rules.from_bytes(encode({"mode": "chatham", "retention": 3600, "v": 2}))


def test_state_at_and_epochs() -> None:
    log = SCENARIO.log
    assert set(log.state_at(0).members) == {F.public.sign}
    assert set(log.state_at(3).members) == {F.public.sign, ALICE.public.sign, BOB.public.sign}
    # Alice is removed at 7: a message sent under epoch 6 is for her, one under 7 is not.
    assert ALICE.public.sign in log.state_at(6).members
    assert ALICE.public.sign not in log.state_at(7).members
    assert log.state_at(6).role_of(BOB.public.sign) == "observer"
    for pos in range(len(log)):
        assert log.check_epoch(pos, log.head_at(pos)) == "ok"
        assert log.state_at(pos).epoch == (pos, log.head_at(pos))
    assert log.check_epoch(len(log), bytes(32)) == "ahead"
    with pytest.raises(ForkDetected):
        log.check_epoch(5, log.head_at(4))
    for bad in (-1, len(log), True):
        with pytest.raises(L.UnknownPosition):
            log.state_at(bad)
    with pytest.raises(L.UnknownPosition):
        log.check_epoch(-1, bytes(32))
    with pytest.raises(DecodeError):
        log.check_epoch(0, b"short")


def test_state_at_across_checkpoints() -> None:
    """Past states are rebuilt from checkpoints; they must equal the states seen live."""
    log = L.RoomLog()
    rng = Drbg("roomlog-long")
    live = [log.append(L.make_create(F, L.Rules(), T0, rng))]
    ev, seed = L.make_invite(F, live[-1], "participant", T0 + DAY, 1, T0, rng)
    live.append(log.append(ev))
    live.append(log.append(L.make_join(ALICE, seed, live[-1], T0)))
    roles: list[L.Role] = ["observer", "participant"]
    for i in range(75):
        live.append(log.append(L.make_set_role(F, live[-1], ALICE.public, roles[i % 2], T0 + i)))
    assert len(log) == 78
    for pos, state in enumerate(live):
        assert log.state_at(pos) == state


def test_extend_is_all_or_nothing() -> None:
    log = prefix_log(4)
    bad = bytearray(EVENTS[6])
    bad[-1] ^= 1
    with pytest.raises(ProtocolError):
        log.extend([EVENTS[4], EVENTS[5], bytes(bad)])
    assert len(log) == 4
    assert log.state == prefix_log(4).state
    assert log.position_of(L.event_hash(EVENTS[4])) is None
    log.extend(EVENTS[4:])
    assert log.state == SCENARIO.log.state


def test_repr_shows_no_private_material() -> None:
    assert "RoomLog(room=" in repr(SCENARIO.log)
    assert repr(L.RoomLog()) == "RoomLog(empty)"
    with pytest.raises(L.UnknownPosition):
        _ = L.RoomLog().state


# --- each rejection -------------------------------------------------------------------------


def next_set_rules(state: L.RoomState, author: MemberKeyPair = F, **changes: object) -> L.Event:
    event = L.SetRulesEvent(
        pos=state.length,
        prev=state.head,
        ts=state.ts,
        author=author.public.sign,
        rules=L.Rules("anonymous"),
    )
    return replace(event, **changes)  # type: ignore[arg-type]


def test_rejects_bad_author_signature() -> None:
    log = prefix_log(4)
    forged = resign(next_set_rules(log.state), MALLORY)  # names F, signed by Mallory
    assert_rejected(log, forged, BadSignature)
    wrong_context = L.encode_event(
        replace(
            next_set_rules(log.state),
            sig=F.sign("prekey", L.signed_bytes(next_set_rules(log.state))),
        )
    )
    assert_rejected(log, wrong_context, BadSignature)


def test_rejects_bad_invite_signature() -> None:
    log = prefix_log(1)
    ev, seed = L.make_invite(F, log.state, "participant", T0 + DAY, 1, T0, Drbg("i"))
    log.append(ev)
    join = L.decode_event(L.make_join(ALICE, seed, log.state, T0 + 5))
    assert isinstance(join, L.JoinEvent)
    other_seed = Drbg("other-invite")(32)
    assert_rejected(log, resign(join, ALICE, invite_seed=other_seed), BadSignature)
    # The invite signature under the member context does not count either.
    assert_rejected(
        log,
        L.encode_event(replace(join, invite_sig=join.sig)),
        BadSignature,
    )


def test_rejects_wrong_prev() -> None:
    log = prefix_log(4)
    event = next_set_rules(log.state, prev=Drbg("prev")(32))
    assert_rejected(log, resign(event, F), ChainBroken)


@pytest.mark.parametrize("delta", [1, 5])
def test_rejects_wrong_pos(delta: int) -> None:
    log = prefix_log(4)
    event = next_set_rules(log.state, pos=log.state.length + delta)
    assert_rejected(log, resign(event, F), ChainBroken)


def test_rejects_non_create_at_position_zero() -> None:
    with pytest.raises(ChainBroken):
        L.validate_log([EVENTS[1]])
    with pytest.raises(ChainBroken):
        L.validate_log([])
    event = next_set_rules(SCENARIO.log.state_at(0), pos=0)
    with pytest.raises(ChainBroken):
        L.decode_event(resign(event, F))


def test_rejects_create_after_the_first_event() -> None:
    log = prefix_log(3)
    other_room = L.make_create(F, L.Rules(), T0, Drbg("other-room"))
    assert_rejected(log, other_room, ChainBroken)
    # A create that claims a later position is refused at decoding.
    create = L.decode_event(other_room)
    value = decode(other_room)
    assert isinstance(value, dict)
    assert isinstance(create, L.CreateEvent)
    value["pos"] = 3
    with pytest.raises(ChainBroken):
        L.decode_event(encode(value))


def test_rejects_join_with_unknown_invite() -> None:
    log = prefix_log(4)
    assert_rejected(
        log,
        L.make_join(CAROL, Drbg("never-invited")(32), log.state, T0 + 60, check=False),
        InvalidInvite,
    )


def test_rejects_join_with_expired_invite() -> None:
    log = prefix_log(1)
    ev, seed = L.make_invite(F, log.state, "participant", T0 + 100, 5, T0, Drbg("x"))
    log.append(ev)
    log.append(L.make_join(ALICE, seed, log.state, T0 + 100))  # ts == expires: still valid
    late = L.make_join(BOB, seed, log.state, T0 + 101, check=False)
    assert_rejected(log, late, InvalidInvite)


def test_rejects_join_with_used_up_invite() -> None:
    log = prefix_log(4)  # the first invite allowed two uses: Alice and Bob
    assert log.state.invites[P.ed25519_public(SCENARIO.seeds["first"])].uses_left == 0
    extra = L.make_join(CAROL, SCENARIO.seeds["first"], log.state, T0 + 35, check=False)
    assert_rejected(log, extra, InvalidInvite)


def test_rejects_join_acknowledging_other_rules() -> None:
    log = prefix_log(11)
    stale_view = replace(log.state, rules=L.Rules())  # rules before set_rules at 9
    join = L.make_join(ALICE2, SCENARIO.seeds["again"], stale_view, T0 + 110, check=False)
    assert_rejected(log, join, L.RulesMismatch)


@pytest.mark.parametrize("action", ["invite", "remove", "set_role", "set_rules", "revoke"])
def test_rejects_facilitator_actions_by_participant(action: str) -> None:
    log = prefix_log(4)  # Alice and Bob are participants
    s = log.state
    if action == "invite":
        data, _ = L.make_invite(
            ALICE, s, "participant", T0 + DAY, 1, T0 + 40, Drbg("a"), check=False
        )
    elif action == "remove":
        data = L.make_remove(ALICE, s, BOB.public, T0 + 40, check=False)
    elif action == "set_role":
        data = L.make_set_role(ALICE, s, ALICE.public, "facilitator", T0 + 40, check=False)
    elif action == "revoke":
        invite = P.ed25519_public(SCENARIO.seeds["first"])
        data = L.make_revoke(ALICE, s, invite, T0 + 40, check=False)
    else:
        data = L.make_set_rules(ALICE, s, L.Rules("attributed"), T0 + 40, check=False)
    assert_rejected(log, data, NotAuthorized)


def test_rejects_facilitator_actions_by_observer_and_outsider() -> None:
    log = prefix_log(7)  # Bob is an observer
    data = L.make_set_rules(BOB, log.state, L.Rules("attributed"), T0 + 65, check=False)
    assert_rejected(log, data, NotAuthorized)
    data = L.make_set_rules(MALLORY, log.state, L.Rules("attributed"), T0 + 65, check=False)
    assert_rejected(log, data, NotAuthorized)
    assert_rejected(log, L.make_leave(MALLORY, log.state, T0 + 65, check=False), NotAuthorized)


def test_rejects_actions_by_removed_or_departed_members() -> None:
    log = prefix_log(9)  # Alice removed at 7, Bob left at 8
    for who in (ALICE, BOB):
        assert_rejected(log, L.make_leave(who, log.state, T0 + 95, check=False), NotAuthorized)
    # A removed facilitator loses every power.
    log = prefix_log(6)
    log.append(L.make_remove(F, log.state, CAROL.public, T0 + 55))
    data, _ = L.make_invite(
        CAROL, log.state, "participant", T0 + DAY, 1, T0 + 56, Drbg("c"), check=False
    )
    err = assert_rejected(log, data, NotAuthorized)
    assert "removed" in str(err)


def test_rejects_duplicate_member_keys() -> None:
    log = prefix_log(1)
    ev, seed = L.make_invite(F, log.state, "participant", T0 + DAY, 10, T0, Drbg("dup"))
    log.append(ev)
    log.append(L.make_join(ALICE, seed, log.state, T0 + 1))
    # The same member key again, and the facilitator's own key.
    for who in (ALICE, F):
        assert_rejected(
            log, L.make_join(who, seed, log.state, T0 + 2, check=False), MembershipError
        )
    # A fresh signing key that reuses Alice's X25519 key.
    twin = MemberKeyPair.from_private(Drbg("twin")(32), ALICE.dh_private)
    assert_rejected(log, L.make_join(twin, seed, log.state, T0 + 2, check=False), MembershipError)
    # A fresh X25519 key that reuses Alice's signing key.
    twin = MemberKeyPair.from_private(ALICE.sign_seed, Drbg("twin")(32))
    assert_rejected(log, L.make_join(twin, seed, log.state, T0 + 2, check=False), MembershipError)
    # The invite key itself as a member key: every code holder could sign for it.
    invite_key = MemberKeyPair.from_private(seed, Drbg("x")(32))
    assert_rejected(
        log, L.make_join(invite_key, seed, log.state, T0 + 2, check=False), MembershipError
    )


def posing(pair: MemberKeyPair, dh: bytes) -> MemberKeyPair:
    """``pair`` claiming someone else's bytes as its X25519 half: nothing proves a
    ``dh`` half, so a hostile joiner can put any 32 bytes there and still sign."""
    return replace(pair, public=MemberPublicKey(sign=pair.public.sign, dh=dh))


def cross_room(
    *joiners: MemberKeyPair, gone: MemberKeyPair | None = None
) -> tuple[L.RoomLog, bytes]:
    """F's room with ``joiners`` admitted through one invite (whose seed is returned),
    and ``gone``, if given, removed again."""
    log = prefix_log(1)
    ev, seed = L.make_invite(F, log.state, "participant", T0 + DAY, 10, T0, Drbg("cross"))
    log.append(ev)
    for who in joiners:
        log.append(L.make_join(who, seed, log.state, T0 + 1))
    if gone is not None:
        log.append(L.make_remove(F, log.state, gone.public, T0 + 2))
    return log, seed


@pytest.mark.parametrize("departed", [False, True], ids=["current", "departed"])
def test_rejects_join_whose_dh_is_a_members_signing_key(departed: bool) -> None:
    log, seed = cross_room(ALICE, gone=ALICE if departed else None)
    hostile = posing(MALLORY, ALICE.public.sign)
    join = L.make_join(hostile, seed, log.state, T0 + 3, check=False)
    assert_rejected(log, join, MembershipError)


def test_rejects_join_whose_dh_is_the_creators_signing_key() -> None:
    log, seed = cross_room()
    join = L.make_join(posing(MALLORY, F.public.sign), seed, log.state, T0 + 3, check=False)
    assert_rejected(log, join, MembershipError)


@pytest.mark.parametrize("departed", [False, True], ids=["current", "departed"])
def test_rejects_join_whose_signing_key_is_a_members_dh(departed: bool) -> None:
    # Alice's X25519 half is Mallory's Ed25519 key, so Mallory's genuine key collides.
    alice = posing(ALICE, MALLORY.public.sign)
    log, seed = cross_room(alice, gone=alice if departed else None)
    join = L.make_join(MALLORY, seed, log.state, T0 + 3, check=False)
    assert_rejected(log, join, MembershipError)


def test_rejects_join_whose_dh_is_its_own_invite_key() -> None:
    log, seed = cross_room()
    invite_key = P.ed25519_public(seed)
    join = L.make_join(posing(MALLORY, invite_key), seed, log.state, T0 + 3, check=False)
    assert_rejected(log, join, MembershipError)


def test_rejects_join_whose_dh_is_another_invite_key() -> None:
    log, seed = cross_room()
    ev, other = L.make_invite(F, log.state, "observer", T0 + DAY, 1, T0 + 2, Drbg("other"))
    log.append(ev)
    hostile = posing(MALLORY, P.ed25519_public(other))
    assert_rejected(
        log, L.make_join(hostile, seed, log.state, T0 + 3, check=False), MembershipError
    )


@pytest.mark.parametrize("departed", [False, True], ids=["current", "departed"])
def test_rejects_invite_key_that_is_a_members_signing_key(departed: bool) -> None:
    log, _ = cross_room(ALICE, gone=ALICE if departed else None)
    data, _ = L.make_invite(
        F, log.state, "participant", T0 + DAY, 1, T0 + 3, lambda n: ALICE.sign_seed, check=False
    )
    assert_rejected(log, data, InvalidInvite)


@pytest.mark.parametrize("departed", [False, True], ids=["current", "departed"])
def test_rejects_invite_key_that_is_a_members_dh(departed: bool) -> None:
    seed = Drbg("dh-as-invite")(32)
    alice = posing(ALICE, P.ed25519_public(seed))
    log, _ = cross_room(alice, gone=alice if departed else None)
    data, _ = L.make_invite(
        F, log.state, "participant", T0 + DAY, 1, T0 + 3, lambda n: seed, check=False
    )
    assert_rejected(log, data, InvalidInvite)


def test_removed_member_key_can_never_rejoin() -> None:
    log = prefix_log(8)  # Alice removed at 7
    ev, seed = L.make_invite(F, log.state, "participant", T0 + DAY, 1, T0 + 80, Drbg("re"))
    log.append(ev)
    assert_rejected(log, L.make_join(ALICE, seed, log.state, T0 + 81, check=False), MembershipError)
    log.append(L.make_join(ALICE2, seed, log.state, T0 + 81))  # a new key is fine


def test_last_facilitator_rules() -> None:
    log = prefix_log(4)  # F is the only facilitator, Alice and Bob participants
    demote = L.make_set_role(F, log.state, F.public, "participant", T0 + 40, check=False)
    assert_rejected(log, demote, MembershipError)
    assert_rejected(
        log, L.make_remove(F, log.state, F.public, T0 + 40, check=False), MembershipError
    )
    # With a second facilitator, demoting oneself is fine.
    log2 = prefix_log(6)
    log2.append(L.make_set_role(F, log2.state, F.public, "participant", T0 + 60))
    # Leaving is always allowed, even for the last facilitator...
    log.append(L.make_leave(F, log.state, T0 + 50))
    assert log.state.facilitators() == []
    # ...after which nobody can invite, remove or change rules, and the
    # facilitator's outstanding invites die with its authority.
    data = L.make_set_rules(ALICE, log.state, L.Rules("attributed"), T0 + 60, check=False)
    assert_rejected(log, data, NotAuthorized)
    log.append(L.make_leave(ALICE, log.state, T0 + 61))


def test_invites_die_with_their_creators_authority() -> None:
    log = prefix_log(6)  # F and Carol are facilitators
    ev, seed = L.make_invite(CAROL, log.state, "participant", T0 + DAY, 3, T0 + 60, Drbg("c"))
    log.append(ev)
    log.append(L.make_set_role(F, log.state, CAROL.public, "participant", T0 + 61))
    late = L.make_join(MALLORY, seed, log.state, T0 + 62, check=False)
    assert_rejected(log, late, InvalidInvite)


def test_revoked_invite_admits_nobody() -> None:
    log = prefix_log(3)  # the first invite has one use left after Alice
    invite = P.ed25519_public(SCENARIO.seeds["first"])
    data = L.make_revoke(F, log.state, invite, T0 + 25)
    assert isinstance(L.decode_event(data), L.RevokeEvent)
    log.append(data)
    assert log.state.invites[invite].uses_left == 0
    late = L.make_join(BOB, SCENARIO.seeds["first"], log.state, T0 + 30, check=False)
    assert_rejected(log, late, InvalidInvite)
    # The key stays known: it can be neither invited again nor become a member key.
    seed = SCENARIO.seeds["first"]
    again, _ = L.make_invite(
        F, log.state, "participant", T0 + DAY, 1, T0 + 31, lambda _n: seed, check=False
    )
    assert_rejected(log, again, InvalidInvite)
    # Revoking again is a no-op, like a repeated set_role.
    log.append(L.make_revoke(F, log.state, invite, T0 + 32))
    # validate_log refuses the same join inside a whole log.
    with pytest.raises(InvalidInvite):
        L.validate_log([*log.events, L.make_join(BOB, seed, log.state, T0 + 33, check=False)])


def test_rejects_revoke_of_unknown_invite_or_by_departed() -> None:
    log = prefix_log(3)
    data = L.make_revoke(F, log.state, bytes(32), T0 + 25, check=False)
    assert_rejected(log, data, InvalidInvite)
    log = prefix_log(9)  # Alice removed at 7, Bob (an observer) left at 8
    invite = P.ed25519_public(SCENARIO.seeds["co"])
    for who in (ALICE, BOB, MALLORY):
        data = L.make_revoke(who, log.state, invite, T0 + 95, check=False)
        assert_rejected(log, data, NotAuthorized)


def test_revoke_decodes_strictly() -> None:
    log = prefix_log(3)
    data = L.make_revoke(F, log.state, P.ed25519_public(SCENARIO.seeds["first"]), T0 + 25)
    value = decode(data)
    assert sorted(value) == ["author", "invite", "pos", "prev", "sig", "ts", "type", "v"]
    with pytest.raises(DecodeError):
        L.decode_event(encode({**value, "target": bytes(32)}))
    with pytest.raises(DecodeError):
        L.decode_event(encode({k: v for k, v in value.items() if k != "invite"}))


def test_rejects_bad_invites() -> None:
    log = prefix_log(1)
    s = log.state
    # expiry not after the invite's own time
    data, _ = L.make_invite(F, s, "participant", T0, 1, T0, Drbg("a"), check=False)
    assert_rejected(log, data, InvalidInvite)
    # more uses than the limit
    data, _ = L.make_invite(F, s, "participant", T0 + 5, 1001, T0, Drbg("a"), check=False)
    assert_rejected(log, data, InvalidInvite)
    # the same invite key twice
    data, _ = L.make_invite(F, s, "participant", T0 + 5, 1, T0, Drbg("same"))
    log.append(data)
    again, _ = L.make_invite(F, log.state, "observer", T0 + 5, 1, T0, Drbg("same"), check=False)
    assert_rejected(log, again, InvalidInvite)


def test_rejects_remove_of_non_member() -> None:
    log = prefix_log(9)
    for target in (ALICE, MALLORY):  # removed already; never a member
        data = L.make_remove(F, log.state, target.public, T0 + 95, check=False)
        assert_rejected(log, data, MembershipError)
    data = L.make_set_role(F, log.state, BOB.public, "participant", T0 + 95, check=False)
    assert_rejected(log, data, MembershipError)


def test_rejects_time_going_backwards() -> None:
    log = prefix_log(4)
    event = next_set_rules(log.state, ts=log.state.ts - 1)
    assert_rejected(log, resign(event, F), ChainBroken)


def test_rejects_unknown_event_type_version_and_fields() -> None:
    log = prefix_log(4)
    event = next_set_rules(log.state)
    base = decode(resign(event, F))
    assert isinstance(base, dict)

    def signed(value: dict[str, object]) -> bytes:
        unsigned = {k: v for k, v in value.items() if k != "sig"}
        return encode({**unsigned, "sig": F.sign(L.CTX_EVENT, encode(unsigned))})  # type: ignore[dict-item]

    assert_rejected(log, signed({**base, "type": "kick"}), DecodeError)
    assert_rejected(log, signed({**base, "v": 2}), UnsupportedVersion)
    assert_rejected(log, signed({**base, "extra": 1}), DecodeError)
    assert_rejected(log, signed({**base, "isig": bytes(64)}), DecodeError)
    missing = {k: v for k, v in base.items() if k != "author"}
    assert_rejected(log, signed(missing), DecodeError)
    assert_rejected(log, b"\xff\x00garbage", DecodeError)
    with pytest.raises(DecodeError):
        log.append("text")  # type: ignore[arg-type]


def test_limits() -> None:
    tight = L.LogLimits(max_length=3, max_members=2, max_uses=2, max_event_size=400)
    log = L.validate_log(EVENTS[:3], limits=tight)
    data = L.make_set_rules(F, log.state, L.Rules("attributed"), T0 + 40, check=False)
    assert_rejected(log, data, L.LogFull)
    # room full: two members, a third join is refused
    log = L.RoomLog(limits=replace(tight, max_length=100))
    log.extend(EVENTS[:3])
    assert_rejected(log, EVENTS[3], L.RoomFull)
    # an event over the size limit is refused before it is parsed
    assert_rejected(log, EVENTS[3] + bytes(500), FieldTooLong)
    # invite uses above the configured bound
    data, _ = L.make_invite(
        F, log.state, "participant", T0 + DAY, 3, T0 + 40, Drbg("u"), check=False
    )
    assert_rejected(log, data, InvalidInvite)
    # a log longer than max_length cannot be loaded
    with pytest.raises(FieldTooLong):
        L.RoomLog.from_bytes(SCENARIO.log.to_bytes(), limits=tight)


def test_builders_refuse_illegal_events() -> None:
    s = prefix_log(4).state
    with pytest.raises(NotAuthorized):
        L.make_set_rules(ALICE, s, L.Rules("attributed"), T0 + 40)
    with pytest.raises(InvalidInvite):
        L.make_join(CAROL, Drbg("nope")(32), s, T0 + 40)


def test_builders_clamp_a_lagging_clock() -> None:
    s = prefix_log(4).state
    data = L.make_set_rules(F, s, L.Rules("attributed"), T0 - 1000)
    assert L.decode_event(data).ts == s.ts


# --- replays, forks -------------------------------------------------------------------------


def test_replayed_join_after_removal_is_rejected() -> None:
    log = prefix_log(9)  # Alice removed at 7
    err = assert_rejected(log, EVENTS[2], L.DuplicateEvent)
    assert err.code == "duplicate_event"
    # Re-targeting the old join at the head breaks its signatures.
    old = L.decode_event(EVENTS[2])
    moved = L.encode_event(replace(old, pos=log.state.length, prev=log.state.head, ts=log.state.ts))
    assert_rejected(log, moved, BadSignature)


def test_join_replayed_in_another_room_is_rejected() -> None:
    rng = Drbg("room-b")
    other = L.RoomLog()
    s = other.append(L.make_create(F, L.Rules(), T0, rng))
    ev, seed_b = L.make_invite(F, s, "participant", T0 + DAY, 2, T0 + 10, rng)
    s = other.append(ev)
    # Same position as Alice's join in room A, but a different chain.
    assert_rejected(other, EVENTS[2], ChainBroken)
    # Re-signed for room B with room A's invite key: the invite is unknown there.
    join_a = L.decode_event(EVENTS[2])
    moved = replace(join_a, prev=s.head, rules_hash=s.rules.rules_hash())
    assert_rejected(other, resign(moved, ALICE, SCENARIO.seeds["first"]), InvalidInvite)
    other.append(L.make_join(ALICE, seed_b, s, T0 + 20))


def diverge() -> tuple[L.RoomLog, L.RoomLog, bytes, bytes]:
    ours, theirs = prefix_log(6), prefix_log(6)
    x = L.make_set_rules(F, ours.state, L.Rules("attributed"), T0 + 70)
    y = L.make_set_rules(CAROL, theirs.state, L.Rules("anonymous"), T0 + 70)
    ours.append(x)
    theirs.append(y)
    return ours, theirs, x, y


def test_fork_between_diverging_logs_is_detected() -> None:
    ours, theirs, _, y = diverge()
    assert ours.check_epoch(5, theirs.head_at(5)) == "ok"
    with pytest.raises(ForkDetected):
        ours.check_epoch(*theirs.state.epoch)
    with pytest.raises(ForkDetected):
        theirs.check_epoch(*ours.state.epoch)
    assert_rejected(ours, y, ForkDetected)
    # A later epoch from the other branch: first "ahead", then the fork shows
    # when the missing events are fetched.
    theirs.append(L.make_leave(ALICE, theirs.state, T0 + 80))
    assert ours.check_epoch(*theirs.state.epoch) == "ahead"
    before = ours.state
    with pytest.raises(ForkDetected):
        ours.extend(theirs.events[6:])
    assert ours.state is before
    assert len(ours) == 7


def test_invalid_alternative_at_a_filled_position_is_not_called_a_fork() -> None:
    ours, _, _, _ = diverge()
    at6 = ours.state_at(5)
    forged = L.make_set_rules(MALLORY, at6, L.Rules("anonymous"), T0 + 70, check=False)
    assert_rejected(ours, forged, NotAuthorized)
    stranger = resign(next_set_rules(at6, prev=bytes(32)), F)
    assert_rejected(ours, stranger, ChainBroken)
    again = L.make_create(F, L.Rules(), T0, Drbg("roomlog-scenario"))
    assert again == EVENTS[0]  # same seed, same nonce, same signature: the same event
    assert_rejected(ours, again, L.DuplicateEvent)


# --- tampering (hypothesis) -----------------------------------------------------------------


@given(st.data())
def test_any_bit_flip_in_any_event_is_rejected(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(EVENTS) - 1), label="event")
    byte = data.draw(st.integers(0, len(EVENTS[index]) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    altered = bytearray(EVENTS[index])
    altered[byte] ^= 1 << bit
    events = [*EVENTS[:index], bytes(altered), *EVENTS[index + 1 :]]
    with pytest.raises(ProtocolError):
        L.validate_log(events)


@given(st.data())
def test_bit_flipped_append_leaves_the_log_unchanged(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, len(EVENTS) - 1), label="prefix")
    log = prefix_log(n)
    byte = data.draw(st.integers(0, len(EVENTS[n]) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    altered = bytearray(EVENTS[n])
    altered[byte] ^= 1 << bit
    assert_rejected(log, bytes(altered), ProtocolError)
    log.append(EVENTS[n])


@given(st.integers(0, len(EVENTS) - 2))
def test_dropping_any_but_the_last_event_is_rejected(index: int) -> None:
    with pytest.raises(ChainBroken):
        L.validate_log(EVENTS[:index] + EVENTS[index + 1 :])


def test_dropping_the_tail_is_a_valid_prefix_caught_by_epochs() -> None:
    shorter = L.validate_log(EVENTS[:-1])
    assert shorter.check_epoch(*SCENARIO.log.state.epoch) == "ahead"


@given(st.data())
def test_reordering_is_rejected(data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(EVENTS) - 2), label="i")
    j = data.draw(st.integers(i + 1, len(EVENTS) - 1), label="j")
    events = list(EVENTS)
    events[i], events[j] = events[j], events[i]
    with pytest.raises(ChainBroken):
        L.validate_log(events)


@given(st.data())
def test_duplicating_any_event_is_rejected(data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(EVENTS) - 1), label="copied")
    k = data.draw(st.integers(0, len(EVENTS)), label="inserted at")
    events = [*EVENTS[:k], EVENTS[i], *EVENTS[k:]]
    with pytest.raises(ChainBroken):  # DuplicateEvent is a ChainBroken
        L.validate_log(events)


@given(st.binary(max_size=600))
def test_garbage_never_raises_untyped(blob: bytes) -> None:
    log = prefix_log(3)
    with pytest.raises(ProtocolError):
        log.append(blob)
    with pytest.raises(ProtocolError):
        L.RoomState.from_bytes(blob)
    with pytest.raises(ProtocolError):
        L.RoomLog.from_bytes(blob)


# --- model-based check ------------------------------------------------------------------------

POOL = [key(f"pool-{i}") for i in range(9)]
ROLE = st.sampled_from(["facilitator", "participant", "observer"])
PICK = st.integers(0, 1000)
RARELY = st.integers(0, 7).map(lambda n: n == 0)
MAX_MEMBERS = 5


@dataclass
class ModelInvite:
    seed: bytes
    role: str
    expires: int
    uses_left: int
    creator: int


class RoomModel(RuleBasedStateMachine):
    """Random legal and illegal actions; the validator must agree with a plain model.

    Actors are mostly drawn from the people able to act (so that legal events
    happen often enough to grow the room) and sometimes from anyone at all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rng = Drbg("roomlog-machine")
        self.log = L.RoomLog(limits=L.LogLimits(max_members=MAX_MEMBERS))
        self.ts = T0
        self.log.append(L.make_create(POOL[0], L.Rules(), self.ts, self.rng))
        self.states = [self.log.state]
        self.members: dict[int, str] = {0: "facilitator"}
        self.departed: set[int] = set()
        self.invites: list[ModelInvite] = []
        self.rules = L.Rules()

    def is_facilitator(self, who: int) -> bool:
        return self.members.get(who) == "facilitator"

    def pick(self, n: int, anyone: bool, *, roles: tuple[str, ...] = L.ROLES) -> int:
        pool = sorted(i for i, role in self.members.items() if role in roles)
        if anyone or not pool:
            return n % len(POOL)
        return pool[n % len(pool)]

    def attempt(self, data: bytes, legal: bool) -> bool:
        if legal:
            self.states.append(self.log.append(data))
            return True
        assert_rejected(self.log, data, LogError)
        return False

    @rule(dt=st.integers(0, 400))
    def tick(self, dt: int) -> None:
        self.ts += dt

    @rule(n=PICK, anyone=RARELY, role=ROLE, uses=st.integers(1, 3), life=st.integers(-50, 800))
    def invite(self, n: int, anyone: bool, role: L.Role, uses: int, life: int) -> None:
        who = self.pick(n, anyone, roles=("facilitator",))
        expires = max(0, self.ts + life)
        data, seed = L.make_invite(
            POOL[who], self.log.state, role, expires, uses, self.ts, self.rng, check=False
        )
        legal = self.is_facilitator(who) and expires > self.ts
        if self.attempt(data, legal):
            self.invites.append(ModelInvite(seed, role, expires, uses, who))

    @precondition(lambda self: bool(self.invites))
    @rule(n=PICK, reuse=RARELY, inv=PICK, any_invite=RARELY, stale_rules=RARELY)
    def join(self, n: int, reuse: bool, inv: int, any_invite: bool, stale_rules: bool) -> None:
        fresh = [i for i in range(len(POOL)) if i not in self.members and i not in self.departed]
        who = fresh[n % len(fresh)] if fresh and not reuse else n % len(POOL)
        usable = [i for i in self.invites if i.uses_left > 0 and self.ts <= i.expires]
        choices = usable if usable and not any_invite else self.invites
        invite = choices[inv % len(choices)]
        view = self.log.state
        if stale_rules:
            view = replace(view, rules=L.Rules(retention=self.rules.retention + 1))
        data = L.make_join(POOL[who], invite.seed, view, self.ts, check=False)
        legal = (
            invite.uses_left > 0
            and self.ts <= invite.expires
            and self.is_facilitator(invite.creator)
            and not stale_rules
            and who not in self.members
            and who not in self.departed
            and len(self.members) < MAX_MEMBERS
        )
        if self.attempt(data, legal):
            invite.uses_left -= 1
            self.members[who] = invite.role

    @rule(n=PICK, anyone=RARELY, m=PICK, any_target=RARELY)
    def remove(self, n: int, anyone: bool, m: int, any_target: bool) -> None:
        who = self.pick(n, anyone, roles=("facilitator",))
        others = sorted(i for i in self.members if i != who)
        whom = others[m % len(others)] if others and not any_target else m % len(POOL)
        data = L.make_remove(POOL[who], self.log.state, POOL[whom].public, self.ts, check=False)
        legal = self.is_facilitator(who) and whom in self.members and whom != who
        if self.attempt(data, legal):
            del self.members[whom]
            self.departed.add(whom)

    @rule(n=PICK, anyone=RARELY)
    def leave(self, n: int, anyone: bool) -> None:
        # Mostly non-facilitators, so that rooms rarely lose their last facilitator early.
        who = self.pick(n, anyone, roles=("participant", "observer"))
        data = L.make_leave(POOL[who], self.log.state, self.ts, check=False)
        if self.attempt(data, who in self.members):
            del self.members[who]
            self.departed.add(who)

    @rule(n=PICK, anyone=RARELY, m=PICK, any_target=RARELY, role=ROLE)
    def set_role(self, n: int, anyone: bool, m: int, any_target: bool, role: L.Role) -> None:
        who = self.pick(n, anyone, roles=("facilitator",))
        whom = self.pick(m, any_target)
        data = L.make_set_role(
            POOL[who], self.log.state, POOL[whom].public, role, self.ts, check=False
        )
        facilitators = sum(r == "facilitator" for r in self.members.values())
        last = self.members.get(whom) == "facilitator" and facilitators == 1
        legal = (
            self.is_facilitator(who)
            and whom in self.members
            and not (last and role != "facilitator")
        )
        if self.attempt(data, legal):
            self.members[whom] = role

    @rule(
        n=PICK,
        anyone=RARELY,
        mode=st.sampled_from(L.MODES),
        retention=st.integers(60, 10 * DAY),
    )
    def set_rules(self, n: int, anyone: bool, mode: L.Mode, retention: int) -> None:
        who = self.pick(n, anyone, roles=("facilitator",))
        rules = L.Rules(mode, retention)
        data = L.make_set_rules(POOL[who], self.log.state, rules, self.ts, check=False)
        if self.attempt(data, self.is_facilitator(who)):
            self.rules = rules

    @precondition(lambda self: bool(self.invites))
    @rule(n=PICK, anyone=RARELY, inv=PICK, unknown=RARELY)
    def revoke(self, n: int, anyone: bool, inv: int, unknown: bool) -> None:
        who = self.pick(n, anyone, roles=("facilitator",))
        invite = self.invites[inv % len(self.invites)]
        pk = self.rng(32) if unknown else P.ed25519_public(invite.seed)
        data = L.make_revoke(POOL[who], self.log.state, pk, self.ts, check=False)
        if self.attempt(data, self.is_facilitator(who) and not unknown):
            invite.uses_left = 0

    @rule(pick=st.integers(0, 1000))
    def replay(self, pick: int) -> None:
        old = self.log.event(pick % len(self.log))
        assert_rejected(self.log, old, L.DuplicateEvent)

    @invariant()
    def state_matches_model(self) -> None:
        s = self.log.state
        assert {k: m.role for k, m in s.members.items()} == {
            POOL[i].public.sign: r for i, r in self.members.items()
        }
        assert set(s.departed) == {POOL[i].public.sign for i in self.departed}
        assert s.rules == self.rules
        assert {pk: inv.uses_left for pk, inv in s.invites.items()} == {
            P.ed25519_public(inv.seed): inv.uses_left for inv in self.invites
        }
        assert s.length == len(self.states)

    def teardown(self) -> None:
        again = L.validate_log(self.log.events)
        assert again.state == self.log.state
        for pos, state in enumerate(self.states):
            assert self.log.state_at(pos) == state


TestRoomModel = RoomModel.TestCase
TestRoomModel.settings = settings(stateful_step_count=50, deadline=None)
