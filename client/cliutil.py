"""The ``backchannel`` command's plumbing: global options, prompts, durations, and the
mapping of every error a user can cause to one ``error:`` line (docs/client.md,
"Output and exit codes").

Kept apart from :mod:`.cli` so that the commands stay readable; :mod:`.main`
(the chat command) uses it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import signal
import socket
import sqlite3
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

import typer

from backchannel.protocol.errors import ProtocolError
from backchannel.protocol.invite import check_relay_url

from .core import Client, ClientError
from .relay import RelayError, RelayHttp
from .render import inert
from .store import NoProfile, ProfileInUse, Store, StoreError

T = TypeVar("T")


class Exit(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    RELAY = 3
    REFUSED = 4
    #: 128 + SIGINT, what shells report for a command stopped by Ctrl-C.
    INTERRUPTED = 130


class Options:
    home: Path
    passphrase_file: Path | None = None
    proxy: str | None = None


OPTS = Options()


def err(message: str, hint: str | None = None, code: Exit = Exit.ERROR) -> NoReturn:
    # Inert: a relay's error detail (or a name in a message) may carry escape sequences.
    typer.echo(f"error: {inert(message)}", err=True)
    if hint:
        typer.echo(f"hint: {inert(hint)}", err=True)
    raise typer.Exit(int(code))


def note(message: str) -> None:
    typer.echo(message, err=True)


def is_tty() -> bool:
    return sys.stdout.isatty()


class ProfileWiped(StoreError):
    """The profile's file went away (``wipe --force``) while this process held it."""

    def __init__(self) -> None:
        super().__init__("this profile was wiped while the command ran")


# --- prompts -------------------------------------------------------------------------------


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C raises at once while a prompt waits, even inside ``asyncio.run``: its
    own SIGINT handler only cancels the task, which a blocking read of the terminal
    would not see until Enter was pressed."""
    try:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread: nothing to restore
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def confirm(question: str) -> bool:
    """Ask yes or no on the terminal; end of input is a no."""
    with interruptible():
        while True:
            sys.stderr.write(f"{question} [y/N]: ")
            sys.stderr.flush()
            answer = sys.stdin.readline()
            if not answer:
                sys.stderr.write("\n")
                return False
            answer = answer.strip().lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("", "n", "no"):
                return False


TRIES = 3


def passphrase(*, confirm: bool = False) -> str:
    if OPTS.passphrase_file is not None:
        try:
            return OPTS.passphrase_file.read_text().rstrip("\n")
        except OSError as exc:
            err(f"cannot read the passphrase file: {exc.strerror}")
    env = os.environ.get("BACKCHANNEL_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        err(
            "no passphrase",
            hint="set BACKCHANNEL_PASSPHRASE or use --passphrase-file when not on a terminal",
        )
    with interruptible():
        if not confirm:
            return getpass.getpass("passphrase: ")
        # A typo at the second prompt is common; it should cost a retype, not the run.
        for _ in range(TRIES):
            first = getpass.getpass("new passphrase: ")
            if not first:
                note("the passphrase must not be empty")
            elif getpass.getpass("again: ") == first:
                return first
            else:
                note("the passphrases differ; try again")
    err("the passphrases differed three times; nothing was created")


# --- arguments -----------------------------------------------------------------------------

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_HELP = "a number and a unit: 90s, 45m, 12h, 7d or 2w"
#: Far beyond any sensible invite or retention, yet every time it adds to stays encodable.
MAX_DURATION = 100 * 365 * 86400


def duration(text: str, what: str = "the duration") -> int:
    """Seconds in ``text``; refused here, before anything reaches a relay."""
    raw = text.strip().lower()
    number, unit = raw[:-1], raw[-1:]
    if unit not in UNITS or not number.isdigit() or not number.isascii():
        err(f"not a duration: {text!r}", hint=f"use {DURATION_HELP}", code=Exit.USAGE)
    seconds = int(number) * UNITS[unit]
    if seconds <= 0:
        err(f"{what} must be longer than zero", hint=f"use {DURATION_HELP}", code=Exit.USAGE)
    if seconds > MAX_DURATION:
        err(f"{what} is too long", hint="at most 100 years", code=Exit.USAGE)
    return seconds


PROXY_SCHEMES = ("socks5", "socks5h", "http", "https")


def check_proxy(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        port, parts = None, None
    if parts is None or parts.scheme not in PROXY_SCHEMES or not parts.hostname or not port:
        err(
            "--proxy is not a usable proxy URL",
            hint="use socks5://HOST:PORT, e.g. socks5://127.0.0.1:9050 for Tor",
            code=Exit.USAGE,
        )
    return url


def relay_url(url: str) -> str:
    """The relay's base URL as stored: the API's ``/v1`` is the client's to add, and a
    copied endpoint URL would otherwise make every request miss (``404``)."""
    url = url.strip().rstrip("/")
    for suffix in ("/v1/limits", "/v1"):
        if url.lower().endswith(suffix):
            note(f"using {url[: -len(suffix)]} (the relay's base URL, without {suffix})")
            return url[: -len(suffix)]
    return url


MAX_NAME = 64


def check_name(name: str) -> str:
    name = name.strip()
    if not name:
        err("your name must not be empty", code=Exit.USAGE)
    if len(name) > MAX_NAME:
        err(f"your name is longer than {MAX_NAME} characters", code=Exit.USAGE)
    return name


def checked_relay(url: str, *, offline: bool = False) -> str:
    """``url`` as it is to be stored, once a relay answered there (``GET /v1/limits``),
    unless ``offline``: nothing is saved that points at no relay."""
    url = relay_url(url)
    try:
        check_relay_url(url)
    except ProtocolError as exc:
        err(f"not a usable relay URL: {exc}", code=Exit.USAGE)
    if offline:
        return url

    async def ask() -> None:
        http = RelayHttp(url, proxy=OPTS.proxy, timeout=15)
        try:
            await http.limits()
        finally:
            await http.aclose()

    with errors():
        asyncio.run(ask())
    return url


# --- errors --------------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [item.__cause__, item.__context__]


def _proxy_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=3):
            return True
    except OSError:
        return False


def _unreachable(exc: RelayError) -> tuple[str, str | None]:
    """Why a relay could not be reached, as far as the client can tell."""
    causes = list(_chain(exc))
    names = " ".join(f"{type(c).__name__} {c}" for c in causes)
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes) or (
        "CERTIFICATE_VERIFY_FAILED" in names
    ):
        return (
            "the relay's TLS certificate could not be verified",
            "check the relay URL; a relay with a self-made certificate is not trusted",
        )
    if any(isinstance(c, ssl.SSLError) for c in causes) or "SSL" in names:
        return (
            "the TLS handshake with the relay failed",
            "is the relay plain http? then its URL starts with http://",
        )
    if OPTS.proxy:
        if not _proxy_answers(OPTS.proxy):
            return (
                "cannot reach the proxy given by --proxy or BACKCHANNEL_PROXY",
                "is Tor (or your SOCKS proxy) running, and is its address right?",
            )
        return (
            "the proxy could not reach the relay",
            "is the relay's URL right, and is the relay up?",
        )
    return str(exc), "is the relay running, and its URL right? `backchannel profile` shows it"


#: The relay's refusals a user can act on, said plainly.
REFUSALS: dict[str, tuple[str, str | None]] = {
    "creation_token_used": (
        "this room-creation token was already used; each token creates one room",
        "ask the relay's operator for a new token",
    ),
    "bad_creation_token": (
        "the relay does not know this room-creation token",
        "check it, or ask the relay's operator for a new one",
    ),
    "creation_token_required": (
        "this relay creates rooms only with a room-creation token",
        "pass --token T, with a token from the relay's operator",
    ),
}


def _relay_error(exc: RelayError) -> NoReturn:
    if exc.code == "unreachable":
        message, hint = _unreachable(exc)
        err(message, hint, Exit.RELAY)
    if exc.code == "disconnected":
        err(str(exc), code=Exit.RELAY)
    if exc.code in REFUSALS:
        message, refusal_hint = REFUSALS[exc.code]
        err(message, refusal_hint, Exit.REFUSED)
    if exc.status == 404 and exc.code in ("http_error", "not_found"):
        err(
            "the relay URL does not lead to a backchannel relay (it answered 404)",
            "use the relay's base URL, e.g. https://relay.example.org, with no path; "
            "change it with `backchannel profile --relay URL`",
            Exit.REFUSED,
        )
    err(str(exc), code=Exit.REFUSED)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Map every error a user can cause to one clear line."""
    try:
        yield
    except ClientError as exc:
        err(str(exc), exc.hint)
    except ProfileInUse as exc:
        from .rpc import DaemonClient  # here: the daemon module is not needed otherwise

        daemon = False
        with contextlib.suppress(Exception):
            found = DaemonClient.connect(OPTS.home, timeout=5)
            if found is not None:
                found.close()
                daemon = True
        if daemon:
            err(
                "the profile is held by `backchannel daemon`",
                "send, read, members and rooms go through it; for anything else "
                "stop it first: `backchannel daemon --stop`",
            )
        err(str(exc), "close the other window, or wait for it to finish")
    except NoProfile:
        err(
            f"no profile here ({OPTS.home})",
            "run `backchannel init --relay URL --name NAME`, or pass --home",
        )
    except ProfileWiped as exc:
        err(str(exc))
    except StoreError as exc:
        err(str(exc), "check --home and the passphrase")
    except sqlite3.DatabaseError:
        # The file changed under us: wiped (``wipe --force``) or damaged meanwhile.
        if not Store.exists(OPTS.home):
            err(str(ProfileWiped()))
        err("the local state became unreadable while the command ran")
    except RelayError as exc:
        _relay_error(exc)
    except ProtocolError as exc:
        err(f"refused: {exc} ({exc.code})", code=Exit.REFUSED)
    except KeyboardInterrupt:
        note("interrupted")
        raise typer.Exit(int(Exit.INTERRUPTED)) from None


async def watch_profile(home: Path, every: float = 0.5) -> NoReturn:
    """Raise :class:`ProfileWiped` once the profile's file is gone, so a long-running
    command stops with one line instead of failing at its next database read."""
    while True:
        await asyncio.sleep(every)
        if not Store.exists(home):
            raise ProfileWiped()


async def until_wiped(work: Awaitable[T], home: Path) -> T:
    """``work``, stopped early if the profile is wiped meanwhile."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch_profile(home))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return await (task if task in done else watcher)
    finally:
        for pending in (task, watcher):
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


def run(work: Callable[[Client], Awaitable[T]]) -> T:
    with errors():
        if not Store.exists(OPTS.home):
            raise NoProfile()  # before asking for a passphrase there is no use for
        store = Store.open(OPTS.home, passphrase())
        client = Client(store, proxy=OPTS.proxy)

        async def go() -> T:
            try:
                return await work(client)
            finally:
                await client.aclose()

        try:
            return asyncio.run(go())
        finally:
            store.close()
