"""The client skips loading the trust store only where no TLS is spoken, and what
it uses instead trusts nothing (client/relay.py, ``_tls_for``)."""

from __future__ import annotations

import ssl

import pytest

from backchannel.client.relay import RelayHttp, _tls_for


def test_a_plain_http_relay_gets_a_context_that_trusts_nothing() -> None:
    ctx = _tls_for("http://127.0.0.1:8080", None)
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.get_ca_certs() == []
    # A SOCKS proxy (Tor) speaks no TLS either.
    assert isinstance(_tls_for("http://abc.onion", "socks5://127.0.0.1:9050"), ssl.SSLContext)


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("https://relay.example.org", None),
        ("https://relay.example.org", "socks5://127.0.0.1:9050"),
        ("http://relay.example.org", "https://proxy.example.org:3128"),
        ("http://relay.example.org", "HTTPS://proxy.example.org:3128"),
    ],
)
def test_wherever_tls_is_spoken_the_trust_store_verifies(url: str, proxy: str | None) -> None:
    assert _tls_for(url, proxy) is True


async def test_an_http_client_refuses_any_certificate() -> None:
    http = RelayHttp("http://127.0.0.1:9")
    try:
        # What httpx would verify a TLS connection with, were one ever made.
        pool = http._http._transport._pool  # type: ignore[attr-defined]
        ctx = pool._ssl_context
        assert ctx.get_ca_certs() == []
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    finally:
        await http.aclose()
