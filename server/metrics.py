"""Prometheus metrics: counts and timings only, never an id, key or address.

Each app has its own :class:`prometheus_client.CollectorRegistry` (several
relays can live in one process, as in the tests). The only labels are fixed
vocabularies: ``kind`` (``room`` / ``pairwise``) and ``code`` (the relay's
stable error codes), so no label value can carry a room id, a member key or a
client address. ``GET /metrics`` serves the text exposition format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KINDS = ("room", "pairwise")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "backchannel_relay_connections", "Open WebSocket connections.", registry=r
        )
        self.messages_in = Counter(
            "backchannel_relay_messages_in",
            "Messages stored (new sends, not retries).",
            ["kind"],
            registry=r,
        )
        self.messages_out = Counter(
            "backchannel_relay_messages_out",
            "Messages delivered to connections.",
            ["kind"],
            registry=r,
        )
        self.bytes_in = Counter(
            "backchannel_relay_bytes_in", "WebSocket bytes received.", registry=r
        )
        self.bytes_out = Counter("backchannel_relay_bytes_out", "WebSocket bytes sent.", registry=r)
        self.fanout_latency = Histogram(
            "backchannel_relay_fanout_latency_seconds",
            "From a commit being known to this instance (local commit or Redis notification) "
            "to the message frame written to a subscriber.",
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "backchannel_relay_db_batch_size",
            "Writes per group-commit transaction.",
            buckets=_SIZES,
            registry=r,
        )
        self.commit_latency = Histogram(
            "backchannel_relay_db_commit_seconds",
            "Duration of one group-commit transaction.",
            buckets=_LATENCY,
            registry=r,
        )
        self.errors = Counter(
            "backchannel_relay_errors", "Error answers by stable code.", ["code"], registry=r
        )
        self.notifications = Counter(
            "backchannel_relay_fanout_notifications",
            "Redis fan-out notifications by direction (published, received, dropped).",
            ["direction"],
            registry=r,
        )
        for kind in KINDS:
            self.messages_in.labels(kind)
            self.messages_out.labels(kind)
        # The hot path's children, looked up once.
        self.room_out = self.messages_out.labels("room")

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.commit_latency.observe(seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
