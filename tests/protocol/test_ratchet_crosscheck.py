"""Cross-check our Double Ratchet against an independent implementation.

The ``doubleratchet`` package (python-doubleratchet by Syndace, 1.3.x) is a
separate implementation of the same specification with pluggable primitives.
Configured with our KDFs (keyed BLAKE2b, labels ``bc-dr-root`` and
``bc-dr-chain``, chain constant ``b""``), our AEAD (XChaCha20-Poly1305 keyed
from the message key with label ``bc-dr-msg``), our associated-data layout and
the same deterministic ratchet-key source, it must produce byte-identical
messages and identical root, chain and skipped message keys for any delivery
schedule.

The primitives below are re-spelt from the specification text in
docs/sections/pairwise.md, not imported from ``ratchet.py``, so that a
mistake in one of our helpers cannot hide on both sides.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backchannel.protocol import padding
from backchannel.protocol import primitives as P
from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.errors import DecryptionFailed
from backchannel.protocol.ratchet import Ratchet
from tests.protocol.drbg import Drbg

dr = pytest.importorskip("doubleratchet")


# --- the package, configured with our primitives --------------------------------------


class RootKDF(dr.KDF):  # type: ignore[misc]
    @staticmethod
    async def derive(key: bytes, data: bytes, length: int) -> bytes:
        return P.kdf(key, b"bc-dr-root", data, length)


class ChainKDF(dr.KDF):  # type: ignore[misc]
    @staticmethod
    async def derive(key: bytes, data: bytes, length: int) -> bytes:
        return P.kdf(key, b"bc-dr-chain", data, length)


class XChaCha(dr.AEAD):  # type: ignore[misc]
    @staticmethod
    async def encrypt(plaintext: bytes, key: bytes, associated_data: bytes) -> bytes:
        okm = P.kdf(key, b"bc-dr-msg", b"", 56)
        return P.aead_encrypt(okm[:32], okm[32:], plaintext, associated_data)

    @staticmethod
    async def decrypt(ciphertext: bytes, key: bytes, associated_data: bytes) -> bytes:
        okm = P.kdf(key, b"bc-dr-msg", b"", 56)
        try:
            return P.aead_decrypt(okm[:32], okm[32:], ciphertext, associated_data)
        except DecryptionFailed as exc:
            raise dr.AuthenticationFailedException() from exc


def header_bytes(header: Any) -> bytes:
    return encode(
        {
            "dh": header.ratchet_pub,
            "n": header.sending_chain_length,
            "pn": header.previous_sending_chain_length,
            "v": 1,
        }
    )


class PackageRatchet(dr.DoubleRatchet):  # type: ignore[misc]
    @staticmethod
    def _build_associated_data(associated_data: bytes, header: Any) -> bytes:
        # The package's per-call associated data carries our AD and the sender's role.
        ad, sender = decode(associated_data)  # type: ignore[misc]
        return encode({"ad": ad, "from": sender, "hdr": header_bytes(header)})


def dh_class(rng: Callable[[int], bytes]) -> type:
    class DH(dr.DiffieHellmanRatchet):  # type: ignore[misc]
        @staticmethod
        def _generate_priv() -> bytes:
            return rng(32)

        @staticmethod
        def _derive_pub(priv: bytes) -> bytes:
            return P.x25519_public(priv)

        @staticmethod
        def _perform_diffie_hellman(own_priv: bytes, other_pub: bytes) -> bytes:
            return P.x25519(own_priv, other_pub)

    return DH


def message_bytes(message: Any) -> bytes:
    """The package's EncryptedMessage in our RatchetMessage encoding."""
    h = message.header
    return encode(
        {
            "ct": message.ciphertext,
            "h": {
                "dh": h.ratchet_pub,
                "n": h.sending_chain_length,
                "pn": h.previous_sending_chain_length,
                "v": 1,
            },
            "v": 1,
        }
    )


# --- running both implementations side by side -----------------------------------------


@dataclass
class Side:
    role: str
    ours: Ratchet
    dh: type
    pkg: Any = None
    outbox: list[tuple[bytes, Any, bytes]] = field(default_factory=list)


class Pair:
    """Alice (initiator) and Bob (responder), each run by both implementations."""

    def __init__(self, seed: str, *, max_skip: int = 1000, max_stored: int = 2000) -> None:
        rng = Drbg(seed)
        self.sk = rng(32)
        self.spk_private = rng(32)
        self.ad = b"associated:" + rng(16)
        self.max_skip = max_skip
        self.max_stored = max_stored
        spk_public = P.x25519_public(self.spk_private)
        # Two copies of each party's key source: one for us, one for the package.
        self.alice = Side(
            "initiator",
            Ratchet.init_initiator(
                self.sk,
                spk_public,
                self.ad,
                rng=Drbg(seed + "/a"),
                max_skip=max_skip,
                max_stored=max_stored,
            ),
            dh_class(Drbg(seed + "/a")),
        )
        self.bob = Side(
            "responder",
            Ratchet.init_responder(
                self.sk,
                self.spk_private,
                self.ad,
                rng=Drbg(seed + "/b"),
                max_skip=max_skip,
                max_stored=max_stored,
            ),
            dh_class(Drbg(seed + "/b")),
        )
        self.spk_public = spk_public
        self.counter = 0

    def _config(self, side: Side) -> dict[str, Any]:
        return {
            "diffie_hellman_ratchet_class": side.dh,
            "root_chain_kdf": RootKDF,
            "message_chain_kdf": ChainKDF,
            "message_chain_constant": b"",
            "dos_protection_threshold": self.max_skip,
            "max_num_skipped_message_keys": self.max_stored,
            "aead": XChaCha,
        }

    def _ad(self, sender: str) -> bytes:
        return encode([self.ad, sender])

    def send(self, side: Side) -> None:
        plaintext = f"{side.role} message {self.counter}".encode() * (1 + self.counter % 3)
        self.counter += 1
        ours = side.ours.encrypt(plaintext)
        padded = padding.pad(plaintext)
        if side.pkg is None:
            assert side.role == "initiator", "the responder cannot send first"
            side.pkg, theirs = asyncio.run(
                PackageRatchet.encrypt_initial_message(
                    **self._config(side),
                    shared_secret=self.sk,
                    recipient_ratchet_pub=self.spk_public,
                    message=padded,
                    associated_data=self._ad(side.role),
                )
            )
        else:
            theirs = asyncio.run(side.pkg.encrypt_message(padded, self._ad(side.role)))
        assert ours == message_bytes(theirs), "implementations disagree on a message"
        side.outbox.append((ours, theirs, plaintext))
        self.check_state(side)

    def deliver(self, sender: Side, receiver: Side, index: int) -> None:
        ours, theirs, plaintext = sender.outbox.pop(index)
        assert receiver.ours.decrypt(ours) == plaintext
        ad = self._ad(sender.role)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if receiver.pkg is None:
                receiver.pkg, padded = asyncio.run(
                    PackageRatchet.decrypt_initial_message(
                        **self._config(receiver),
                        shared_secret=self.sk,
                        own_ratchet_priv=self.spk_private,
                        message=theirs,
                        associated_data=ad,
                    )
                )
            else:
                padded = asyncio.run(receiver.pkg.decrypt_message(theirs, ad))
        assert padding.unpad(padded) == plaintext
        self.check_state(receiver)

    def check_state(self, side: Side) -> None:
        """Root key, both chain keys and lengths, and the skipped keys (in order) agree."""
        ours = decode(side.ours.to_bytes())
        assert isinstance(ours, dict)
        model = side.pkg.model
        dhr = model.diffie_hellman_ratchet
        sym = dhr.symmetric_key_ratchet
        assert ours["rk"] == dhr.root_chain.key
        assert ours["dhs"] == dhr.own_ratchet_priv
        assert ours.get("dhr") == dhr.other_ratchet_pub
        assert ours.get("cks") == (sym.sending_chain and sym.sending_chain.key)
        assert ours["ns"] == sym.sending_chain.length
        if sym.receiving_chain is None:
            assert "ckr" not in ours
        else:
            assert ours["ckr"] == sym.receiving_chain.key
            assert ours["nr"] == sym.receiving_chain.length
        assert ours["pn"] == (sym.previous_sending_chain_length or 0)
        theirs = [[k.ratchet_pub, k.index, k.message_key] for k in model.skipped_message_keys]
        assert ours["skipped"] == theirs


def test_scripted_conversation_is_byte_identical() -> None:
    pair = Pair("crosscheck-script")
    a, b = pair.alice, pair.bob
    for _ in range(3):
        pair.send(a)
    pair.deliver(a, b, 2)  # Bob's first message is Alice's third: two keys skipped
    pair.deliver(a, b, 0)  # from the skipped keys
    for _ in range(2):
        pair.send(b)
    pair.deliver(b, a, 1)  # Alice's first DH ratchet step, one key skipped
    pair.send(a)
    pair.send(a)
    pair.deliver(a, b, 2)  # the new chain's second message: Bob ratchets, skips
    pair.deliver(a, b, 0)  # old chain's leftover, from the skipped keys
    pair.deliver(b, a, 0)  # Bob's old-chain message, from Alice's skipped keys
    pair.deliver(a, b, 0)
    pair.send(b)
    pair.send(b)
    pair.deliver(b, a, 0)
    pair.send(a)
    pair.deliver(b, a, 0)
    pair.deliver(a, b, 0)
    for _ in range(5):
        pair.send(b)
    for _ in range(5):
        pair.deliver(b, a, len(b.outbox) - 1)  # newest first
    pair.send(a)
    pair.deliver(a, b, 0)
    assert not a.outbox
    assert not b.outbox


def test_eviction_of_skipped_keys_matches() -> None:
    """With tight bounds the oldest skipped keys go first, in both implementations."""
    pair = Pair("crosscheck-evict", max_skip=3, max_stored=4)
    a, b = pair.alice, pair.bob
    for _ in range(4):
        pair.send(a)
    pair.deliver(a, b, 3)  # three skipped
    pair.send(b)
    pair.deliver(b, a, 0)
    for _ in range(3):
        pair.send(a)
    pair.deliver(a, b, 5)  # two more skipped in the new chain: five stored, oldest evicted
    assert b.ours.skipped_count == 4
    pair.deliver(a, b, 1)  # a key that survived eviction
    pair.deliver(a, b, 3)


Op = tuple[str, int]


@st.composite
def schedules(draw: st.DrawFn) -> list[Op]:
    ops: list[Op] = [("send_a", 0)]
    for _ in range(draw(st.integers(5, 30))):
        ops.append(
            (
                draw(st.sampled_from(["send_a", "send_b", "to_b", "to_a"])),
                draw(st.integers(0, 1000)),
            )
        )
    return ops


@settings(max_examples=25)
@given(schedules(), st.integers(0, 2**32))
def test_random_schedules_are_byte_identical(ops: list[Op], seed: int) -> None:
    """Any interleaving of sends and out-of-order deliveries (no loss beyond the bounds)."""
    pair = Pair(f"crosscheck-{seed}", max_skip=50, max_stored=60)
    a, b = pair.alice, pair.bob
    for op, pick in ops:
        if op == "send_a":
            pair.send(a)
        elif op == "send_b" and b.pkg is not None:
            pair.send(b)
        elif op == "to_b" and a.outbox:
            pair.deliver(a, b, pick % len(a.outbox))
        elif op == "to_a" and b.outbox:
            pair.deliver(b, a, pick % len(b.outbox))
