"""Rate limits and quotas keyed by something other than a connection.

Per-connection budgets are token buckets on the connection itself
(:class:`backchannel.server.rest.budgets.TokenBucket`); what must hold across
connections (per source address, per member key, per room) goes through the
``limits`` library's in-memory moving window, here. Keys are hashed before they
are stored, so the limiter's memory holds no address, key or room id in the
clear, and every entry expires with its window.
"""

from __future__ import annotations

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from backchannel.protocol import primitives as P


class Limits:
    """Named limits, each a ``limits`` rate string ("10/minute"), checked per key."""

    def __init__(self) -> None:
        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._items: dict[str, RateLimitItem] = {}
        # A per-process key, so the hashed keys mean nothing outside this process.
        self._salt = P.random_bytes(16)

    def define(self, name: str, rate: str) -> None:
        self._items[name] = parse(rate)

    def _key(self, parts: tuple[str | bytes, ...]) -> str:
        material = b"\x00".join(p.encode() if isinstance(p, str) else p for p in parts)
        return P.kdf(self._salt, b"ratelimit", material, size=16).hex()

    def hit(self, name: str, *parts: str | bytes, cost: int = 1) -> bool:
        """Spend ``cost`` from ``name``'s budget for ``parts``; False when it is spent."""
        item = self._items.get(name)
        if item is None:
            return True
        return self._limiter.hit(item, self._key(parts), cost=cost)

    def test(self, name: str, *parts: str | bytes) -> bool:
        item = self._items.get(name)
        return item is None or self._limiter.test(item, self._key(parts))
