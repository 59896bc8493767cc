"""Relay settings: environment (``BACKCHANNEL_RELAY_*``), an optional TOML file, defaults.

Every limit the relay enforces lives here, so that each one is configurable and
documented in one place (docs/operators.md is generated from this class).
Settings are passed into :func:`backchannel.server.app.create_app`; nothing
reads them at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import (
    BaseSettings,
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
        30.0, gt=0, description="Time a new connection has to authenticate."
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
