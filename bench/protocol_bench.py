"""Protocol micro-benchmarks: operations per second on one core, median of repeats.

Run:  .venv/bin/python bench/protocol_bench.py [--repeats N] [--seconds S]

Each row is printed beside a *baseline* measured in the same run on the same
machine: the bare libsodium work the operation cannot avoid (an
XChaCha20-Poly1305 seal of the same padded size, plus an Ed25519 signature or
verification where the operation signs). The ratio says how much the
protocol's own bookkeeping (encoding, KDF steps, state copies) costs, and
means the same on a fast laptop and a slow CI box. Never part of the test
suite: timings are not assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from backchannel.protocol import padding
from backchannel.protocol import primitives as P
from backchannel.protocol.keys import (
    MemberKeyPair,
    PreKey,
    PreKeyBundle,
    PreKeyKind,
    PreKeyPrivate,
    generate_kem_prekey,
    generate_x25519_prekey,
)
from backchannel.protocol.ratchet import PairwiseSession
from backchannel.protocol.senderkey import InboundSenderKey, OutboundSenderKey

MESSAGE = os.urandom(1024)
EPOCH = (5, os.urandom(32))


def rate(make: Callable[[int], Callable[[], object]], seconds: float, repeats: int) -> float:
    """Median operations/second over ``repeats`` runs of about ``seconds`` each.

    ``make(n)`` prepares ``n`` operations (untimed) and returns the thunk that
    performs them.
    """
    # Calibrate n so that one run lasts about ``seconds``.
    n = 16
    while True:
        run = make(n)
        start = time.perf_counter()
        run()
        took = time.perf_counter() - start
        if took >= seconds / 4 or n >= 1 << 20:
            break
        n *= 2
    n = max(1, int(n * seconds / max(took, 1e-9)))
    results = []
    for _ in range(repeats):
        run = make(n)
        start = time.perf_counter()
        run()
        results.append(n / (time.perf_counter() - start))
    return statistics.median(results)


def _responder() -> tuple[
    MemberKeyPair, dict[tuple[PreKeyKind, int], tuple[PreKey, PreKeyPrivate]]
]:
    bob = MemberKeyPair.generate()
    store: dict[tuple[PreKeyKind, int], tuple[PreKey, PreKeyPrivate]] = {}
    for prekey, private in (
        generate_x25519_prekey(bob, "spk", 1, 0),
        generate_kem_prekey(bob, "kem-lr", 2, 0),
    ):
        store[(prekey.kind, prekey.id)] = (prekey, private)
    return bob, store


def bench_session_setup(n: int) -> Callable[[], object]:
    """Initiator: verify bundle, 4 DH + ML-KEM encapsulation, first message.
    Responder: 4 DH + decapsulation, first decryption."""
    alice = MemberKeyPair.generate()
    bob, store = _responder()
    bundle = PreKeyBundle(member=bob.public, spk=store[("spk", 1)][0], kem=store[("kem-lr", 2)][0])

    def run() -> None:
        for _ in range(n):
            session = PairwiseSession.initiate(alice, bundle, bob.public)
            first = session.encrypt(b"hello")
            PairwiseSession.accept(
                bob, first, initiator=alice.public, prekeys=lambda k, i: store.get((k, i))
            )

    return run


def _session_pair() -> tuple[PairwiseSession, PairwiseSession]:
    alice = MemberKeyPair.generate()
    bob, store = _responder()
    bundle = PreKeyBundle(member=bob.public, spk=store[("spk", 1)][0], kem=store[("kem-lr", 2)][0])
    a = PairwiseSession.initiate(alice, bundle, bob.public)
    accepted = PairwiseSession.accept(
        bob, a.encrypt(b"hi"), initiator=alice.public, prekeys=lambda k, i: store.get((k, i))
    )
    b = accepted.session
    a.decrypt(b.encrypt(b"hi"))
    return a, b


def bench_ratchet_encrypt(n: int) -> Callable[[], object]:
    a, _ = _session_pair()
    return lambda: [a.encrypt(MESSAGE) for _ in range(n)]


def bench_ratchet_decrypt(n: int) -> Callable[[], object]:
    a, b = _session_pair()
    messages = [a.encrypt(MESSAGE) for _ in range(n)]
    return lambda: [b.decrypt(m) for m in messages]


def _sender_pair() -> tuple[OutboundSenderKey, InboundSenderKey]:
    out = OutboundSenderKey.generate(os.urandom(32), os.urandom(32), since=0)
    return out, InboundSenderKey.from_distribution(out.distribution(), max_skip=1, max_stored=1)


def bench_sender_seal(n: int) -> Callable[[], object]:
    out, _ = _sender_pair()
    return lambda: [out.seal(MESSAGE, EPOCH) for _ in range(n)]


def bench_sender_open(n: int) -> Callable[[], object]:
    out, inb = _sender_pair()
    envelopes = [out.seal(MESSAGE, EPOCH) for _ in range(n)]
    return lambda: [inb.open(e) for e in envelopes]


# --- baselines: the unavoidable libsodium work -----------------------------------------------

_PADDED = padding.pad(MESSAGE)
_KEY, _NONCE = os.urandom(32), os.urandom(24)
_SEED = os.urandom(32)
_SECRET = P.ed25519_expand(_SEED)
_PUBLIC = P.ed25519_public(_SEED)


def base_seal(n: int) -> Callable[[], object]:
    return lambda: [P.aead_encrypt(_KEY, _NONCE, _PADDED, b"") for _ in range(n)]


def base_open(n: int) -> Callable[[], object]:
    sealed = P.aead_encrypt(_KEY, _NONCE, _PADDED, b"")
    return lambda: [P.aead_decrypt(_KEY, _NONCE, sealed, b"") for _ in range(n)]


def base_seal_sign(n: int) -> Callable[[], object]:
    def run() -> None:
        for _ in range(n):
            ct = P.aead_encrypt(_KEY, _NONCE, _PADDED, b"")
            P.ed25519_sign_expanded(_SECRET, ct)

    return run


def base_verify_open(n: int) -> Callable[[], object]:
    sealed = P.aead_encrypt(_KEY, _NONCE, _PADDED, b"")
    sig = P.ed25519_sign_expanded(_SECRET, sealed)

    def run() -> None:
        for _ in range(n):
            P.ed25519_verify(_PUBLIC, sealed, sig)
            P.aead_decrypt(_KEY, _NONCE, sealed, b"")

    return run


def base_setup(n: int) -> Callable[[], object]:
    """Four X25519 on each side and one ML-KEM-768 encapsulation/decapsulation."""
    a, b = os.urandom(32), P.x25519_public(os.urandom(32))
    kem_public, kem_secret = P.mlkem_keypair()

    def run() -> None:
        for _ in range(n):
            for _ in range(8):
                P.x25519(a, b)
            ct, _ = P.mlkem_encaps(kem_public)
            P.mlkem_decaps(kem_secret, ct)

    return run


ROWS: list[
    tuple[str, Callable[[int], Callable[[], object]], str, Callable[[int], Callable[[], object]]]
] = [
    ("session set-up (both sides)", bench_session_setup, "8 X25519 + ML-KEM", base_setup),
    ("ratchet encrypt 1 KiB", bench_ratchet_encrypt, "AEAD seal", base_seal),
    ("ratchet decrypt 1 KiB", bench_ratchet_decrypt, "AEAD open", base_open),
    ("sender key encrypt+sign 1 KiB", bench_sender_seal, "AEAD seal + sign", base_seal_sign),
    ("sender key verify+decrypt 1 KiB", bench_sender_open, "verify + AEAD open", base_verify_open),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per row (median reported)")
    parser.add_argument("--seconds", type=float, default=0.5, help="approximate length of a run")
    args = parser.parse_args()
    print(f"{'operation':34} {'ops/s':>10}   {'baseline':20} {'ops/s':>10}  {'ratio':>6}")
    print("-" * 88)
    for name, bench, base_name, base in ROWS:
        ours = rate(bench, args.seconds, args.repeats)
        floor = rate(base, args.seconds, args.repeats)
        print(f"{name:34} {ours:10,.0f}   {base_name:20} {floor:10,.0f}  {ours / floor:6.2f}")
    print(f"\nmedian of {args.repeats} runs of ~{args.seconds}s each; ratio = ours / baseline")


if __name__ == "__main__":
    main()
