"""Padding to size buckets (docs/sections/encoding.md, "Padding"), tested directly:
the AEAD stops most bad padding before unpad sees it, so unpad's own checks
need their own tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backchannel.protocol import padding
from backchannel.protocol.errors import DecodeError, FieldTooLong


@given(st.binary(max_size=5000))
def test_round_trip_and_bucket_sizes(data: bytes) -> None:
    padded = padding.pad(data)
    assert padding.unpad(padded) == data
    size = len(padded)
    assert size >= padding.MIN_BUCKET
    assert size & (size - 1) == 0  # a power of two
    assert size // 2 < len(data) + 1 or size == padding.MIN_BUCKET  # the smallest that fits


def test_bucket_edges() -> None:
    assert padding.bucket_size(0) == 256
    assert padding.bucket_size(255) == 256
    assert padding.bucket_size(256) == 512
    assert len(padding.pad(b"x" * 255)) == 256
    with pytest.raises(FieldTooLong):
        padding.bucket_size(padding.MAX_BUCKET)
    with pytest.raises(FieldTooLong):
        padding.pad(b"x" * 600, max_bucket=512)


def test_unpad_rejects_a_size_that_is_not_a_bucket() -> None:
    for size in (0, 100, 255, 300, 257):
        with pytest.raises(DecodeError):
            padding.unpad(b"\x80" + bytes(size - 1) if size else b"")


def test_unpad_rejects_a_missing_marker() -> None:
    with pytest.raises(DecodeError):
        padding.unpad(bytes(256))
    with pytest.raises(DecodeError):
        padding.unpad(b"abc" + b"\x81" + bytes(252))


def test_unpad_rejects_padding_longer_than_needed() -> None:
    # A 10-byte body fits the 256 bucket; padding it to 512 is not what pad() makes.
    with pytest.raises(DecodeError):
        padding.unpad(b"0123456789\x80" + bytes(512 - 11))


@given(st.binary(min_size=256, max_size=256))
def test_unpad_of_arbitrary_bytes_is_typed(data: bytes) -> None:
    try:
        body = padding.unpad(data)
    except DecodeError:
        return
    assert padding.pad(body) == data  # accepted only if it is exactly what pad() makes
