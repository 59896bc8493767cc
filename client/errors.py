"""The client library's one error a user can cause and act on, and the lookups that raise it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from backchannel.protocol.errors import NotAuthorized


class ClientError(Exception):
    """Something the user asked for that cannot be done; ``str()`` is one clear line."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class Departed(NotAuthorized):
    """A room message from someone the validated log shows has left or was removed."""

    code = "departed"


T = TypeVar("T")


def unique_match(
    candidates: Sequence[T],
    tests: Sequence[Callable[[T], bool]],
    *,
    several: ClientError,
    missing: ClientError,
) -> T:
    """The one candidate the first discriminating test picks, tried in order of precedence
    (an exact name before an id prefix), so a name never shadows another by accident."""
    for test in tests:
        found = [c for c in candidates if test(c)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise several
    raise missing
