"""The daemon's wire: JSON-RPC 2.0 error codes, parameter checks, and the peer check.

Shared by the daemon (:mod:`.daemon`) and the commands' client (:mod:`.rpc`),
so that neither needs the other to agree on what a code means.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

RUN_DIR = "run"
SOCKET_NAME = "daemon.sock"

# JSON-RPC 2.0's own codes, and ours (docs/client.md lists them).
PARSE_ERROR, INVALID_REQUEST, NO_METHOD, BAD_PARAMS = -32700, -32600, -32601, -32602
INTERNAL = -32603
REFUSED, RELAY, OFFLINE, BUSY = 1, 2, 3, 4


def socket_path(home: Path) -> Path:
    return home / RUN_DIR / SOCKET_NAME


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data or {}


def param(params: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    value = params.get(name, default)
    if value is ...:
        raise RpcError(BAD_PARAMS, f"missing parameter {name!r}")
    if value is None and default is None:
        return None
    if value is default:
        return value
    if not isinstance(value, kind):
        raise RpcError(BAD_PARAMS, f"parameter {name!r} must be {kind.__name__}")
    if isinstance(value, bool) and kind is int:
        raise RpcError(BAD_PARAMS, f"parameter {name!r} must be int")
    return value


def error(rid: Any, code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if data:
        body["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": body}


def same_user(writer: Any) -> bool:
    """Whether the process at the other end of a Unix socket runs as us."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())
