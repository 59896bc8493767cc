"""Plaintext padding to size buckets, so ciphertext length leaks only a bucket.

Scheme (docs/sections/encoding.md, "Padding"): append one 0x80 byte, then zero bytes up
to the bucket size; the bucket is the smallest power of two that is at least
``MIN_BUCKET`` and holds the plaintext plus the marker byte. Unpadding strips
trailing zeros and the marker and refuses anything else. Padding happens
inside the AEAD, so a relay can neither see nor alter it.
"""

from __future__ import annotations

from typing import Final

from .errors import DecodeError, FieldTooLong

MIN_BUCKET: Final = 256
#: Largest padded plaintext this version accepts (1 MiB); callers pass lower limits.
MAX_BUCKET: Final = 1 << 20
_MARKER: Final = 0x80


def bucket_size(length: int, *, max_bucket: int = MAX_BUCKET) -> int:
    """The padded size for a plaintext of ``length`` bytes."""
    needed = length + 1
    size = MIN_BUCKET
    while size < needed:
        size <<= 1
    if size > max_bucket:
        raise FieldTooLong(f"plaintext of {length} bytes exceeds the largest bucket")
    return size


def pad(plaintext: bytes, *, max_bucket: int = MAX_BUCKET) -> bytes:
    size = bucket_size(len(plaintext), max_bucket=max_bucket)
    return plaintext + bytes([_MARKER]) + bytes(size - len(plaintext) - 1)


def unpad(padded: bytes) -> bytes:
    """Inverse of :func:`pad`; rejects a buffer that is not a valid bucket."""
    size = len(padded)
    if size < MIN_BUCKET or size & (size - 1) or size > MAX_BUCKET:
        raise DecodeError("padded plaintext is not a bucket size")
    end = len(padded.rstrip(b"\x00"))
    if end == 0 or padded[end - 1] != _MARKER:
        raise DecodeError("padding marker missing")
    body = padded[: end - 1]
    if bucket_size(len(body)) != size:
        # A shorter bucket would have held it: not what pad() makes.
        raise DecodeError("padding longer than its bucket")
    return body
