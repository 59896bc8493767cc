"""What every member's client does about a role change, rule change or revoked
invite in the log it validated (the levers themselves: :mod:`.admin`).

The author is a facilitator (the validator saw to that) but may be hostile:
nothing here raises, and a rule change can only make what this client shows
and exports *more* protective of what was said before it.
"""

from __future__ import annotations

from backchannel.protocol import roomlog as L

from .room import STRICTNESS, Room, names_shared
from .transcript import Transcript

#: Shown after "you are now …" / "… is now …".
ROLE_MEANS = {
    "facilitator": "a facilitator (may invite, remove, and change roles and rules)",
    "participant": "a participant",
    "observer": "an observer (reads, does not post)",
}
MODE_MEANS = {
    "chatham": "Chatham House (use what is said, never attribute it; exports carry no names)",
    "attributed": "on the record (exports name speakers)",
    "anonymous": "anonymous (pseudonyms only; names and affiliations are not shared)",
}
ID_LENGTH = 8


def kept_for(seconds: int) -> str:
    for unit, size in (("week", 7 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{seconds} seconds"


def after_admin_event(transcript: Transcript, room: Room, event: L.Event) -> None:
    """What a member's client does about a role change, rule change or revocation in
    the log it validated. The author may be hostile (a facilitator nonetheless):
    nothing here raises."""
    sent = event.ts * 1000  # shown at the event's own time, like joins and departures
    if isinstance(event, L.SetRoleEvent):
        means = ROLE_MEANS.get(event.role, event.role)
        if event.target == room.me:
            transcript.notice(room, f"you are now {means}", sent=sent)
        else:
            transcript.notice(room, f"{{who}} is now {means}", about=event.target, sent=sent)
    elif isinstance(event, L.RevokeEvent):
        transcript.notice(room, f"invite {event.invite.hex()[:ID_LENGTH]} was revoked", sent=sent)
    elif isinstance(event, L.SetRulesEvent):
        _rules_changed(transcript, room, event)


def _rules_changed(transcript: Transcript, room: Room, event: L.SetRulesEvent) -> None:
    before = room.log.state_at(event.pos - 1).rules
    after = event.rules
    parts = []
    if after.mode != before.mode:
        parts.append(f"from now on this room is {MODE_MEANS[after.mode]}")
        if STRICTNESS[after.mode] < STRICTNESS[before.mode]:
            parts.append(f"what was said before stays {before.mode}")
    if after.retention != before.retention:
        parts.append(f"messages are kept {kept_for(after.retention)}")
        if after.retention < before.retention:
            # Copies we hold go when the new period says, never later than promised.
            transcript.shorten(room, after.retention)
    transcript.notice(
        room, "the rules changed: " + "; ".join(parts or ["no change"]), sent=event.ts * 1000
    )
    if before.mode == "anonymous" and after.mode != "anonymous" and not names_shared(room):
        transcript.warn(
            room,
            "a facilitator made this anonymous room named; your name stays hidden here "
            "because you joined it anonymously",
        )
