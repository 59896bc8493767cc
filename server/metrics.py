"""Prometheus metrics: counts and timings only, never an id, key or address.

Each app has its own :class:`prometheus_client.CollectorRegistry` (several
relays can live in one process, as in the tests). The only labels are fixed
vocabularies: ``kind`` (``room`` / ``pairwise``) and ``code`` (the relay's
stable error codes), so no label value can carry a room id, a member key or a
client address. ``GET /metrics`` serves the text exposition format.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KINDS = ("room", "pairwise")


class _Tally:
    """A counter for the hot path, added to once per frame and subscriber.

    prometheus_client takes a lock on every increment (its values may be shared
    between threads), and with its method calls that was about 5 % of the relay's
    time under fan-out (py-spy). These are only ever added to on the event loop,
    which also renders the metrics: a plain integer, handed to the real counter
    when the metrics are read."""

    __slots__ = ("counter", "n")

    def __init__(self, counter: Counter) -> None:
        self.counter, self.n = counter, 0

    def inc(self, amount: int = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        if self.n:
            self.counter.inc(self.n)
            self.n = 0


class _LoopHistogram(Collector):
    """A histogram observed on the event loop only (see :class:`_Tally`), exported
    through the registry like prometheus_client's own."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([], buckets, self.total)
        yield family


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
        self._bytes_in = Counter(
            "backchannel_relay_bytes_in", "WebSocket bytes received.", registry=r
        )
        self._bytes_out = Counter(
            "backchannel_relay_bytes_out", "WebSocket bytes sent.", registry=r
        )
        self.fanout_latency = _LoopHistogram(
            "backchannel_relay_fanout_latency_seconds",
            "From a commit being known to this instance (local commit or Redis notification) "
            "to the message frame written to a subscriber.",
            _LATENCY,
        )
        r.register(self.fanout_latency)
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
        # The hot path's, added to per frame and subscriber.
        self.room_out = _Tally(self.messages_out.labels("room"))
        self.bytes_out = _Tally(self._bytes_out)
        self.bytes_in = _Tally(self._bytes_in)
        self._tallies = (self.room_out, self.bytes_out, self.bytes_in)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.commit_latency.observe(seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        for tally in self._tallies:
            tally.flush()
        return generate_latest(self.registry)
