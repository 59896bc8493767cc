"""``--proxy socks5://...``: every REST call and the WebSocket go through the proxy
(the way participants reach a relay over Tor)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.socks import Socks5Proxy
from tests.e2e.test_cli_flow import Person, relay  # noqa: F401 - the relay fixture
from tests.server.helpers import RelayServer


@pytest.fixture
def proxy() -> Iterator[Socks5Proxy]:
    server = Socks5Proxy().start()
    yield server
    server.stop()


def test_everything_goes_through_the_socks5_proxy(
    tmp_path: Path,
    relay: RelayServer,  # noqa: F811
    proxy: Socks5Proxy,
) -> None:
    fac = Person(tmp_path / "fac", relay)
    ann = Person(tmp_path / "ann", relay)
    via = ("--proxy", proxy.url)
    fac.run(*via, "init", "--relay", relay.url, "--name", "F")
    ann.run(*via, "init", "--relay", relay.url, "--name", "A")
    room = fac.out(*via, "room", "create", "over tor")
    ann_room = ann.out(*via, "join", fac.out(*via, "invite", room), "--accept-rules")
    before = len(proxy.destinations)
    fac.run(*via, "send", room, "through the proxy")
    assert len(proxy.destinations) > before  # REST and the WebSocket both used it
    assert "through the proxy" in ann.out(*via, "read", ann_room)
    assert {port for _, port in proxy.destinations} == {relay.port}

    # With the proxy gone, nothing goes direct: a send is sealed and queued for the
    # next connection through the proxy (issue 13's offline sends), and what needs
    # the relay now fails, naming the proxy.
    proxy.stop()
    queued = fac.run(*via, "send", room, "must not leak")
    assert "queued" in queued.stderr
    failed = fac.run(*via, "invite", room, ok=False)
    assert failed.returncode != 0
    assert failed.stderr.startswith("error: ")
    assert "proxy" in failed.stderr
