"""What a failed write means: the database unreachable, or this write refused.

Shared by the engines (:mod:`.engine`), the group commit (:mod:`.batcher`) and
the stores, which answer ``storage_unavailable`` rather than a traceback.
"""

from __future__ import annotations

import sqlite3
import time

import psycopg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..errors import RelayError
from ..logging import get_logger

log = get_logger("backchannel.relay.storage")

def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database cannot be reached" (not "this write is bad")."""
    if isinstance(exc, RelayError):
        return exc.code == STORAGE_UNAVAILABLE
    if isinstance(exc, sqlite3.OperationalError):
        # Raised as is by the statements run on sqlite3 itself (see appendsql.py):
        # locked, disk I/O error, disk full, cannot open.
        return True
    if isinstance(exc, OSError | ConnectionError | TimeoutError | PoolTimeout):
        return True
    if isinstance(getattr(exc, "orig", exc), psycopg.errors.TransactionRollback):
        return False  # a deadlock or serialization failure: each write is retried alone
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True  # raised as is by the catch-up reader's binary queries (messages._page_pg)
    if isinstance(exc, InterfaceError | OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


STORAGE_UNAVAILABLE = "storage_unavailable"


def storage_unavailable() -> RelayError:
    return RelayError(STORAGE_UNAVAILABLE, 503, "the database is unavailable; retry later")


def busy() -> RelayError:
    return RelayError("busy", 503, "the relay is busy; retry shortly")


def _reason(exc: BaseException) -> str:
    """A word for the log about why writes fail (the driver's message may name paths)."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    for word, reason in (("locked", "locked"), ("busy", "locked"), ("full", "full")):
        if word in text:
            return reason
    if "i/o" in text or isinstance(exc, OSError):
        return "io_error"
    return type(getattr(exc, "orig", None) or exc).__name__


class WriteHealth:
    """Whether writes reach the database, from the outcome of the latest one.

    While they fail, writers do not queue behind the write that is trying (each
    would wait a busy timeout in turn): they are answered ``storage_unavailable``
    at once, and ``/readyz`` says not ready. The next write after that one, or
    the probe ``/readyz`` makes, finds out whether the database is back.
    """

    #: Least time between two probes that ``/readyz`` makes while writes fail.
    PROBE_INTERVAL = 1.0

    def __init__(self) -> None:
        self.failing_since: float | None = None
        self.last_probe = 0.0

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("storage.writes_failing", reason=_reason(exc))

    def succeeded(self) -> None:
        if self.failing_since is not None:
            took = time.monotonic() - self.failing_since
            self.failing_since = None
            log.info("storage.writes_recovered", after_seconds=round(took, 1))

    def probe_due(self) -> bool:
        now = time.monotonic()
        if not self.failing or now - self.last_probe < self.PROBE_INTERVAL:
            return False
        self.last_probe = now
        return True
