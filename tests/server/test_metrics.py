"""``/metrics``: Prometheus text format, numbers that move with traffic, no ids."""

from __future__ import annotations

import os

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import RelayFactory
from .helpers import RelayServer, TestRoom, WSClient, signed_get
from .test_privacy import _spellings


async def metrics_of(relay: RelayServer) -> httpx.Response:
    """``/metrics`` from the operator listener, the only place it is served by default."""
    async with httpx.AsyncClient(base_url=relay.admin_url) as ops:
        return await ops.get("/metrics")


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_traffic_and_name_nothing(relay_factory: RelayFactory) -> None:
    relay = relay_factory()
    async with httpx.AsyncClient(base_url=relay.url) as http:
        before = scrape((await metrics_of(relay)).text)
        assert value(before, "backchannel_relay_connections") == 0
        room = await TestRoom.create(http)
        bob = await room.add_member()
        a = await WSClient.connect(relay, [room.facilitator])
        b = await WSClient.connect(relay, [bob])
        await b.send_frame("sub", room=room.id, after=0)
        await b.expect("synced")
        during = scrape((await metrics_of(relay)).text)
        assert value(during, "backchannel_relay_connections") == 2
        for i in range(5):
            await a.send_msg(room.id, room.facilitator, b"%d" % i + os.urandom(100))
        for _ in range(5):
            await b.expect("msg")
        cid = os.urandom(16)
        await a.send_frame(
            "psend",
            room=room.id,
            from_=room.facilitator.public.sign,
            to=bob.public.sign,
            cid=cid,
            data=b"pw",
        )
        await a.expect_reply("psent", cid)
        await b.expect("pmsg")
        stranger = await TestRoom.create(http)
        await b.send_frame("sub", room=stranger.id, after=0)
        assert (await b.expect("error"))["code"] == "not_authorized"
        r = await signed_get(http, relay, bob, f"/v1/rooms/{stranger.id.hex()}/events")
        assert r.status_code == 403
        await a.close()
        await b.close()
        response = await metrics_of(relay)
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    after = scrape(text)
    assert value(after, "backchannel_relay_messages_in_total", kind="room") == 5
    assert value(after, "backchannel_relay_messages_in_total", kind="pairwise") == 1
    assert value(after, "backchannel_relay_messages_out_total", kind="room") == 5
    assert value(after, "backchannel_relay_messages_out_total", kind="pairwise") == 1
    assert value(after, "backchannel_relay_bytes_in_total") > 5 * 100
    assert value(after, "backchannel_relay_bytes_out_total") > 5 * 100
    assert value(after, "backchannel_relay_fanout_latency_seconds_count") >= 5
    assert value(after, "backchannel_relay_db_batch_size_count") >= 1
    assert value(after, "backchannel_relay_db_batch_size_sum") == 6  # 5 msgs, 1 pmsg
    assert value(after, "backchannel_relay_db_commit_seconds_count") >= 1
    assert value(after, "backchannel_relay_errors_total", code="not_authorized") == 2
    # Counts only: nothing that names a room, a key or an address.
    for secret in (room.id, stranger.id, room.facilitator.public.sign, bob.public.sign):
        for spelling in _spellings(secret):
            assert spelling not in text
    assert "127.0.0.1" not in text
    allowed = {"kind", "code", "direction", "le"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= allowed, sample


async def test_metrics_can_be_turned_off(relay_factory: RelayFactory) -> None:
    relay = relay_factory(metrics_enabled=False)
    assert (await metrics_of(relay)).status_code == 404


def test_the_loop_histogram_exports_what_prometheus_client_would() -> None:
    """The hot path's lock-free histogram (server/metrics.py) against the library's
    own, fed the same values, bucket bounds included."""
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from backchannel.server.metrics import _LATENCY, Metrics

    ours = Metrics()
    registry = CollectorRegistry()
    theirs = Histogram(
        "backchannel_relay_fanout_latency_seconds", "x", buckets=_LATENCY, registry=registry
    )
    values = [*_LATENCY, 0.0, 11.0, *(random.uniform(0, 12) for _ in range(500))]
    for v in values:
        ours.fanout_latency.observe(v)
        theirs.observe(v)

    def samples(text: str) -> dict[str, float]:
        found = scrape(text)
        return {
            k: round(v, 6)
            for k, v in found.items()
            if "fanout_latency" in k[0] and "created" not in k[0]
        }

    assert samples(ours.render().decode()) == samples(generate_latest(registry).decode())
    ours.room_out.inc(3)
    ours.bytes_out.inc(40)
    ours.bytes_out.inc(2)
    again = scrape(ours.render().decode())
    assert value(again, "backchannel_relay_messages_out_total", kind="room") == 3
    assert value(again, "backchannel_relay_bytes_out_total") == 42
    assert value(scrape(ours.render().decode()), "backchannel_relay_bytes_out_total") == 42
