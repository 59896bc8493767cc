"""Issue #6 §3.1: every decoder in the protocol package, fed random bytes, byte-level
mutations of valid encodings (bit flips, truncations, insertions, deletions,
duplications) and structural mutations (a field of the decoded CBOR replaced by a value
of another type or size, removed, or an extra field added, then re-encoded canonically
so the input gets past the canonical-encoding check into the typed readers).

Each decode either succeeds or raises a ``ProtocolError`` subclass, within a bounded
time; nothing else (no ``KeyError``, ``TypeError``, ``nacl`` or ``cbor2`` exception)
escapes. Inputs that declare huge lengths or nesting are refused without allocating.
"""

from __future__ import annotations

import contextlib
import time
import tracemalloc
from datetime import timedelta
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backchannel.protocol.errors import ProtocolError

from .samples import Decoder, decoders

DECODERS = decoders()
IDS = [d.name for d in DECODERS]
#: Bound on one decode, far above what a valid input takes (a few ms).
BOUND = 2.0
FUZZ = settings(
    deadline=timedelta(seconds=BOUND),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def feed(decoder: Decoder, data: bytes) -> None:
    """Decode; anything but success or a ProtocolError fails the test."""
    arg: Any = data.decode("latin-1") if decoder.text else data
    start = time.monotonic()
    with contextlib.suppress(ProtocolError):
        decoder.decode(arg)
    elapsed = time.monotonic() - start
    assert elapsed < BOUND, f"{decoder.name} took {elapsed:.2f}s on {len(data)} bytes"


# --- strategies --------------------------------------------------------------------------------


@st.composite
def byte_mutation(draw: st.DrawFn, sample: bytes) -> bytes:
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "dup", "byte"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
        elif op == "byte" and data:
            data[pos] = draw(
                st.sampled_from(
                    [
                        0x00,
                        0x18,
                        0x1B,
                        0x40,
                        0x5B,
                        0x60,
                        0x7F,
                        0x80,
                        0x9F,
                        0xA0,
                        0xBF,
                        0xC0,
                        0xF4,
                        0xF6,
                        0xFF,
                    ]
                )
            )
    return bytes(data)


SIZES = st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1184, 1088, 2000])
LEAF = st.one_of(
    st.integers(-(1 << 64), (1 << 64) - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64 - 1, -(2**64)]),
    SIZES.flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
)
VALUE = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _is_cbor(data: bytes) -> bool:
    try:
        return isinstance(cbor2.loads(data), dict | list)
    except Exception:
        return False


@st.composite
def structural_mutation(draw: st.DrawFn, sample: bytes) -> bytes:
    value = cbor2.loads(sample)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "remove", "extra", "resize", "nested"]))
        if not path:
            value = draw(VALUE) if op == "replace" else value
            continue
        parent = value
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        old = parent[last]
        if op == "replace":
            parent[last] = draw(VALUE)
        elif op == "nested" and isinstance(old, bytes) and _is_cbor(old):
            # Encoded objects inside objects (log events in a log, a header in a message).
            parent[last] = draw(structural_mutation(old))
        elif op == "resize" and isinstance(old, bytes | str):
            n = draw(SIZES)
            parent[last] = (old * (n // max(1, len(old)) + 1))[:n] if old else old
        elif op == "remove":
            if isinstance(parent, dict):
                del parent[last]
            else:
                parent.pop(last)
        elif op == "extra" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(VALUE)
        elif op == "extra" and isinstance(parent, list):
            parent.append(draw(VALUE))
    try:
        return bytes(cbor2.dumps(value, canonical=True))
    except (TypeError, ValueError, OverflowError):
        return sample


def _sample(decoder: Decoder) -> st.SearchStrategy[bytes]:
    return st.sampled_from(decoder.samples)


# --- tests -------------------------------------------------------------------------------------


def test_samples_decode() -> None:
    """The starting points are valid: a mutation test that starts from garbage proves little."""
    for decoder in DECODERS:
        for sample in decoder.samples:
            decoder.decode(sample.decode() if decoder.text else sample)


@pytest.mark.parametrize("decoder", DECODERS, ids=IDS)
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(decoder: Decoder, data: bytes) -> None:
    feed(decoder, data)


@pytest.mark.parametrize("decoder", DECODERS, ids=IDS)
@FUZZ
@given(st.data())
def test_byte_mutations(decoder: Decoder, data: st.DataObject) -> None:
    sample = data.draw(_sample(decoder))
    feed(decoder, data.draw(byte_mutation(sample)))


@pytest.mark.parametrize("decoder", [d for d in DECODERS if not d.text], ids=lambda d: d.name)
@FUZZ
@given(st.data())
def test_structural_mutations(decoder: Decoder, data: st.DataObject) -> None:
    sample = data.draw(_sample(decoder))
    if decoder.name == "padding.unpad":
        feed(decoder, data.draw(byte_mutation(sample)))
        return
    feed(decoder, data.draw(structural_mutation(sample)))


@given(text=st.text(max_size=400))
@FUZZ
def test_invite_code_random_text(text: str) -> None:
    from backchannel.protocol.invite import InviteCode

    with contextlib.suppress(ProtocolError):
        InviteCode.from_text(text)


HOSTILE = {
    "bytes 2^62": b"\x5b" + (2**62).to_bytes(8, "big") + b"x" * 16,
    "text 2^31": b"\x7a" + (2**31).to_bytes(4, "big") + b"x" * 16,
    "array 2^62": b"\x9b" + (2**62).to_bytes(8, "big") + b"\x00" * 16,
    "map 2^31": b"\xba" + (2**31).to_bytes(4, "big") + b"\x00" * 16,
    "nested 100k": b"\x81" * 100_000 + b"\x00",
    "nested maps": b"\xa1\x61a" * 5000 + b"\x00",
    "indefinite": b"\x9f" * 1000 + b"\xff" * 1000,
    "tag bomb": b"\xd8\x1e" * 5000 + b"\x00",
    "big bignum": b"\xc2\x5a\x00\x01\x00\x00" + b"\xff" * 65536,
}


@pytest.mark.parametrize("decoder", [d for d in DECODERS if not d.text], ids=lambda d: d.name)
def test_hostile_lengths_allocate_nothing(decoder: Decoder) -> None:
    """Declared lengths and depths far beyond the input are refused without
    allocating what they declare (a few MB at most), and quickly."""
    for name, data in HOSTILE.items():
        tracemalloc.start()
        start = time.monotonic()
        try:
            with pytest.raises(ProtocolError):
                decoder.decode(data)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert time.monotonic() - start < BOUND, name
        assert peak < 8 << 20, f"{decoder.name} peaked at {peak >> 20} MiB on {name}"
