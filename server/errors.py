"""One error type for the relay, carrying a stable code and an HTTP status.

Route handlers and the WebSocket loop raise :class:`RelayError`; one handler
turns it into a JSON body (REST) or an ``error`` frame (WebSocket). Protocol
errors from ``backchannel.protocol`` keep their own ``code`` and get a status
from :func:`from_protocol`.
"""

from __future__ import annotations

from backchannel.protocol import errors as perr
from backchannel.protocol import roomlog


class RelayError(Exception):
    def __init__(self, code: str, status: int = 400, detail: str | None = None) -> None:
        super().__init__(detail or code)
        self.code = code
        self.status = status
        self.detail = detail or code.replace("_", " ")


# First match wins: subclasses before their bases.
_STATUS: tuple[tuple[type[perr.ProtocolError], int], ...] = (
    (perr.FieldTooLong, 413),
    (roomlog.LogFull, 409),
    (perr.ChainBroken, 409),  # includes DuplicateEvent
    (perr.ForkDetected, 409),
    (perr.NotAuthorized, 403),
    (perr.InvalidInvite, 403),
    (perr.BadSignature, 403),
    (perr.MembershipError, 409),  # includes RoomFull
)


def from_protocol(exc: perr.ProtocolError) -> RelayError:
    status = 400
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            status = code
            break
    return RelayError(exc.code, status, str(exc) or exc.code)
