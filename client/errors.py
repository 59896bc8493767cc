"""The client library's one error a user can cause and act on."""

from __future__ import annotations


class ClientError(Exception):
    """Something the user asked for that cannot be done; ``str()`` is one clear line."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
