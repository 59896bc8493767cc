"""Our prekeys for each room's member key: made, uploaded, looked up, used up, topped up.

One row per prekey (:class:`~.records.PrekeyRecord`), so that accepting a new
pairwise session reads the two or three prekeys it names and deletes the
one-time ones it used, whatever else is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.keys import (
    PreKey,
    PreKeyKind,
    PreKeyPrivate,
    PreKeyUpload,
    generate_kem_prekey,
    generate_x25519_prekey,
)

from .context import Context
from .outbox import TRANSIENT
from .records import CounterRecord, PrekeyRecord, Table
from .relay import RelayError
from .room import Room
from .transcript import Transcript

ONE_TIME_PREKEYS = 20
KEM_PREKEYS = 5
REPLENISH_BELOW = 5
#: Peers refuse a signed prekey older than this (a relay replaying a retired one) ...
SIGNED_PREKEY_MAX_AGE = 30 * 86_400
#: ... so we replace ours well before.
SIGNED_PREKEY_ROTATE = 7 * 86_400

Lookup = Callable[[PreKeyKind, int], tuple[PreKey, PreKeyPrivate] | None]


def _key(room: Room, kind: str, key_id: int) -> bytes:
    return room.room_id + kind.encode() + b"/" + key_id.to_bytes(4, "big")


class Prekeys:
    def __init__(self, ctx: Context, transcript: Transcript) -> None:
        self.ctx, self.transcript = ctx, transcript
        self._rows: Table[PrekeyRecord] = Table(ctx.store, "prekey", PrekeyRecord)
        self._next: Table[CounterRecord] = Table(ctx.store, "prekey-next", CounterRecord)

    def stored(self, room: Room) -> list[PrekeyRecord]:
        return sorted(self._rows.scan(room.room_id), key=lambda p: p.id)

    def lookup(self, room: Room) -> Lookup:
        def find(kind: PreKeyKind, key_id: int) -> tuple[PreKey, PreKeyPrivate] | None:
            row = self._rows.get(_key(room, kind, key_id))
            if row is None:
                return None
            return PreKey.from_value(decode(row.public)), PreKeyPrivate(kind, key_id, row.private)

        return find

    def consume(self, room: Room, used: Iterable[tuple[str, int]]) -> None:
        """Forget one-time prekeys a new session used (the others stay for later)."""
        for kind, key_id in used:
            if kind in ("opk", "kem"):
                self._rows.delete(_key(room, kind, key_id))

    async def upload(
        self,
        room: Room,
        *,
        fresh: bool,
        rotate_spk: bool = False,
        opk: int = 0,
        kem: int = 0,
    ) -> None:
        counter = self._next.get(room.room_id)
        next_id = 1 if counter is None else counter.n
        made: list[tuple[PreKey, PreKeyPrivate]] = []
        now = self.ctx.now()
        stored = self.stored(room)
        drop = [p for p in stored if fresh and p.kind in ("spk", "kem-lr")]
        if fresh:
            made.append(generate_kem_prekey(room.key, "kem-lr", next_id, now))
            next_id += 1
            opk, kem = ONE_TIME_PREKEYS, KEM_PREKEYS
        if fresh or rotate_spk:
            # Keep the newest previous signed prekey: a peer may have fetched it
            # just before the rotation and its first message is still on the way.
            spks = [p for p in stored if p.kind == "spk" and p not in drop]
            drop += spks[:-1]
            made.append(generate_x25519_prekey(room.key, "spk", next_id, now))
            next_id += 1
        for _ in range(opk):
            made.append(generate_x25519_prekey(room.key, "opk", next_id, now))
            next_id += 1
        for _ in range(kem):
            made.append(generate_kem_prekey(room.key, "kem", next_id, now))
            next_id += 1
        if not made:
            return
        with self.ctx.store.transaction():
            for old in drop:
                self._rows.delete(_key(room, old.kind, old.id))
            for pub, priv in made:
                row = PrekeyRecord(
                    kind=pub.kind, id=pub.id, public=encode(pub.to_value()), private=priv.private
                )
                self._rows.put(_key(room, pub.kind, pub.id), row, scope=room.room_id)
            self._next.put(room.room_id, CounterRecord(n=next_id))
        upload = PreKeyUpload(member=room.key.public, prekeys=[p for p, _ in made])
        await self.ctx.http(room.relay).upload_prekeys(upload.to_bytes())

    def _signed_prekey_time(self, room: Room) -> int:
        times = [
            PreKey.from_value(decode(p.public)).ts for p in self.stored(room) if p.kind == "spk"
        ]
        return max(times, default=0)

    async def replenish(self, room: Room) -> None:
        """Top up one-time prekeys on the relay when others have used most of them."""
        upload = PreKeyUpload(member=room.key.public, prekeys=[])
        try:
            answer = await self.ctx.http(room.relay).upload_prekeys(upload.to_bytes())
            counts = cast(dict[str, int], answer["counts"])
            opk, kem = int(counts.get("opk", 0)), int(counts.get("kem", 0))
            rotate = self.ctx.now() - self._signed_prekey_time(room) > SIGNED_PREKEY_ROTATE
            if min(opk, kem) < REPLENISH_BELOW or rotate:
                await self.upload(
                    room,
                    fresh=False,
                    rotate_spk=rotate,
                    opk=max(0, ONE_TIME_PREKEYS - opk),
                    kem=max(0, KEM_PREKEYS - kem),
                )
        except RelayError as exc:
            # Sessions still open without one-time prekeys (the last-resort KEM
            # prekey and the signed prekey remain); try again next time. A link
            # that dropped or a busy relay is not worth a line in the transcript:
            # the next connection tops up as well.
            if exc.code not in TRANSIENT:
                self.transcript.warn(room, f"could not top up prekeys ({exc.code})")
