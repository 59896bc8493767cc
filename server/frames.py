"""WebSocket frames: canonical CBOR maps ``{"v": 1, "t": TYPE, ...}``.

Decoding is strict (the protocol package's :func:`decode` and :class:`Reader`):
a frame that is not canonical CBOR, has an unknown type, a missing, extra or
wrongly typed field is a :class:`FrameError` with code ``malformed``; an
unknown version is ``unsupported_version``; a frame over the size limit is
``frame_too_large``. Formats are documented in docs/relay-api.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from backchannel.protocol import errors as perr
from backchannel.protocol.encoding import Reader, Value, decode, encode

FRAME_VERSION: Final = 1
KEY_SIZE: Final = 32
SIG_SIZE: Final = 64
CID_SIZE: Final = 16
NONCE_SIZE: Final = 32
#: Hard cap on list lengths in one frame; the configured limits are lower.
MAX_LIST: Final = 1024
#: Largest sequence number, log position or mailbox id: the databases' 32-bit
#: integer columns (PostgreSQL ``integer``), so no value from a client can
#: overflow a query.
MAX_POSITION: Final = (1 << 31) - 1


class FrameError(Exception):
    """A frame we cannot act on. ``ref`` names the frame (its type or cid)."""

    def __init__(self, code: str, detail: str, ref: str | bytes | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref


@dataclass(frozen=True, slots=True)
class AuthKey:
    key: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    keys: tuple[AuthKey, ...]


@dataclass(frozen=True, slots=True)
class Sub:
    room: bytes
    after: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask again for room messages by sequence number (gap repair)."""

    room: bytes
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsub:
    room: bytes


@dataclass(frozen=True, slots=True)
class Send:
    room: bytes
    sender: bytes
    cid: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class PSend:
    room: bytes
    sender: bytes
    to: bytes
    cid: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientFrame = Auth | Sub | Unsub | Send | PSend | Ack | Ping | Fetch

CLIENT_TYPES: Final = ("auth", "sub", "unsub", "send", "psend", "ack", "ping", "fetch")
#: Sequence numbers one ``fetch`` may name.
MAX_FETCH: Final = 64


def parse_client_frame(data: bytes, *, max_size: int) -> ClientFrame:
    """Decode one client frame or raise :class:`FrameError`."""
    try:
        value = decode(data, max_size=max_size)
    except perr.FieldTooLong as exc:
        raise FrameError("frame_too_large", f"frames are limited to {max_size} bytes") from exc
    except perr.DecodeError as exc:
        raise FrameError("malformed", "not a canonical CBOR frame") from exc
    if not isinstance(value, dict):
        raise FrameError("malformed", "a frame is a map")
    kind = value.get("t")
    ref = kind if isinstance(kind, str) and kind in CLIENT_TYPES else None
    try:
        r = Reader.of(value, "frame")
        r.version(FRAME_VERSION)
        kind = r.text("t", 16)
        if kind not in CLIENT_TYPES:
            raise FrameError("malformed", "unknown frame type")
        frame = _parse(kind, r)
        r.done()
        return frame
    except perr.UnsupportedVersion as exc:
        raise FrameError("unsupported_version", str(exc), ref) from exc
    except perr.DecodeError as exc:
        raise FrameError("malformed", str(exc), ref) from exc


def _parse(kind: str, r: Reader) -> ClientFrame:
    if kind == "auth":
        keys = []
        for item in r.array("keys", MAX_LIST):
            kr = Reader.of(item, "frame.keys")
            keys.append(AuthKey(kr.blob("key", KEY_SIZE), kr.blob("sig", SIG_SIZE)))
            kr.done()
        if not keys:
            raise perr.DecodeError("auth: no keys")
        return Auth(tuple(keys))
    if kind == "sub":
        return Sub(r.blob("room", KEY_SIZE), r.integer("after", 0, MAX_POSITION))
    if kind == "unsub":
        return Unsub(r.blob("room", KEY_SIZE))
    if kind == "fetch":
        room = r.blob("room", KEY_SIZE)
        seqs = r.array("seqs", MAX_FETCH)
        if not seqs or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_POSITION for s in seqs
        ):
            raise perr.DecodeError("fetch: seqs must be 1 to 64 positions")
        return Fetch(room, tuple(sorted(set(seqs))))  # type: ignore[arg-type]
    if kind == "send":
        return Send(
            r.blob("room", KEY_SIZE),
            r.blob("from", KEY_SIZE),
            r.blob("cid", CID_SIZE),
            r.blob("data"),
        )
    if kind == "psend":
        return PSend(
            r.blob("room", KEY_SIZE),
            r.blob("from", KEY_SIZE),
            r.blob("to", KEY_SIZE),
            r.blob("cid", CID_SIZE),
            r.blob("data"),
        )
    if kind == "ack":
        ids = []
        for item in r.array("ids", MAX_LIST):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= MAX_POSITION:
                raise perr.DecodeError("ack: ids must be positive integers")
            ids.append(item)
        return Ack(tuple(ids))
    return Ping()


def server_frame(kind: str, **fields: Value) -> bytes:
    """Encode a server frame; ``fields`` with a value of ``None`` are left out."""
    out: dict[str, Value] = {k: v for k, v in fields.items() if v is not None}
    out["t"] = kind
    out["v"] = FRAME_VERSION
    return encode(out)


_B = struct.Struct(">BB").pack
_H = struct.Struct(">BH").pack
_I = struct.Struct(">BI").pack
_Q = struct.Struct(">BQ").pack
_TINY: Final = {major: [bytes((major | n,)) for n in range(24)] for major in (0, 0x40)}


def _head(major: int, n: int) -> bytes:
    """A CBOR item head (RFC 8949 §3): major type and argument, shortest form."""
    if n < 24:
        return _TINY[major][n]
    if n < 0x100:
        return _B(major | 24, n)
    if n < 0x10000:
        return _H(major | 25, n)
    if n < 0x100000000:
        return _I(major | 26, n)
    return _Q(major | 27, n)


# The map's keys in canonical order (shorter encodings first, then bytewise):
# t, v, ts, seq, data, room. The first two entries never change.
_MSG_START: Final = b"\xa6\x61t\x63msg\x61v" + _head(0, FRAME_VERSION) + b"\x62ts"
_SEQ: Final = b"\x63seq"
_DATA: Final = b"\x64data"
_ROOM: Final = b"\x64room"


def msg_frame(room: bytes, seq: int, data: bytes, ts: int) -> bytes:
    """``server_frame("msg", ...)``, byte for byte, for the hot path: the fields'
    types are fixed here, so the frame is laid out directly rather than walked
    (fan-out and catch-up make one per message; ``tests/server/test_msg_frame.py``
    checks the bytes against the general encoder)."""
    if not (isinstance(room, bytes) and isinstance(data, bytes)):
        raise TypeError("room and data are bytes")
    seq, ts = int(seq), int(ts)
    if seq < 0 or ts < 0 or seq >= 1 << 64 or ts >= 1 << 64:
        raise ValueError("seq and ts are unsigned 64-bit integers")
    return b"".join(
        (
            _MSG_START,
            _head(0, ts),
            _SEQ,
            _head(0, seq),
            _DATA,
            _head(0x40, len(data)),
            data,
            _ROOM,
            _head(0x40, len(room)),
            room,
        )
    )


def error_frame(code: str, detail: str, ref: str | bytes | None = None) -> bytes:
    return server_frame("error", code=code, detail=detail, ref=ref)
