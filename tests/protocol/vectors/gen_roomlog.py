"""Known answers for the room log: every event's bytes, signed part and hash,
the room id, rules hashes, and the state after selected positions."""

from __future__ import annotations

from typing import Any

from backchannel.protocol import primitives as P
from backchannel.protocol import roomlog as L
from backchannel.protocol.errors import InvalidInvite
from backchannel.protocol.keys import MemberKeyPair
from tests.protocol.drbg import Drbg

T0 = 1_800_000_000
DAY = 86_400


def generate() -> dict[str, Any]:
    rng = Drbg("vectors-roomlog")
    names = ("facilitator", "alice", "bob", "carol")
    keys = {name: MemberKeyPair.generate(rng) for name in names}
    fac, alice, bob, carol = (keys[n] for n in names)
    log = L.RoomLog()
    seeds: list[bytes] = []

    rules = L.Rules("chatham", 7 * DAY)
    s = log.append(L.make_create(fac, rules, T0, rng))
    ev, seed = L.make_invite(fac, s, "participant", T0 + DAY, 2, T0 + 10, rng)
    seeds.append(seed)
    s = log.append(ev)
    s = log.append(L.make_join(alice, seed, s, T0 + 20))
    s = log.append(L.make_join(bob, seed, s, T0 + 30))
    ev, seed = L.make_invite(fac, s, "facilitator", T0 + DAY, 1, T0 + 40, rng)
    seeds.append(seed)
    s = log.append(ev)
    s = log.append(L.make_join(carol, seed, s, T0 + 50))
    s = log.append(L.make_set_role(fac, s, bob.public, "observer", T0 + 60))
    s = log.append(L.make_remove(carol, s, alice.public, T0 + 70))
    s = log.append(L.make_leave(bob, s, T0 + 80))
    new_rules = L.Rules("anonymous", 30 * DAY)
    s = log.append(L.make_set_rules(fac, s, new_rules, T0 + 90))

    events = []
    for pos in range(len(log)):
        data = log.event(pos)
        event = log.decoded(pos)
        events.append(
            {
                "type": event.KIND,
                "bytes": data,
                "signed": L.signed_bytes(event),
                "hash": L.event_hash(data),
            }
        )
    # A revoke continues the room in a copy, so the ten events above and their
    # states stay as they were frozen before the event type existed.
    more = L.validate_log(log.events)
    ev, revoked_seed = L.make_invite(fac, more.state, "participant", T0 + DAY, 1, T0 + 100, rng)
    more.append(ev)
    more.append(L.make_revoke(fac, more.state, P.ed25519_public(revoked_seed), T0 + 110))
    late = MemberKeyPair.generate(rng)
    refused = L.make_join(late, revoked_seed, more.state, T0 + 120, check=False)
    try:
        more.append(refused)
    except InvalidInvite:
        pass
    else:
        raise AssertionError("a join under a revoked invite was accepted")
    revoke = {
        "invite_seed": revoked_seed,
        "late_joiner": {"sign_seed": late.sign_seed, "dh_private": late.dh_private},
        "events": [
            {
                "type": more.decoded(pos).KIND,
                "bytes": more.event(pos),
                "signed": L.signed_bytes(more.decoded(pos)),
                "hash": L.event_hash(more.event(pos)),
            }
            for pos in (len(log), len(log) + 1)
        ],
        "state": more.state.summary(),
        "refused_join": {"bytes": refused, "error": "invalid_invite"},
    }
    return {
        "revoke": revoke,
        "keys": {
            name: {"sign_seed": k.sign_seed, "dh_private": k.dh_private} for name, k in keys.items()
        },
        "invite_seeds": seeds,
        "rules": {
            "initial": {"bytes": rules.to_bytes(), "hash": rules.rules_hash()},
            "later": {"bytes": new_rules.to_bytes(), "hash": new_rules.rules_hash()},
        },
        "events": events,
        "room_id": log.room_id,
        "states": {str(pos): log.state_at(pos).summary() for pos in (0, 3, 5, len(log) - 1)},
        "final_state_bytes": log.state.to_bytes(),
        "log_bytes": log.to_bytes(),
    }
