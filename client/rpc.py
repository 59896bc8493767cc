"""The daemon's other end, for the commands: a blocking JSON-RPC client on its socket.

A command that finds a daemon running for its profile asks it (no passphrase,
no connection of its own); one that finds none opens the profile itself.
A socket file nobody answers on (a daemon that was killed) counts as none.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ClientError
from .relay import RelayError
from .rpcwire import BUSY, OFFLINE, RELAY, socket_path

#: Longest answer line read back (a `read` of a large room is the largest).
MAX_ANSWER = 64 << 20


class DaemonClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._ids = itertools.count(1)

    @classmethod
    def connect(cls, home: Path, timeout: float = 300.0) -> DaemonClient | None:
        path = socket_path(home)
        if not path.exists():
            return None
        if not private_dir(path.parent):
            # Someone else made (or can write to) the directory: what listens there
            # would be handed our messages in clear.
            raise ClientError(
                f"refusing the daemon socket in {path.parent}: not a private directory of yours",
                hint="remove it; the daemon makes it again, 0700",
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            return None
        if peer_uid(sock) != os.getuid():
            sock.close()
            raise ClientError("the process on the daemon socket is not yours; not talking to it")
        return cls(sock)

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def _line(self) -> dict[str, Any]:
        raw = self._file.readline(MAX_ANSWER)
        if not raw:
            raise RelayError("disconnected", "the daemon closed the connection")
        answer = json.loads(raw)
        if not isinstance(answer, dict):
            raise RelayError("protocol", "the daemon sent something unreadable")
        return answer

    def call(self, method: str, **params: Any) -> Any:
        rid = next(self._ids)
        request = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            answer = self._line()
            if answer.get("id") == rid:
                break
        error = answer.get("error")
        if error is not None:
            raise _as_exception(error)
        return answer.get("result")

    def notifications(self) -> Iterator[dict[str, Any]]:
        """Notifications after a ``subscribe``, until the daemon drops us."""
        while True:
            answer = self._line()
            if answer.get("method") == "line":
                params = answer.get("params")
                if isinstance(params, dict):
                    yield params
            elif answer.get("method") == "dropped":
                raise RelayError("disconnected", "the daemon stopped following for us")


def private_dir(path: Path) -> bool:
    """Ours, a real directory (not a link), and nobody else may enter or write it."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and stat.S_IMODE(info.st_mode) & 0o077 == 0
    )


def peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[1])


#: What :func:`ask` returns when no daemon runs for the profile.
NOT_RUNNING = object()


def ask(home: Path, method: str, **params: Any) -> Any:
    """The daemon's answer to one request, or :data:`NOT_RUNNING`."""
    found = DaemonClient.connect(home)
    if found is None:
        return NOT_RUNNING
    with found:
        return found.call(method, **params)


def _as_exception(error: dict[str, Any]) -> Exception:
    code, message = error.get("code"), str(error.get("message"))
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    if code == RELAY:
        return RelayError(str(data.get("relay_code", "refused")), message)
    if code == OFFLINE:
        return RelayError("unreachable", message)
    if code == BUSY:
        return RelayError("busy", message)
    return ClientError(message, hint=data.get("hint"))
