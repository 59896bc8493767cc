"""``backchannel-relay``: serve, migrate, purge, admin stats, admin token create.

Settings come from (highest first) the command-line options, the environment
(``BACKCHANNEL_RELAY_*``) and a TOML file (``--config`` or
``BACKCHANNEL_RELAY_CONFIG``). Only pipeable data goes to stdout; logs go to
stderr as JSON lines.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette

from .admin import create_admin_app
from .app import create_app
from .config import CONFIG_ENV, Settings
from .logging import configure, get_logger
from .migrate import SchemaNotCurrent, ensure_schema, head_revision, schema_state, upgrade
from .rest.httpproto import bounded_http_protocol
from .rest.wsproto import bounded_protocol
from .storage import Store, make_engine, unavailable

log = get_logger("backchannel.relay")

app = typer.Typer(
    help="The backchannel relay: stores and forwards ciphertext for backchannel rooms.",
    no_args_is_help=True,
    add_completion=False,
)
admin = typer.Typer(help="Operator commands.", no_args_is_help=True)
token = typer.Typer(help="Room-creation tokens.", no_args_is_help=True)
app.add_typer(admin, name="admin")
admin.add_typer(token, name="token")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file (same keys as the settings, lower case)."),
]
DatabaseOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="SQLAlchemy async URL; default: SQLite in --data-dir."),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Directory for the SQLite database.")
]


def _fail(message: str, hint: str | None = None) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(2)


def load_settings(config: Path | None, **overrides: Any) -> Settings:
    if config is not None:
        if not config.is_file():
            raise _fail(f"config file {config} does not exist")
        os.environ[CONFIG_ENV] = str(config)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise _fail(f"invalid setting {where}: {first.get('msg')}") from None


def tcp_connection_limit(settings: Settings) -> int:
    if settings.max_tcp_connections is not None:
        return settings.max_tcp_connections
    return settings.max_connections + 1024


def _http_layer(settings: Settings) -> dict[str, Any]:
    limit = tcp_connection_limit(settings)
    return {
        "http": bounded_http_protocol(settings.header_timeout_seconds, limit),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": limit,
        "backlog": settings.listen_backlog,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise, so any
        # local process (or a same-host proxy that passes the header through) could
        # choose the address the per-address limits count.
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": list(settings.trusted_proxies),
    }


def uvicorn_config(asgi: Any, settings: Settings) -> uvicorn.Config:
    """How the relay runs under uvicorn (also used by the tests)."""
    return uvicorn.Config(
        asgi,
        log_config=None,
        access_log=False,  # it would log client addresses
        lifespan="on",
        **_http_layer(settings),
        # Frames up to twice the limit reach the relay, which answers
        # `frame_too_large`; bigger ones are cut off by the WebSocket layer (1009).
        ws_max_size=2 * settings.max_frame_bytes,
        ws=bounded_protocol(settings.max_fragments, wire=isinstance(asgi, Starlette)),
        # Ciphertext does not compress; per-connection zlib state would cost about
        # 40 KiB of memory per connection and CPU on every frame for nothing.
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=5,
    )


def admin_uvicorn_config(asgi: Any, settings: Settings) -> uvicorn.Config:
    """The operator listener: the same HTTP bounds, no lifespan (the public app owns the
    store and the metrics), no WebSocket."""
    return uvicorn.Config(
        asgi,
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=5,
        **_http_layer(settings),
    )


async def serve_together(servers: list[tuple[uvicorn.Server, socket.socket]]) -> None:
    """Run uvicorn servers on one loop; when one stops (a signal, a failed start), stop
    them all, so the relay never runs without its operator listener or the reverse."""

    async def one(server: uvicorn.Server, sock: socket.socket) -> Any:
        # uvicorn answers a failed start with SystemExit; raised inside a task it would
        # leave the loop at once, with the other server still running.
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:
            return exc.code
        return None

    tasks = [asyncio.create_task(one(server, sock)) for server, sock in servers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server, _ in servers:
            server.should_exit = True
        codes = await asyncio.gather(*tasks)
    failed = [code for code in codes if code is not None]
    if failed:
        raise SystemExit(failed[0])


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force.

    Every connection is a file descriptor, and service managers start processes with a
    soft limit of 1024 (systemd) while allowing far more: at 1024, about a thousand
    half-open connections would lock everyone out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite soft limit (fs.nr_open caps it); 2**20 is that cap's default.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on
    # sockets whose protocol says TCP, and with Nagle on every response written
    # in two parts (head, then body) waited ~40 ms for the peer's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8470; 0 picks one).")] = None,
    admin_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the loopback operator listener, /metrics and the API docs "
            "(default 9470; 0 picks one)."
        ),
    ] = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate", help="Apply pending schema migrations first (setting auto_migrate)."
        ),
    ] = False,
) -> None:
    """Run the relay.

    Example: backchannel-relay serve            (127.0.0.1:8470, SQLite in the data dir)

    A database behind this relay's schema is refused (run `backchannel-relay migrate`);
    an empty one is initialised.
    """
    settings = load_settings(
        config,
        host=host,
        port=port,
        admin_port=admin_port,
        database_url=database_url,
        data_dir=data_dir,
        auto_migrate=True if migrate else None,
    )
    configure(settings.log_level)
    asyncio.run(_checked_schema(settings, auto_migrate=settings.auto_migrate))
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        raise _fail(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            "pick another port with --port",
        ) from None
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    admin_sock = None
    if not settings.admin_on_public:
        try:
            admin_sock = bind(settings.admin_host, settings.admin_port)
        except OSError as exc:
            raise _fail(
                f"cannot listen on {settings.admin_host}:{settings.admin_port} "
                f"(the operator listener): {exc.strerror}",
                "pick another port with --admin-port (0 picks a free one)",
            ) from None
    _log_file_limit(raise_file_limit(), settings)

    def started() -> None:
        typer.echo(f"backchannel relay running. Give participants this URL: {settings.origin()}")
        sys.stdout.flush()

    public = create_app(settings, on_started=started)
    servers = [(uvicorn.Server(uvicorn_config(public, settings)), sock)]
    if admin_sock is not None:
        admin_app = create_admin_app(public)
        servers.append((uvicorn.Server(admin_uvicorn_config(admin_app, settings)), admin_sock))
        log.info("relay.operator_listener", port=admin_sock.getsockname()[1])
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_together(servers))


def _loop_factory() -> Any:
    # What uvicorn's own `run` picks with loop="auto" (uvloop comes with uvicorn[standard]).
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _log_file_limit(open_files: int, settings: Settings) -> None:
    connections = tcp_connection_limit(settings)
    log.info("relay.file_limit", open_files=open_files, max_tcp_connections=connections)
    # Past the limit, accept() fails and the relay turns everyone away, members included.
    if open_files < connections + 256:
        log.warning(
            "relay.file_limit_low",
            open_files=open_files,
            max_tcp_connections=connections,
            hint="raise LimitNOFILE (systemd) or lower max_tcp_connections",
        )


def _unreachable(exc: BaseException) -> typer.Exit:
    # The exception text may carry the URL (and a password): name its type only.
    return _fail(
        f"cannot reach the database ({type(exc).__name__})",
        "check --database-url / BACKCHANNEL_RELAY_DATABASE_URL and that the database is up",
    )


async def _checked_schema(settings: Settings, *, auto_migrate: bool) -> None:
    engine = make_engine(settings.resolved_database_url())
    try:
        await ensure_schema(engine, auto_migrate=auto_migrate)
    except SchemaNotCurrent as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:
        if unavailable(exc):
            raise _unreachable(exc) from None
        raise
    finally:
        await engine.dispose()


async def _with_store(settings: Settings, work: Any) -> Any:
    await _checked_schema(settings, auto_migrate=False)
    store = Store(make_engine(settings.resolved_database_url()), batch_window=0, batch_max=1)
    try:
        return await work(store)
    finally:
        await store.engine.dispose()


@app.command("migrate")
def migrate_command(
    database_url: DatabaseOpt = None, data_dir: DataDirOpt = None, config: ConfigOpt = None
) -> None:
    """Bring the database schema up to this relay's version (safe to run again).

    Example: backchannel-relay migrate --database-url postgresql+asyncpg://relay@db/relay
    """
    settings = load_settings(config, database_url=database_url, data_dir=data_dir)
    configure(settings.log_level)

    async def run() -> tuple[str, str]:
        engine = make_engine(settings.resolved_database_url())
        try:
            before = await schema_state(engine)
            if before.status == "ahead":
                raise _fail(
                    before.describe(), "run a relay at least as new as the one that migrated it"
                )
            await upgrade(engine)
            return before.revision or "none", head_revision()
        except typer.Exit:
            raise
        except Exception as exc:
            if unavailable(exc):
                raise _unreachable(exc) from None
            raise
        finally:
            await engine.dispose()

    before, after = asyncio.run(run())
    if before == after:
        typer.echo(f"schema already current ({after})")
    else:
        typer.echo(f"schema migrated: {before} -> {after}")


def _print_counts(settings: Settings, method: str) -> None:
    """Run a store method that returns counts and print them, one ``name: value`` a line."""
    configure(settings.log_level)
    counts = asyncio.run(_with_store(settings, lambda store: getattr(store, method)()))
    for name, value in counts.items():
        typer.echo(f"{name}: {value}")


@app.command()
def purge(
    database_url: DatabaseOpt = None, data_dir: DataDirOpt = None, config: ConfigOpt = None
) -> None:
    """Delete expired ciphertext now and print how much went."""
    _print_counts(load_settings(config, database_url=database_url, data_dir=data_dir), "purge")


@admin.command("stats")
def stats(
    database_url: DatabaseOpt = None, data_dir: DataDirOpt = None, config: ConfigOpt = None
) -> None:
    """Print counts (rooms, messages, mailbox items, bytes); nothing that names a room or key."""
    _print_counts(load_settings(config, database_url=database_url, data_dir=data_dir), "stats")


@token.command("create")
def token_create(
    database_url: DatabaseOpt = None, data_dir: DataDirOpt = None, config: ConfigOpt = None
) -> None:
    """Issue a one-use room-creation token (stored only as a hash) and print it."""
    settings = load_settings(config, database_url=database_url, data_dir=data_dir)
    configure(settings.log_level)
    value = asyncio.run(_with_store(settings, lambda s: s.create_token()))
    typer.echo(value)
    if settings.creation_policy != "token":
        typer.echo(
            "hint: creation_policy is 'open', so tokens are not needed; "
            "set BACKCHANNEL_RELAY_CREATION_POLICY=token to require them",
            err=True,
        )


def main() -> None:
    app()
