"""Retention: delete ciphertext older than its room's retention period.

A room's retention comes from its rules (``create`` / ``set_rules``) and is
kept in ``rooms.retention_seconds``. :func:`purge_loop` runs
:meth:`Store.purge` every ``purge_interval_seconds``; ``backchannel-relay
purge`` runs it once. Room messages and mailbox items whose coarse
``created_at`` plus the retention lies in the past are deleted (so a message
may go up to one timestamp granule, 60 s, early, never late), and so are
expired request nonces. The room log itself is kept: it is the room.
"""

from __future__ import annotations

import asyncio

from ..logging import get_logger
from ..storage import Store

log = get_logger("backchannel.relay.retention")


async def purge_once(store: Store) -> dict[str, int]:
    counts = await store.purge()
    if any(counts.values()):
        log.info("retention.purged", **counts)
    return counts


async def purge_loop(store: Store, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await purge_once(store)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("retention.failed", error=type(exc).__name__)
