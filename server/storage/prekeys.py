"""Prekeys: what members upload so others can open pairwise sessions with them offline."""

from __future__ import annotations

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from backchannel.protocol.encoding import decode, encode
from backchannel.protocol.keys import MemberPublicKey, PreKey, PreKeyBundle, PreKeyUpload

from ..errors import RelayError
from .engine import BaseStore
from .models import PreKeyMark, PreKeyRow, RoomMember

ONE_TIME_KINDS = ("opk", "kem")
REPLACED_KINDS = ("spk", "kem-lr")


class PreKeyStore(BaseStore):
    async def upload_prekeys(
        self, upload: PreKeyUpload, max_per_member: int
    ) -> tuple[int, dict[str, int]]:
        member = upload.member.sign

        async def run(session: AsyncSession) -> tuple[int, dict[str, int]]:
            ok = await session.scalar(
                select(RoomMember.room_id)
                .where(
                    RoomMember.member == member,
                    RoomMember.dh == upload.member.dh,
                    RoomMember.left_pos.is_(None),
                )
                .limit(1)
            )
            if ok is None:
                raise RelayError("not_a_member", 403, "the key is not a current member of a room")
            marks = {
                m.kind: m.max_id
                for m in await session.scalars(
                    select(PreKeyMark).where(PreKeyMark.member == member)
                )
            }
            stored = {
                (r.kind, r.key_id): r.data
                for r in await session.scalars(select(PreKeyRow).where(PreKeyRow.member == member))
            }
            fresh: dict[tuple[str, int], bytes] = {}
            for prekey in upload.prekeys:
                key = (prekey.kind, prekey.id)
                data = encode(prekey.to_value())
                if key in stored:
                    if stored[key] != data:
                        raise RelayError(
                            "prekey_conflict", 409, "a different prekey with this id is stored"
                        )
                    continue  # the same prekey again: an idempotent retry
                if prekey.id <= marks.get(prekey.kind, -1):
                    raise RelayError(
                        "prekey_replayed", 409, f"{prekey.kind} ids must grow; {prekey.id} is old"
                    )
                fresh[key] = data
            for kind in REPLACED_KINDS:
                ids = [i for (k, i) in fresh if k == kind]
                if ids:
                    newest = max(ids)
                    for i in ids:
                        if i != newest:
                            del fresh[(kind, i)]
                    for k, i in list(stored):
                        if k == kind:
                            del stored[(k, i)]
                    await session.execute(
                        delete(PreKeyRow).where(PreKeyRow.member == member, PreKeyRow.kind == kind)
                    )
            if len(stored) + len(fresh) > max_per_member:
                raise RelayError(
                    "too_many_prekeys",
                    413,
                    f"at most {max_per_member} prekeys may be stored for one member key",
                )
            for (kind, key_id), data in fresh.items():
                session.add(PreKeyRow(member=member, kind=kind, key_id=key_id, data=data))
            for kind in {k for k, _ in fresh}:
                top = max(i for k, i in fresh if k == kind)
                if kind in marks:
                    await session.execute(
                        update(PreKeyMark)
                        .where(PreKeyMark.member == member, PreKeyMark.kind == kind)
                        .values(max_id=max(top, marks[kind]))
                    )
                else:
                    session.add(PreKeyMark(member=member, kind=kind, max_id=top))
            await session.flush()
            kinds = [k for k, _ in stored] + [k for k, _ in fresh]
            return len(fresh), {"opk": kinds.count("opk"), "kem": kinds.count("kem")}

        return await self.commit_once(run)

    async def _take_one(self, session: AsyncSession, member: bytes, kind: str) -> bytes | None:
        """Delete and return the lowest-id one-time prekey of ``kind``, atomically."""
        if self.is_sqlite:
            lowest = (
                select(func.min(PreKeyRow.key_id))
                .where(PreKeyRow.member == member, PreKeyRow.kind == kind)
                .scalar_subquery()
            )
            return await session.scalar(
                delete(PreKeyRow)
                .where(
                    PreKeyRow.member == member, PreKeyRow.kind == kind, PreKeyRow.key_id == lowest
                )
                .returning(PreKeyRow.data)
            )
        key_id = await session.scalar(
            select(PreKeyRow.key_id)
            .where(PreKeyRow.member == member, PreKeyRow.kind == kind)
            .order_by(PreKeyRow.key_id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if key_id is None:
            return None
        return await session.scalar(
            delete(PreKeyRow)
            .where(PreKeyRow.member == member, PreKeyRow.kind == kind, PreKeyRow.key_id == key_id)
            .returning(PreKeyRow.data)
        )

    async def claim_prekeys(self, target: bytes, claimer: bytes) -> bytes:
        """A bundle for ``target``, consuming one-time prekeys; ``claimer`` must share a room."""

        async def run(session: AsyncSession) -> bytes:
            a, b = aliased(RoomMember), aliased(RoomMember)
            shared = await session.execute(
                select(a.dh)
                .join(b, and_(a.room_id == b.room_id))
                .where(
                    a.member == target,
                    a.left_pos.is_(None),
                    b.member == claimer,
                    b.left_pos.is_(None),
                )
                .limit(1)
            )
            row = shared.first()
            if row is None:
                raise RelayError("not_authorized", 403, "you share no room with that member")
            spk = await session.scalar(
                select(PreKeyRow.data)
                .where(PreKeyRow.member == target, PreKeyRow.kind == "spk")
                .order_by(PreKeyRow.key_id.desc())
                .limit(1)
            )
            last_resort = await session.scalar(
                select(PreKeyRow.data)
                .where(PreKeyRow.member == target, PreKeyRow.kind == "kem-lr")
                .order_by(PreKeyRow.key_id.desc())
                .limit(1)
            )
            if spk is None:
                raise RelayError("no_prekeys", 404, "that member has no signed prekey here")
            kem = await self._take_one(session, target, "kem") or last_resort
            if kem is None:
                raise RelayError("no_prekeys", 404, "that member has no KEM prekey here")
            opk = await self._take_one(session, target, "opk")
            bundle = PreKeyBundle(
                member=MemberPublicKey(sign=target, dh=row.dh),
                spk=PreKey.from_value(decode(spk)),
                kem=PreKey.from_value(decode(kem)),
                opk=PreKey.from_value(decode(opk)) if opk is not None else None,
            )
            return bundle.to_bytes()

        return await self.commit_once(run)
