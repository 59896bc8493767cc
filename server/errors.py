"""One error type for the relay, carrying a stable code and an HTTP status.

Route handlers and the WebSocket loop raise :class:`RelayError`; one handler
turns it into a JSON body (REST) or an ``error`` frame (WebSocket). Protocol
errors from ``backchannel.protocol`` map to 400/403 through :func:`from_protocol`.
"""

from __future__ import annotations

from backchannel.protocol import errors as perr


class RelayError(Exception):
    def __init__(self, code: str, status: int = 400, detail: str | None = None) -> None:
        super().__init__(detail or code)
        self.code = code
        self.status = status
        self.detail = detail or code.replace("_", " ")


def from_protocol(exc: perr.ProtocolError) -> RelayError:
    status = 403 if isinstance(exc, perr.NotAuthorized | perr.BadSignature) else 400
    if isinstance(exc, perr.FieldTooLong):
        status = 413
    return RelayError(exc.code, status, str(exc))
