"""Matrix Synapse as an optional comparison for the fan-out scenario of ``bench/run.py``.

Synapse is not started here: the operator runs one on loopback (see
``bench/SYNAPSE.md``) and passes its URL and its ``registration_shared_secret``.
``Workers`` answers the same ``command("run", ...)`` as ``bench.run.Workers``,
so ``bench/run.py`` measures Synapse with the very code (``_fanout_run``,
``_whole_run_rate``) it uses for the relay and the bare baseline.

Over the client-server API: N+1 accounts (shared-secret registration, or a
login when the account exists from an earlier run), one private room the
sender makes and every receiver joins. In a run the sender PUTs
``m.room.message`` events (body: the run number and the sender's
``time.monotonic()``, padded to the payload size in characters), at most the
flow window ahead of what its monitor receiver has seen; each receiver
long-polls ``/sync`` with a filter to the room's timeline and the sender's
messages, carrying its ``since`` token. Receivers stay in separate forked
processes, grouped as the relay's are (the sender and its monitor in one,
the other receivers in two). Every wait is bounded and every process is
stopped by ``close``, which also leaves the room and logs the accounts out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import multiprocessing as mp
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
REGISTER = "/_synapse/admin/v1/register"
API = "/_matrix/client/v3"
USER_PREFIX = "backchannel_bench_"
#: Long-poll length: short, so a receiver that already has everything is not
#: held long after the sender has said how many it sent.
SYNC_TIMEOUT_MS = 500
#: Far above what a run leaves unread (the flow window), so an incremental sync
#: is never cut short ("limited"), which would hide events from the count.
TIMELINE_LIMIT = 5000
HTTP_TIMEOUT = 30.0
#: Bound on the sender's drain and on a receiver's wait for the last events.
DRAIN_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0
#: Connections per load process: a full flow window of PUTs plus the long polls.
POOL = 128


def check_url(url: str) -> str | None:
    """Why ``url`` may not be benchmarked, or None: only a Synapse on loopback."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        return f"--synapse-url {url!r} is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or (parts.hostname or "") not in LOOPBACK:
        return f"--synapse-url must be http(s) on 127.0.0.1, ::1 or localhost, not {url!r}"
    return None


@dataclass(frozen=True)
class Account:
    user_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _client(url: str, timeout: float = HTTP_TIMEOUT) -> httpx.Client:
    # trust_env off: an HTTP(S)_PROXY in the environment must not route loopback
    # traffic elsewhere; redirects are not followed for the same reason.
    return httpx.Client(base_url=url, timeout=timeout, trust_env=False, follow_redirects=False)


def _fail(what: str, resp: httpx.Response) -> RuntimeError:
    try:
        body = resp.json()
        detail = f"{body.get('errcode')}: {body.get('error')}"
    except ValueError:
        detail = resp.text[:200]
    return RuntimeError(f"Synapse {what}: HTTP {resp.status_code} {detail}")


def _ok(what: str, resp: httpx.Response) -> dict[str, Any]:
    if resp.status_code != 200:
        raise _fail(what, resp)
    return resp.json()  # type: ignore[no-any-return]


def _password(secret: str, name: str) -> str:
    # Derived, not stored: a later run with the same secret can log in again.
    return hmac.new(secret.encode(), f"bench password {name}".encode(), hashlib.sha256).hexdigest()


def _account(http: httpx.Client, secret: str, name: str) -> Account:
    """Register ``name`` with the shared secret, or log in if it already exists."""
    password = _password(secret, name)
    nonce = _ok("registration nonce", http.get(REGISTER))["nonce"]
    signed = b"\0".join([nonce.encode(), name.encode(), password.encode(), b"notadmin"])
    mac = hmac.new(secret.encode(), signed, hashlib.sha1).hexdigest()
    body = {"nonce": nonce, "username": name, "password": password, "admin": False, "mac": mac}
    resp = http.post(REGISTER, json=body)
    if resp.status_code == 200:
        got = resp.json()
        return Account(got["user_id"], got["access_token"])
    if resp.status_code == 403:
        raise _fail("registration (is --synapse-secret its registration_shared_secret?)", resp)
    if resp.status_code != 400 or resp.json().get("errcode") != "M_USER_IN_USE":
        raise _fail(f"registration of {name}", resp)
    login = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": name},
        "password": password,
        "initial_device_display_name": "backchannel bench",
    }
    got = _ok(f"login of {name}", http.post(f"{API}/login", json=login))
    return Account(got["user_id"], got["access_token"])


def _room_path(room_id: str) -> str:
    return f"{API}/rooms/{quote(room_id, safe='')}"


def probe(url: str, secret: str) -> None:
    """Fail fast, before the relay's runs, if Synapse is down or the secret is wrong."""
    with _client(url, 10.0) as http:
        _ok("versions (is it running?)", http.get("/_matrix/client/versions"))
        account = _account(http, secret, f"{USER_PREFIX}0")
        with contextlib.suppress(httpx.HTTPError):
            http.post(f"{API}/logout", headers=account.auth)


def setup(url: str, secret: str, members: int) -> tuple[str, list[Account]]:
    """``members`` accounts in one new private room; the first made it and sends."""
    with _client(url) as http:
        accounts = [_account(http, secret, f"{USER_PREFIX}{i}") for i in range(members)]
        creator, *others = accounts
        made = {
            "preset": "private_chat",
            "name": "backchannel bench fan-out",
            "invite": [a.user_id for a in others],
        }
        resp = http.post(f"{API}/createRoom", json=made, headers=creator.auth)
        room_id = _ok("createRoom", resp)["room_id"]
        for a in others:
            resp = http.post(f"{_room_path(room_id)}/join", json={}, headers=a.auth)
            _ok(f"join of {a.user_id}", resp)
    return room_id, accounts


def teardown(url: str, room_id: str | None, accounts: list[Account]) -> None:
    """Leave and forget the room and log out, so repeated runs do not pile up in the
    accounts' syncs and devices. Best effort: the figures are already taken."""
    with _client(url, 10.0) as http:
        for a in accounts:
            steps = ["leave", "forget"] if room_id else []
            for step in steps:
                with contextlib.suppress(httpx.HTTPError):
                    http.post(f"{_room_path(room_id or '')}/{step}", json={}, headers=a.auth)
            with contextlib.suppress(httpx.HTTPError):
                http.post(f"{API}/logout", headers=a.auth)


# --- load processes ---------------------------------------------------------------------------


def _sync_filter(room_id: str, sender: str) -> str:
    nothing = {"not_types": ["*"]}
    return json.dumps(
        {
            "presence": nothing,
            "account_data": nothing,
            "room": {
                "rooms": [room_id],
                "timeline": {
                    "limit": TIMELINE_LIMIT,
                    "types": ["m.room.message"],
                    "senders": [sender],
                },
                "state": nothing,
                "ephemeral": nothing,
                "account_data": nothing,
            },
        },
        separators=(",", ":"),
    )


@dataclass
class Reader:
    """One receiver's sync position and what it counted in the current run."""

    account: Account
    since: str = ""
    rx_run: int = 0
    last_rx: float = 0.0
    latencies: array = field(default_factory=lambda: array("d"))
    errors: dict[str, int] = field(default_factory=dict)
    seen: asyncio.Event = field(default_factory=asyncio.Event)


def _count(errors: dict[str, int], key: str, n: int = 1) -> None:
    errors[key] = errors.get(key, 0) + n


@dataclass
class Load:
    """What a load process shares between its sender and its readers."""

    http: httpx.AsyncClient
    room_id: str
    sender_id: str
    filter: str
    sent_total: Any  # multiprocessing Value: the run's delivered count, -1 until known

    async def sync(self, r: Reader, timeout_ms: int) -> tuple[float, list[dict[str, Any]]]:
        params = {"timeout": str(timeout_ms), "filter": self.filter, "set_presence": "offline"}
        if r.since:
            params["since"] = r.since
        resp = await self.http.get(f"{API}/sync", params=params, headers=r.account.auth)
        now = time.monotonic()
        if resp.status_code != 200:
            _count(r.errors, f"sync {resp.status_code}")
            await asyncio.sleep(0.05)  # not a hot loop against a refusing server
            return now, []
        body = resp.json()
        r.since = body["next_batch"]
        room = body.get("rooms", {}).get("join", {}).get(self.room_id, {})
        timeline = room.get("timeline", {})
        if timeline.get("limited") and timeout_ms:
            _count(r.errors, "sync limited")
        return now, timeline.get("events", [])

    async def receive(self, r: Reader, run: int, stop: float, latency: bool) -> None:
        deadline = stop + DRAIN_TIMEOUT
        while True:
            total = self.sent_total.value
            if total >= 0 and r.rx_run >= total:
                return
            if time.monotonic() >= deadline:
                _count(r.errors, "missing", max(0, total - r.rx_run) if total >= 0 else 1)
                return
            try:
                now, events = await self.sync(r, SYNC_TIMEOUT_MS)
            except httpx.HTTPError as exc:
                _count(r.errors, f"sync {type(exc).__name__}")
                continue
            for ev in events:
                if ev.get("sender") != self.sender_id:
                    continue
                mark, sent_at, _ = str(ev.get("content", {}).get("body", "")).split(" ", 2)
                if int(mark) != run:
                    _count(r.errors, "earlier run")  # left over from a run that timed out
                    continue
                r.rx_run += 1
                r.last_rx = now
                if latency:
                    r.latencies.append(now - float(sent_at))
            if events:
                r.seen.set()

    async def send(self, sender: Account, monitor: Reader, run: int, a: dict[str, Any]) -> int:
        """Send until ``stop`` or ``count``, at most ``flow_window`` ahead of the monitor."""
        size, rate, window = a["size"], a.get("rate"), a["flow_window"]
        pad = "x" * size
        path = f"{_room_path(self.room_id)}/send/m.room.message"
        errors = monitor.errors
        failed = 0
        tag = f"{time.time_ns():x}.{run}"  # transaction ids are unique per token

        async def put(i: int) -> None:
            nonlocal failed
            body = f"{run} {time.monotonic():.6f} {pad}"[:size]
            try:
                resp = await self.http.put(
                    f"{path}/{tag}.{i}",
                    json={"msgtype": "m.text", "body": body},
                    headers=sender.auth,
                )
                if resp.status_code != 200:
                    failed += 1
                    _count(errors, f"send {resp.status_code}")
            except httpx.HTTPError as exc:
                failed += 1
                _count(errors, f"send {type(exc).__name__}")
            if failed:
                monitor.seen.set()  # a lost message must not hold the window shut

        tasks: set[asyncio.Task[None]] = set()
        await asyncio.sleep(max(0.0, a["start"] - time.monotonic()))
        first = time.monotonic()
        sent = 0
        while sent < a["count"]:
            now = time.monotonic()
            if now >= a["stop"]:
                break
            if sent - failed - monitor.rx_run >= window:
                monitor.seen.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(monitor.seen.wait(), min(1.0, a["stop"] - now))
                continue
            if rate is not None and sent >= int((now - first) * rate) + 1:
                await asyncio.sleep(0.001)
                continue
            task = asyncio.create_task(put(sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            await asyncio.sleep(0)  # let the PUT start, so its send time is its own
        if tasks:
            await asyncio.wait(set(tasks), timeout=DRAIN_TIMEOUT)
        for task in list(tasks):
            task.cancel()
            failed += 1
            _count(errors, "send timeout")
        delivered = sent - failed
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while monitor.rx_run < delivered and time.monotonic() < deadline:
            monitor.seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(monitor.seen.wait(), 0.5)
        self.sent_total.value = delivered  # the other processes' readers stop on it
        return sent


async def _run(
    load: Load, sender: Account | None, readers: list[Reader], a: dict[str, Any]
) -> dict[str, Any]:
    run = a["run"]
    for r in readers:
        r.rx_run, r.last_rx, r.latencies, r.errors = 0, 0.0, array("d"), {}
    jobs = [load.receive(r, run, a["stop"], a.get("latency", False)) for r in readers]
    sent = 0
    if sender is not None:
        sending, *_ = await asyncio.gather(load.send(sender, readers[0], run, a), *jobs)
        sent = sending
    else:
        await asyncio.gather(*jobs)
    lat = array("d")
    errors: dict[str, int] = {}
    for r in readers:
        lat.extend(r.latencies)
        for k, v in r.errors.items():
            _count(errors, k, v)
    return {
        "rx_run": sum(r.rx_run for r in readers),
        "last_rx": max((r.last_rx for r in readers), default=0.0),
        "sent": sent,
        "latencies": lat.tobytes(),
        "errors": errors,
    }


async def _main(
    pipe: Pipe,
    url: str,
    room_id: str,
    sender: Account | None,
    sender_id: str,
    accounts: list[Account],
    sent_total: Any,
) -> None:
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    async with httpx.AsyncClient(
        base_url=url, timeout=HTTP_TIMEOUT, limits=limits, trust_env=False
    ) as http:
        load = Load(http, room_id, sender_id, _sync_filter(room_id, sender_id), sent_total)
        readers = [Reader(a) for a in accounts]
        try:
            # The first sync only takes a position: what came before is not counted.
            await asyncio.wait_for(asyncio.gather(*(load.sync(r, 0) for r in readers)), 60)
            pipe.send(("ready", {"readers": len(readers)}))
            while True:
                cmd, args = await loop.run_in_executor(None, pipe.recv)
                if cmd == "stop":
                    break
                if cmd != "run":
                    raise ValueError(cmd)
                result = await asyncio.wait_for(_run(load, sender, readers, args), RUN_TIMEOUT)
                pipe.send(("ok", result))
        except (EOFError, OSError):
            pass  # the orchestrator went away: stop
        except BaseException as exc:
            with contextlib.suppress(Exception):
                pipe.send(("error", f"{type(exc).__name__}: {exc}"))


def worker(pipe: Pipe, *args: Any) -> None:
    """Process entry point."""
    asyncio.run(_main(pipe, *args))


# --- orchestration ----------------------------------------------------------------------------


class Workers:
    """The Synapse fan-out load: accounts, a room, and ready load processes.

    The same ``command``/``close`` as ``bench.run.Workers``; ``children`` is the
    orchestrator's list of processes to stop on Ctrl-C."""

    def __init__(
        self, url: str, secret: str, receivers: int, children: list[Any], timeout: float = 180
    ) -> None:
        ctx = mp.get_context("fork")
        self.url = url
        self.children = children
        self.sent_total = ctx.Value("q", -1)
        self.run = 0
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        self.room_id: str | None = None
        self.accounts: list[Account] = []
        try:
            self.room_id, self.accounts = setup(url, secret, receivers + 1)
            sender, *others = self.accounts
            rest = others[1:]
            groups = [(sender, others[:1]), (None, rest[0::2]), (None, rest[1::2])]
            for who, mine in groups:
                if not mine:
                    continue
                here, there = ctx.Pipe()
                proc = ctx.Process(
                    target=worker,
                    args=(there, url, self.room_id, who, sender.user_id, mine, self.sent_total),
                    daemon=True,
                )
                proc.start()
                children.append(proc)
                self.pipes.append(here)
                self.procs.append(proc)
            self._collect(timeout, "ready")
        except BaseException:
            self.close()
            raise

    def _collect(self, timeout: float, want: str) -> list[Any]:
        out = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"a Synapse load process did not answer ({want}) in time")
            status, value = pipe.recv()
            if status == "error":
                raise RuntimeError(f"Synapse load process failed: {value}")
            out.append(value)
        return out

    def command(self, cmd: str, args: dict[str, Any], timeout: float = 150) -> list[Any]:
        # Numbered runs: a receiver that gave up on a run's last events will not
        # count them in the next one.
        self.run += 1
        self.sent_total.value = -1
        for pipe in self.pipes:
            pipe.send((cmd, {**args, "run": self.run}))
        return self._collect(timeout, cmd)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                pipe.send(("stop", {}))
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            with contextlib.suppress(ValueError):
                self.children.remove(proc)
        self.procs, self.pipes = [], []
        if self.accounts:
            with contextlib.suppress(Exception):
                teardown(self.url, self.room_id, self.accounts)
            self.accounts = []
