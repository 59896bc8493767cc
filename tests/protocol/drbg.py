"""A deterministic byte source for known-answer vectors and reproducible tests.

Never used outside tests: production code takes libsodium's randombytes.
"""

from __future__ import annotations

from backchannel.protocol import primitives as P


class Drbg:
    """BLAKE2b in counter mode, keyed by a seed: ``Drbg(b"seed")(n)`` -> n bytes."""

    def __init__(self, seed: bytes | str) -> None:
        if isinstance(seed, str):
            seed = seed.encode()
        self._key = P.hash_bytes(b"bc-test-drbg", seed, 32)
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += P.kdf(self._key, b"bc-test-drbg", self._counter.to_bytes(8, "big"), 64)
            self._counter += 1
        return out[:n]
