"""Budgets that keep what one client can take from the relay bounded.

Per connection: token buckets for frames, sends and decoding time. Across
connections: the connection pools (strangers' and members'), per-key send
budgets and per-address decoding budgets for strangers. Addresses and keys are
held in memory only while their connections live, never logged or stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def spend(self, amount: float) -> float:
        """Spend ``amount`` (it may go below zero); returns the seconds until the
        bucket is back above zero (0 when it is)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - amount
        self.stamp = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Pool:
    """Counts connections, in total and per client address.

    Addresses are held in memory while connected, never logged or stored.
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.live = 0
        self.by_address: dict[str, int] = {}

    def acquire(self, address: str, *, force: bool = False) -> bool:
        full = self.live >= self.total or self.by_address.get(address, 0) >= self.per_address
        if full and not force:
            return False
        self.live += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        self.live -= 1
        left = self.by_address.get(address, 1) - 1
        if left <= 0:
            self.by_address.pop(address, None)
        else:
            self.by_address[address] = left


class ConnectionLimiter:
    """All connections, in total and per address; within them, a small budget for
    connections that hold no membership-confirmed subscription (unauthenticated,
    or authenticated by keys that are members of nothing they subscribed to).

    A stranger can mint keys at will, so authenticating proves nothing; what a
    stranger cannot forge is membership, which only a subscription the database
    confirmed shows. Every new connection starts unsettled and is closed after
    ``setup_window_seconds`` unless it settles (see :meth:`Connection.check`), so
    a stranger holds at most the unsettled budget, briefly, and the rest of
    ``max_connections`` stays for members.
    """

    def __init__(
        self, total: int, per_address: int, unsettled: int = 1024, unsettled_per_address: int = 16
    ) -> None:
        self.all = Pool(total, per_address)
        self.unsettled = Pool(unsettled, unsettled_per_address)

    @property
    def live(self) -> int:
        return self.all.live

    def acquire(self, address: str, *, evicting: bool = False) -> bool:
        """A slot for a new connection. ``evicting``: the caller is closing an older
        unsettled connection to make room, so the unsettled total may be exceeded
        (by one, until that one's slot is released)."""
        if self.unsettled.by_address.get(address, 0) >= self.unsettled.per_address:
            return False
        if self.unsettled.live >= self.unsettled.total and not evicting:
            return False
        if not self.all.acquire(address):
            return False
        self.unsettled.acquire(address, force=True)
        return True

    def unsettled_full(self, address: str) -> bool:
        """Whether only the unsettled total (not this address's share) is spent."""
        return (
            self.unsettled.live >= self.unsettled.total
            and self.unsettled.by_address.get(address, 0) < self.unsettled.per_address
        )

    def settle(self, address: str) -> None:
        self.unsettled.release(address)

    def unsettle(self, address: str) -> None:
        # Never refused: the connection is already here, and is reaped soon if it
        # does not subscribe again.
        self.unsettled.acquire(address, force=True)

    def release(self, address: str, settled: bool = False) -> None:
        self.all.release(address)
        if not settled:
            self.unsettled.release(address)


class KeyBuckets:
    """Send budgets per member key, shared by every connection that holds the key
    (a key on 64 connections gets one budget, not 64)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[bytes, TokenBucket] = {}

    def take(self, key: bytes) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take()

    def prune(self) -> None:
        """Forget buckets that have refilled: they hold nothing a new one would not."""
        now = time.monotonic()
        self.buckets = {
            k: b for k, b in self.buckets.items() if b.tokens + (now - b.stamp) * b.rate < b.burst
        }


class CpuBuckets:
    """Decoding-time budgets per client address, for connections of strangers."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.buckets: dict[str, TokenBucket] = {}

    def get(self, address: str) -> TokenBucket:
        bucket = self.buckets.get(address)
        if bucket is None:
            bucket = self.buckets[address] = TokenBucket(self.share, self.share * 2)
        return bucket

    def prune(self, live: set[str]) -> None:
        self.buckets = {a: b for a, b in self.buckets.items() if a in live}
