"""Canonical encoding: deterministic CBOR (RFC 8949 §4.2.1) with a strict reader.

Everything that is signed, hashed or used as associated data is encoded here,
so there is exactly one byte string for each value. The data model is a small
subset of CBOR: unsigned and negative integers, byte strings, text strings,
arrays, maps with text keys, booleans and null. No floats, no tags, no
indefinite lengths.

Decoding is strict. An input is accepted only if re-encoding the decoded value
gives back exactly the same bytes; that one comparison rejects trailing bytes,
non-shortest integer forms, unsorted or duplicate map keys, indefinite-length
items and every other non-canonical spelling. Size is bounded before parsing.

Every input is hostile, so before the parser builds anything, :func:`_scan`
walks the item headers once, in time linear in the input: tags (CBOR's value
sharing, tags 28/29, let a few hundred bytes expand into gigabytes inside the
parser), floats and other simple values, indefinite lengths, nesting deeper
than :data:`MAX_DEPTH` and lengths beyond the input are refused there. What is
left can only decode to a value no larger than its bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias, cast

import cbor2

from .errors import DecodeError, FieldTooLong, UnsupportedVersion

Value: TypeAlias = (
    int | bytes | str | bool | Sequence["Value"] | Mapping[str, "Value"] | None
)

MAX_DEPTH: Final = 16
DEFAULT_MAX_SIZE: Final = 1 << 20


def encode(value: Value) -> bytes:
    """Encode ``value`` canonically. Raises ``TypeError`` for values outside the model."""
    _check_model(value, 0)
    return bytes(cbor2.dumps(value, canonical=True))


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> Value:
    """Decode canonical CBOR, rejecting anything that is not the unique encoding."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("input must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise FieldTooLong(f"input of {len(data)} bytes exceeds {max_size}")
    if not data:
        raise DecodeError("empty input")
    _scan(data)
    try:
        value = cbor2.loads(data, max_depth=MAX_DEPTH, allow_indefinite=False)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise DecodeError("not valid CBOR") from exc
    try:
        _check_model(value, 0)
        again = cbor2.dumps(value, canonical=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise DecodeError("value outside the canonical data model") from exc
    if again != data:
        raise DecodeError("not the canonical encoding (or trailing bytes)")
    return cast(Value, value)


#: CBOR simple values in the model: false, true, null.
_SIMPLE_OK: Final = (20, 21, 22)


def _scan(data: bytes) -> None:
    """Walk every item header once and refuse what is outside the data model.

    One pass, at least one input byte per step, no allocation beyond a stack
    of at most ``MAX_DEPTH`` counters: the cost is linear in ``len(data)``
    whatever the input, and no tag ever reaches the parser.
    """
    n, pos = len(data), 0
    pending = [1]  # items still to read at each open nesting level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= n:
            raise DecodeError("truncated CBOR")
        head = data[pos]
        pos += 1
        major, info = head >> 5, head & 0x1F
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            if pos + width > n:
                raise DecodeError("truncated CBOR")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
        else:
            raise DecodeError("indefinite or reserved CBOR length")
        if major in (2, 3):
            if arg > n - pos:
                raise DecodeError("truncated CBOR")
            pos += arg
        elif major in (4, 5):
            count = arg * (2 if major == 5 else 1)
            if count > n - pos:
                raise DecodeError("truncated CBOR")  # every item takes at least a byte
            if len(pending) > MAX_DEPTH:
                raise DecodeError("nested too deeply")
            pending.append(count)
        elif major == 6:
            raise DecodeError("CBOR tags are outside the canonical data model")
        elif major == 7 and (info not in _SIMPLE_OK):
            raise DecodeError("floats and simple values are outside the canonical data model")
    if pos != n:
        raise DecodeError("not the canonical encoding (or trailing bytes)")


#: Exact types that are always in the model: tested first, by identity, since
#: ``isinstance`` against a union costs several times as much and this runs for
#: every item of every value encoded or decoded.
_LEAVES: Final = frozenset({type(None), bool, bytes, str})


def _check_model(value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise TypeError("nested too deeply")
    kind = type(value)
    if kind in _LEAVES:
        return
    if kind is list or kind is tuple:
        for item in value:  # type: ignore[attr-defined]
            _check_model(item, depth + 1)
        return
    if value is None or isinstance(value, bool | bytes | str):
        return
    if isinstance(value, int):
        if not -(1 << 64) <= value < (1 << 64):
            raise TypeError("integer out of CBOR major type 0/1 range")
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_model(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError("map keys must be text")
            _check_model(item, depth + 1)
        return
    raise TypeError(f"{type(value).__name__} is not in the canonical data model")


class Reader:
    """Typed, bounded access to a decoded map; unknown keys are an error.

    Usage: ``r = Reader.of(decode(data), "what")``, read each field, then
    ``r.done()`` so that any field this version does not know is rejected.
    """

    def __init__(self, fields: Mapping[str, Value], what: str) -> None:
        self._fields = fields
        self._what = what
        self._seen: set[str] = set()

    @classmethod
    def of(cls, value: Value, what: str) -> Reader:
        if not isinstance(value, dict):
            raise DecodeError(f"{what}: expected a map")
        return cls(value, what)

    def version(self, *supported: int, key: str = "v") -> int:
        got = self.integer(key, 0, 255)
        if got not in supported:
            raise UnsupportedVersion(f"{self._what}: version {got} is not supported")
        return got

    def _get(self, key: str) -> Value:
        self._seen.add(key)
        if key not in self._fields:
            raise DecodeError(f"{self._what}: missing field {key!r}")
        return self._fields[key]

    def has(self, key: str) -> bool:
        return key in self._fields

    def integer(self, key: str, low: int = 0, high: int = (1 << 63) - 1) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"{self._what}: {key!r} must be an integer")
        if not low <= value <= high:
            raise DecodeError(f"{self._what}: {key!r} out of range")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise DecodeError(f"{self._what}: {key!r} must be a boolean")
        return value

    def blob(self, key: str, size: int | None = None, *, max_size: int | None = None) -> bytes:
        value = self._get(key)
        return check_bytes(value, f"{self._what}.{key}", size=size, max_size=max_size)

    def optional_blob(self, key: str, size: int) -> bytes | None:
        if key not in self._fields:
            return None
        return self.blob(key, size)

    def text(self, key: str, max_len: int, choices: Sequence[str] | None = None) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise DecodeError(f"{self._what}: {key!r} must be text")
        if len(value.encode()) > max_len:
            raise FieldTooLong(f"{self._what}: {key!r} longer than {max_len} bytes")
        if choices is not None and value not in choices:
            raise DecodeError(f"{self._what}: {key!r} has an unknown value")
        return value

    def array(self, key: str, max_items: int) -> list[Value]:
        value = self._get(key)
        if not isinstance(value, list):
            raise DecodeError(f"{self._what}: {key!r} must be an array")
        if len(value) > max_items:
            raise FieldTooLong(f"{self._what}: {key!r} has more than {max_items} items")
        return value

    def map(self, key: str) -> Reader:
        value = self._get(key)
        return Reader.of(value, f"{self._what}.{key}")

    def raw(self, key: str) -> Value:
        return self._get(key)

    def done(self) -> None:
        extra = set(self._fields) - self._seen
        if extra:
            raise DecodeError(f"{self._what}: unknown field(s) {sorted(extra)!r}")


def check_bytes(
    value: Value, what: str, *, size: int | None = None, max_size: int | None = None
) -> bytes:
    """Check that ``value`` is a byte string of an exact or bounded size."""
    if not isinstance(value, bytes):
        raise DecodeError(f"{what} must be a byte string")
    if size is not None and len(value) != size:
        raise DecodeError(f"{what} must be {size} bytes")
    if max_size is not None and len(value) > max_size:
        raise FieldTooLong(f"{what} longer than {max_size} bytes")
    return value
