"""Canonical CBOR: one byte string per value, and a strict, typed decoder."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol.encoding import Reader, decode, encode
from backchannel.protocol.errors import DecodeError, FieldTooLong, ProtocolError, UnsupportedVersion

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.binary(max_size=64)
    | st.text(max_size=32),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def normalise(value: object) -> object:
    if isinstance(value, tuple):
        return [normalise(v) for v in value]
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


@given(values)
def test_round_trip(value: object) -> None:
    data = encode(value)  # type: ignore[arg-type]
    assert decode(data) == normalise(value)
    assert encode(decode(data)) == data


def test_map_keys_sorted_bytewise() -> None:
    # RFC 8949 §4.2.1: keys sorted by their encoded bytes; shorter text keys first.
    assert encode({"bb": 1, "a": 2, "c": 3}).hex() == "a361610261630362626201"
    # With text keys only (our model), bytewise order equals length-then-bytes order,
    # so RFC 7049 "canonical" output from cbor2 is also RFC 8949 deterministic.
    long_key, short_key = "a" * 30, "z"
    assert list(decode(encode({long_key: 1, short_key: 2}))) == [short_key, long_key]


@given(values, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_rejected(value: object, extra: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(encode(value) + extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("1817"),  # 23 encoded in two bytes: not shortest form
        bytes.fromhex("a2616201616101"),  # map keys out of order
        bytes.fromhex("a2616101616102"),  # duplicate map key
        bytes.fromhex("9f01ff"),  # indefinite-length array
        bytes.fromhex("f93c00"),  # a float
        bytes.fromhex("c11a00000000"),  # a tag
        bytes.fromhex("a10101"),  # non-text map key
        bytes.fromhex("5f4101ff"),  # indefinite byte string
        b"",
        bytes.fromhex("ff"),
        bytes.fromhex("43"),  # truncated byte string
    ],
)
def test_non_canonical_or_malformed_rejected(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_size_bounded_before_parsing() -> None:
    with pytest.raises(FieldTooLong):
        decode(encode(b"x" * 100), max_size=50)


def test_deep_nesting_rejected() -> None:
    data = bytes([0x81] * 100) + b"\x00"
    with pytest.raises(DecodeError):
        decode(data)


@given(st.binary(max_size=200))
def test_garbage_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


def test_encode_refuses_values_outside_model() -> None:
    for bad in (1.5, {1: 2}, object(), 1 << 70):
        with pytest.raises(TypeError):
            encode(bad)  # type: ignore[arg-type]


def test_reader_checks_types_sizes_versions_and_unknown_fields() -> None:
    r = Reader.of(decode(encode({"v": 1, "k": b"12", "n": 5, "s": "hi"})), "thing")
    assert r.version(1) == 1
    assert r.blob("k", 2) == b"12"
    assert r.integer("n", 0, 10) == 5
    with pytest.raises(DecodeError):
        r.done()  # "s" not read yet
    assert r.text("s", 10) == "hi"
    r.done()

    with pytest.raises(UnsupportedVersion):
        Reader.of({"v": 2}, "thing").version(1)
    with pytest.raises(DecodeError):
        Reader.of({"k": b"123"}, "thing").blob("k", 2)
    with pytest.raises(FieldTooLong):
        Reader.of({"k": b"123"}, "thing").blob("k", max_size=2)
    with pytest.raises(DecodeError):
        Reader.of({"n": True}, "thing").integer("n")
    with pytest.raises(DecodeError):
        Reader.of({"n": 11}, "thing").integer("n", 0, 10)
    with pytest.raises(FieldTooLong):
        Reader.of({"s": "é" * 6}, "thing").text("s", 10)
    with pytest.raises(DecodeError):
        Reader.of({"s": "x"}, "thing").text("s", 10, choices=("a", "b"))
    with pytest.raises(DecodeError):
        Reader.of({}, "thing").integer("missing")
    with pytest.raises(DecodeError):
        Reader.of([1], "thing")


def _sharing_bomb(levels: int, width: int = 8) -> bytes:
    """CBOR value sharing (tags 28/29): each level is a shared array holding the level
    below and ``width - 1`` references to it, so a parser that follows the
    references walks ``width ** levels`` items: cost x8 per 24 bytes (the relay's
    event loop froze for 5-64 s on 213-243 such bytes)."""

    def ref(index: int) -> bytes:
        return b"\xd8\x1d" + (bytes([index]) if index < 24 else bytes([0x18, index]))

    out = b"\xd8\x1c\x81\x00"
    for k in range(1, levels):
        # Shared values are numbered in the order their tags appear: outermost first.
        out = b"\xd8\x1c" + bytes([0x80 + width]) + out + ref(levels - k) * (width - 1)
    return out


@pytest.mark.parametrize(
    "data",
    [
        _sharing_bomb(7),
        b"\xc1\x1a\x00\x00\x00\x01",  # a timestamp tag
        b"\xd9\xd9\xf7\x01",  # the self-describe tag
        b"\xfb" + bytes(8),  # a double
        b"\xf7",  # undefined
        b"\x9b" + b"\xff" * 8,  # an array claiming 2**64 - 1 items in 9 bytes
        b"\x5b" + b"\xff" * 8,  # a byte string claiming 2**64 - 1 bytes
    ],
    ids=["sharing", "tag-1", "self-describe", "float", "undefined", "huge-array", "huge-bstr"],
)
def test_outside_the_model_is_refused_before_parsing(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_worst_input_costs_a_small_constant_times_a_plain_one() -> None:
    """Decoding costs work linear in the input: per byte, the worst inputs (one item
    per byte, deep nesting, value-sharing tags) cost at most a small constant times a
    plain structured payload (a map of short entries, as frames and records are),
    and twice the input costs about twice the work. Both measured here, together."""
    import time

    def cost(data: bytes) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(10):
                with contextlib.suppress(DecodeError):
                    decode(data)
            best = min(best, time.perf_counter() - start)
        return best / len(data)

    size = 20_000
    plain = encode({f"k{i:05d}": i for i in range(size // 10)})
    worst = {
        "one item per byte": encode([0] * size),
        "deep": encode([[[[[[[[[[[[[[[[0] * size]]]]]]]]]]]]]]]),
        "value sharing": _sharing_bomb(7),  # 148 bytes; 0.26 s each if followed
    }
    baseline = cost(plain)
    for name, data in worst.items():
        assert cost(data) < 10 * baseline, name
    small, large = encode([0] * size), encode([0] * (4 * size))
    assert cost(large) < 3 * cost(small)  # per byte: linear, not quadratic
