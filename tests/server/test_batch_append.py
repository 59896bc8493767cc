"""Room messages appended a batch at a time (issue 14): one group commit holds many
sends, yet each is answered as if it had been stored alone — refusals per message,
consecutive sequence numbers for the rest, a send repeated inside the batch
answered with the original."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backchannel.server.errors import RelayError
from backchannel.server.migrate import upgrade
from backchannel.server.storage import Quotas, Store, make_engine
from backchannel.server.storage.models import Room, RoomMember, RoomMessage

QUOTA = 1000


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    engine = make_engine(database_url)
    await upgrade(engine)
    store = Store(engine, batch_window=0, batch_max=256, quotas=Quotas(max_room_bytes=QUOTA))
    store.batches = []  # type: ignore[attr-defined]
    store.batcher.on_commit = lambda n, _took: store.batches.append(n)  # type: ignore[attr-defined]
    await store.start()
    yield store
    await store.close()


async def make_room(store: Store, members: dict[bytes, tuple[str, int | None]]) -> bytes:
    room = os.urandom(32)
    async with store.transaction() as session:
        session.add(
            Room(
                id=room,
                head=os.urandom(32),
                log_len=1,
                last_seq=0,
                retention_seconds=86_400,
                created_at=0,
                state=b"",
                state_len=0,
                stored_bytes=0,
            )
        )
        for key, (role, left_pos) in members.items():
            session.add(
                RoomMember(
                    room_id=room, member=key, dh=os.urandom(32), role=role, left_pos=left_pos
                )
            )
    return room


async def one_batch(store: Store, sends: list[Awaitable[Any]]) -> list[Any]:
    """Run ``sends`` in one group commit: they queue while the committer is held."""
    release = asyncio.Event()

    async def hold(_session: AsyncSession) -> None:
        await release.wait()

    holding = asyncio.create_task(store.batcher.submit(hold))
    await asyncio.sleep(0.05)
    before = len(store.batches)  # type: ignore[attr-defined]
    tasks = [asyncio.ensure_future(s) for s in sends]
    await asyncio.sleep(0.05)
    release.set()
    await holding
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert store.batches[before + 1 :] == [len(sends)]  # type: ignore[attr-defined]
    return results


async def stored(store: Store, room: bytes) -> tuple[list[tuple[int, bytes]], int, int]:
    """The room's messages as ``(seq, data)``, its ``last_seq`` and its ``stored_bytes``."""
    async with store.reading() as session:
        rows = await session.execute(
            select(RoomMessage.seq, RoomMessage.data)
            .where(RoomMessage.room_id == room)
            .order_by(RoomMessage.seq)
        )
        marks = (
            await session.execute(select(Room.last_seq, Room.stored_bytes).where(Room.id == room))
        ).one()
    return [(r.seq, r.data) for r in rows], marks.last_seq, marks.stored_bytes


def code(outcome: Any) -> str:
    return outcome.code if isinstance(outcome, RelayError) else "sent"


async def test_refusals_inside_one_batch_leave_the_rest_numbered(store: Store) -> None:
    fac, obs, gone, stranger = (os.urandom(32) for _ in range(4))
    room = await make_room(
        store, {fac: ("facilitator", None), obs: ("observer", None), gone: ("participant", 3)}
    )
    other = await make_room(store, {fac: ("facilitator", None)})
    append: Callable[..., Awaitable[Any]] = store.append_room_message
    plan = [
        (room, fac, b"a" * 400),
        (room, stranger, b"s" * 10),
        (room, fac, b"b" * 700),  # 400 + 700 > QUOTA
        (other, fac, b"o" * 10),
        (room, obs, b"v" * 10),
        (room, fac, b"c" * 500),  # 900: what fits after a refusal still goes in
        (room, gone, b"g" * 10),
        (room, fac, b"d" * 200),  # 1100 > QUOTA
        (other, fac, b"p" * 10),
        (room, fac, b"e" * 100),  # exactly the quota
    ]
    results = await one_batch(store, [append(r, s, os.urandom(16), d) for r, s, d in plan])
    assert [code(r) for r in results] == [
        "sent",
        "not_authorized",
        "quota_exceeded",
        "sent",
        "not_authorized",
        "sent",
        "not_authorized",
        "quota_exceeded",
        "sent",
        "sent",
    ]
    assert [(m.seq, fresh) for m, fresh in (results[i] for i in (0, 5, 9))] == [
        (1, True),
        (2, True),
        (3, True),
    ]
    assert [results[i][0].seq for i in (3, 8)] == [1, 2]
    assert await stored(store, room) == (
        [(1, b"a" * 400), (2, b"c" * 500), (3, b"e" * 100)],
        3,
        1000,
    )
    assert await stored(store, other) == ([(1, b"o" * 10), (2, b"p" * 10)], 2, 20)
    # Nothing refused left a gap: the next message takes the next number.
    more = await store.append_room_message(other, fac, os.urandom(16), b"q")
    assert more[0].seq == 3


async def test_a_send_repeated_inside_one_batch_is_stored_once(store: Store) -> None:
    fac = os.urandom(32)
    room = await make_room(store, {fac: ("facilitator", None)})
    earlier, cid = os.urandom(16), os.urandom(16)
    first, _ = await store.append_room_message(room, fac, earlier, b"early")
    results = await one_batch(
        store,
        [
            store.append_room_message(room, fac, cid, b"twice"),
            store.append_room_message(room, fac, earlier, b"early"),  # a retry
            store.append_room_message(room, fac, os.urandom(16), b"other"),
            store.append_room_message(room, fac, cid, b"twice"),
        ],
    )
    (once, fresh), (retried, retried_fresh), (other, _), (again, again_fresh) = results
    assert (once.seq, once.data, fresh) == (2, b"twice", True)
    assert (retried.seq, retried.ts, retried_fresh) == (first.seq, first.ts, False)
    assert other.seq == 3
    assert (again.seq, again.ts, again_fresh) == (once.seq, once.ts, False)
    messages, last_seq, used = await stored(store, room)
    assert messages == [(1, b"early"), (2, b"twice"), (3, b"other")]
    assert (last_seq, used) == (3, len(b"early") + len(b"twice") + len(b"other"))


async def test_a_repeat_of_a_refused_send_is_refused_alike(store: Store) -> None:
    fac = os.urandom(32)
    room = await make_room(store, {fac: ("facilitator", None)})
    cid, big = os.urandom(16), b"x" * (QUOTA + 1)
    results = await one_batch(
        store,
        [
            store.append_room_message(room, fac, cid, big),
            store.append_room_message(room, fac, os.urandom(16), b"fits"),
            store.append_room_message(room, fac, cid, big),
        ],
    )
    assert [code(r) for r in results] == ["quota_exceeded", "sent", "quota_exceeded"]
    assert await stored(store, room) == ([(1, b"fits")], 1, 4)


async def test_an_unexpected_error_retries_the_batch_one_by_one(store: Store) -> None:
    """A fault that is not a refusal aborts the whole batch; each send is then tried
    alone, so the others are stored (with no gap) and only the bad one fails."""
    fac = os.urandom(32)
    room = await make_room(store, {fac: ("facilitator", None)})
    bad: Any = None  # not bytes: fails inside the batch, as a driver error would
    results = await one_batch(
        store,
        [
            store.append_room_message(room, fac, os.urandom(16), b"one"),
            store.append_room_message(room, fac, os.urandom(16), bad),
            store.append_room_message(room, fac, os.urandom(16), b"two"),
        ],
    )
    assert [code(r) for r in results] == ["sent", "storage_unavailable", "sent"]
    assert await stored(store, room) == ([(1, b"one"), (2, b"two")], 2, 6)
    assert not store.health.failing


async def test_mailbox_writes_share_a_batch_with_room_messages(store: Store) -> None:
    fac, peer = os.urandom(32), os.urandom(32)
    room = await make_room(store, {fac: ("facilitator", None), peer: ("participant", None)})
    results = await one_batch(
        store,
        [
            store.append_room_message(room, fac, os.urandom(16), b"room"),
            store.mailbox_put(peer, fac, room, os.urandom(16), b"mail", 10),
            store.append_room_message(room, fac, os.urandom(16), b"room 2"),
        ],
    )
    assert [code(r) for r in results] == ["sent"] * 3
    assert [results[0][0].seq, results[2][0].seq] == [1, 2]
    assert results[1][1] is True


async def test_posted_sends_are_answered_once_each_even_when_one_answer_fails(
    store: Store,
) -> None:
    """The hot path's callbacks (``post_room_message``): every send of a batch is
    answered exactly once, in order, in one turn of the loop; an answer that
    raises is logged and neither keeps the others unanswered nor stops the
    group commit."""
    fac = os.urandom(32)
    room = await make_room(store, {fac: ("facilitator", None)})
    answers: list[tuple[int, bool, Any]] = []
    all_in = asyncio.Event()

    def answer(i: int) -> Callable[[bool, Any], None]:
        def done(ok: bool, value: Any) -> None:
            answers.append((i, ok, value))
            if len(answers) == 5:
                all_in.set()
            if i == 1:
                raise RuntimeError("a reply that fails")

        return done

    for i in range(5):
        store.post_room_message(room, fac, os.urandom(16), b"m%d" % i, answer(i))
    await asyncio.wait_for(all_in.wait(), 10)
    assert [i for i, _, _ in answers] == [0, 1, 2, 3, 4]
    assert all(ok for _, ok, _ in answers)
    assert [value[0].seq for _, _, value in answers] == [1, 2, 3, 4, 5]
    assert store.batches == [5]  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    assert len(answers) == 5, "a send was answered twice"
    # The group commit goes on.
    msg, fresh = await store.append_room_message(room, fac, os.urandom(16), b"after")
    assert (msg.seq, fresh) == (6, True)
    # Refused sends are answered too, with the error.
    refused: list[tuple[bool, Any]] = []
    stranger = os.urandom(32)
    store.post_room_message(room, stranger, os.urandom(16), b"x", lambda *a: refused.append(a))
    for _ in range(100):
        if refused:
            break
        await asyncio.sleep(0.01)
    (ok, error), = refused
    assert not ok
    assert isinstance(error, RelayError)
    assert error.code == "not_authorized"
