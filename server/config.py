"""Relay settings: environment (``BACKCHANNEL_RELAY_*``), an optional TOML file, defaults.

Every limit the relay enforces lives here, so that each one is configurable and
documented in one place (docs/operators.md is generated from this class).
Settings are passed into :func:`backchannel.server.app.create_app`; nothing
reads them at import time.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "BACKCHANNEL_RELAY_CONFIG"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("backchannel-relay", appauthor=False))


class Settings(BaseSettings):
    """The relay's configuration. Field descriptions are the operator documentation."""

    model_config = SettingsConfigDict(env_prefix="BACKCHANNEL_RELAY_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind. Loopback by default.")
    port: int = Field(8470, ge=0, le=65535, description="TCP port to bind (0 picks a free one).")
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for the embedded SQLite database.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL. Unset: SQLite (WAL) in data_dir/relay.db.",
    )
    public_url: str | None = Field(
        None,
        description=(
            "The URL participants use to reach this relay (behind a proxy: the proxy's URL). "
            "Authentication signatures are bound to its origin. Unset: http://HOST:PORT."
        ),
    )
    redis_url: str | None = Field(
        None,
        description=(
            "Redis URL (redis://host:6379/0) for fan-out between several relay instances "
            "sharing one PostgreSQL database. Unset: a single instance, no Redis."
        ),
    )
    redis_channel: str = Field(
        "backchannel:relay:v1",
        min_length=1,
        description="Redis pub/sub channel; instances of one deployment must agree on it.",
    )
    auto_migrate: bool = Field(
        False,
        description=(
            "Apply pending schema migrations at start-up instead of refusing to start. "
            "(An empty database is always initialised.)"
        ),
    )
    metrics_enabled: bool = Field(
        True,
        description="Serve Prometheus metrics (counts only) at /metrics.",
    )
    creation_policy: Literal["open", "token"] = Field(
        "open", description="Who may create rooms: anyone, or holders of an operator token."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description=(
            "Least severe log level written (JSON lines on stderr; never addresses, keys, "
            "room ids or payloads)."
        ),
    )

    # --- limits ---------------------------------------------------------------
    max_frame_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest WebSocket frame accepted."
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=4096, description="Largest REST request body accepted (prekey uploads)."
    )
    max_message_bytes: int = Field(
        128 * 1024, ge=512, description="Largest room or pairwise message ciphertext."
    )
    max_event_bytes: int = Field(
        1024,
        ge=512,
        description="Largest room log event (never above the protocol's own bound, 1024).",
    )
    max_log_events: int = Field(10_000, ge=2, description="Longest room log.")
    max_prekeys_per_member: int = Field(
        200, ge=3, description="Most unclaimed prekeys stored for one member key."
    )
    max_mailbox_depth: int = Field(
        1000, ge=1, description="Most unacknowledged pairwise messages for one member key."
    )
    max_subscriptions: int = Field(
        64, ge=1, description="Most room subscriptions on one connection."
    )
    max_keys_per_connection: int = Field(
        64, ge=1, description="Most member keys one connection may authenticate."
    )
    max_connections: int = Field(
        10_000, ge=1, description="Most simultaneous WebSocket connections per process."
    )
    max_connections_per_address: int = Field(
        64,
        ge=1,
        description=(
            "Most simultaneous connections from one client address. Addresses are "
            "held in memory only while connected and never logged or stored."
        ),
    )
    rate_messages_per_second: float = Field(
        20.0, gt=0, description="Sustained sends (room + pairwise) per connection."
    )
    rate_burst: int = Field(40, ge=1, description="Burst allowance for the send rate.")
    send_queue_depth: int = Field(
        1000,
        ge=10,
        description="Outgoing frames buffered per connection before it is dropped as too slow.",
    )
    catch_up_page: int = Field(200, ge=1, description="Messages read per catch-up query.")
    catch_up_page_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description=(
            "Most ciphertext bytes read per catch-up query (a page waits in memory for "
            "a reader that may be slow)."
        ),
    )

    # --- connections and frames ---------------------------------------------------
    max_unsettled_connections: int = Field(
        1024,
        ge=1,
        description=(
            "Most simultaneous connections that do not (yet) hold a subscription a "
            "member key authorised: unauthenticated ones, and ones authenticated by keys "
            "that are members of nothing they subscribed to."
        ),
    )
    max_unsettled_per_address: int = Field(
        16, ge=1, description="The same, from one client address."
    )
    setup_window_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "How long a connection may go without an active subscription as a current "
            "member before it is closed (`not_a_member`); only members hold long-lived "
            "slots."
        ),
    )
    frame_rate_per_second: float = Field(
        100.0, gt=0, description="Sustained frames of any kind per connection."
    )
    frame_burst: int = Field(400, ge=1, description="Burst allowance for the frame rate.")
    member_cpu_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description=(
            "Share of the event loop's time one member connection may spend decoding its "
            "frames; past it the relay reads that connection more slowly."
        ),
    )
    stranger_cpu_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description=(
            "The same for all connections from one address that hold no member "
            "subscription, together."
        ),
    )
    key_messages_per_second: float = Field(
        20.0,
        gt=0,
        description="Sustained sends per member key, over all the connections it holds.",
    )
    key_burst: int = Field(40, ge=1, description="Burst allowance for the per-key send rate.")
    max_inflight_writes: int = Field(
        64,
        ge=1,
        description="Sends and acks one connection may have waiting for the database (`busy`).",
    )
    write_queue_depth: int = Field(
        4096,
        ge=16,
        description=(
            "Writes waiting for the group commit, over all connections; past it a send "
            "is answered `busy` and the client retries later."
        ),
    )
    max_pending_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description=(
            "Bytes queued for one connection but not yet taken by its socket; a "
            "connection past it is dropped as too slow."
        ),
    )
    slow_reader_seconds: float = Field(
        15.0,
        gt=0,
        description="A connection whose socket takes no data for this long is dropped.",
    )
    max_fragments: int = Field(
        64, ge=1, description="Most WebSocket frames (fragments) in one message."
    )

    # --- HTTP layer ------------------------------------------------------------------
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description=(
            "Largest request line plus header block. A request past it is answered 400 "
            "and its connection closed, before more of it is buffered."
        ),
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description=(
            "Time a connection has to send a request's line and headers, counted from "
            "when it opened or got its previous response; then it is closed."
        ),
    )
    max_tcp_connections: int | None = Field(
        None,
        ge=1,
        description=(
            "Most open TCP connections per process: WebSocket, REST and half-sent ones. "
            "At it, REST requests are answered 503; past it, new connections are closed "
            "as they arrive. Each takes a file descriptor (systemd: LimitNOFILE). Unset: "
            "max_connections + 1024, so that WebSocket clients meet max_connections (a "
            "typed too_many_connections) first."
        ),
    )
    listen_backlog: int = Field(
        2048,
        ge=1,
        description=(
            "Connections the kernel queues before the relay accepts them (capped by "
            "net.core.somaxconn)."
        ),
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        [],
        description=(
            "Addresses or networks (CIDR) of the reverse proxies whose X-Forwarded-For "
            "and X-Forwarded-Proto the relay believes; comma-separated in the environment. "
            "Empty: none, so every connection counts as its peer address."
        ),
    )
    admin_host: str = Field(
        "127.0.0.1",
        description=(
            "Address of the operator listener: /metrics, /docs, /redoc and /openapi.json "
            "are served there, not on the public port. Keep it on loopback or a private "
            "network."
        ),
    )
    admin_port: int = Field(
        9470, ge=0, le=65535, description="Port of the operator listener (0 picks a free one)."
    )
    admin_on_public: bool = Field(
        False,
        description=(
            "Serve /metrics and the API docs on the public port instead, with no operator "
            "listener: anyone who reaches the relay reads them."
        ),
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: list[str]) -> list[str]:
        # uvicorn takes anything it cannot parse as a literal host name and never says
        # so: a typo would silently trust nobody, or "*" everybody.
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value

    # --- quotas and storage -------------------------------------------------------
    # Rates are `limits` strings ("N/second", "N/minute", "N/hour", "N/day"), each a
    # moving window that allows a burst of N. Keys (addresses, member keys, room ids)
    # are hashed in memory only, never stored or logged.
    rooms_per_address: str = Field(
        "20/hour",
        description=(
            "Rooms one client address may create per window under the `open` creation "
            "policy (token holders are not limited). Only rooms actually created count."
        ),
    )
    max_room_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description=(
            "Most ciphertext bytes a room's stored messages may hold; past it a send is "
            "refused `quota_exceeded` until retention deletes older messages."
        ),
    )
    max_mailbox_per_sender: int = Field(
        200,
        ge=1,
        description=(
            "Most unacknowledged pairwise messages one sender may have in one recipient's "
            "mailbox (its share of `max_mailbox_depth`), so no one co-member can fill it."
        ),
    )
    rate_prekey_claims: str = Field(
        "1000/hour",
        description="Prekey bundles one member key may claim per window (a whole room's worth).",
    )
    rate_prekey_claims_per_target: str = Field(
        "10/hour",
        description=(
            "Prekey bundles one member key may claim for the same target per window, so "
            "one co-member cannot use up another's one-time prekeys."
        ),
    )
    rate_log_appends: str = Field(
        "120/minute",
        description=(
            "Log events appended to one room per window (an invite and a join per new "
            "member: the default seats 60 at once); past it `429 rate_limited`. Only "
            "accepted events count, so no stranger can spend a room's budget."
        ),
    )
    room_state_cache_entries: int = Field(
        100_000,
        ge=0,
        description=(
            "Members, invites and departed keys of validated room states kept decoded in "
            "memory (about 350 bytes each: the default holds about 35 MB), so an append "
            "is checked without decoding the room's state; 0 turns the cache off."
        ),
    )
    sqlite_busy_timeout_ms: int = Field(
        500,
        ge=0,
        description=(
            "How long an SQLite write waits for a lock another process holds before it "
            "is answered `storage_unavailable`. Keep it short: writes queue behind it."
        ),
    )

    @field_validator(
        "rooms_per_address",
        "rate_prekey_claims",
        "rate_prekey_claims_per_target",
        "rate_log_appends",
    )
    @classmethod
    def _is_a_rate(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate such as '20/hour'") from None
        return value

    # --- durability and housekeeping ---------------------------------------------
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        description=(
            "Group commit: how long a write waits for company. 0 (the default) commits at "
            "once and batches whatever arrived while the previous commit was on disk."
        ),
    )
    batch_max: int = Field(256, ge=1, description="Group commit: most writes per transaction.")
    catch_up_interval_seconds: float = Field(
        5.0,
        gt=0,
        description=(
            "How often each instance compares the database with what its connections have "
            "seen, so a lost fan-out notification delays a message by at most this long."
        ),
    )
    purge_interval_seconds: float = Field(
        300.0, gt=0, description="How often expired ciphertext is deleted."
    )
    auth_timeout_seconds: float = Field(
        10.0, gt=0, description="Time a new connection has to authenticate."
    )
    clock_skew_seconds: int = Field(
        300, ge=0, description="Tolerated difference between a client's clock and ours."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then the TOML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_ENV)
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'relay.db'}"

    def origin(self) -> str:
        """The origin that authentication signatures are bound to."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
