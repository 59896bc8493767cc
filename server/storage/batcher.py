"""Group commit: many small, independent writes in one transaction.

Moved out of :mod:`.engine`, which makes the engines this runs on.

A write is answered either through a future (``submit``, ``submit_bulk``) or,
for the hot path, through a callback (``post_bulk``). The callback is called on
the event loop in the same turn that learns of the commit, straight from the
group-commit thread's hand-off: a room message's ``sent`` and its fan-out then
cost no task, no future and no extra turns of the loop between the disk and
the sockets (issue 14: latency at half load).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from ..errors import RelayError
from ..logging import get_logger
from .health import WriteHealth, busy, storage_unavailable, unavailable

log = get_logger("backchannel.relay.storage")

T = TypeVar("T")

#: How a write posted with :meth:`Batcher.post_bulk` is answered: ``(True,
#: outcome)`` or ``(False, RelayError)``, once, on the event loop.
Done = Callable[[bool, Any], None]

#: Runs a whole batch's worth of one kind of write at once, as synchronous code
#: on a session (on SQLite on the batcher's own thread, else through
#: ``run_sync``): gets their items in arrival order and returns one outcome per
#: item, a :class:`RelayError` for an item refused. It must refuse items only
#: before writing anything for them, since there is no savepoint to roll back
#: to, and raise only for what should abort the batch (an unexpected database
#: error).
BulkRun = Callable[[Session, list[Any]], list[Any]]


@dataclass(slots=True)
class _Job:
    run: Callable[[AsyncSession], Awaitable[Any]] | None
    future: asyncio.Future[Any] | None
    bulk: BulkRun | None = None
    item: Any = None
    done: Done | None = None

    def answer(self, ok: bool, value: Any) -> None:
        """Answer the writer once; later answers (a retry's) are ignored."""
        future = self.future
        if future is not None:
            if not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            return
        done, self.done = self.done, None
        if done is None:
            return
        try:
            done(ok, value)
        except Exception as exc:
            # One writer's reply must not keep the rest of the batch unanswered.
            log.error("batch.callback_failed", error=type(exc).__name__)


class Batcher:
    """Group commit for small, independent writes.

    Each job runs inside the shared transaction. A job that raises
    :class:`RelayError` (a limit, a bad reference) is answered with that error
    and the batch goes on; an unexpected database error aborts the batch, and
    every job in it is retried alone so that one bad write never fails others.

    Jobs submitted with :meth:`submit_bulk` or :meth:`post_bulk` skip the
    per-job savepoint: all the batch's jobs of one :data:`BulkRun` are handed to
    it in one call, so a kind of write that is most of the traffic (room
    messages) costs a few statements per batch rather than several per job.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        window: float,
        max_jobs: int,
        lock: asyncio.Lock | None = None,
        on_commit: Callable[[int, float], None] | None = None,
        depth: int = 4096,
        health: WriteHealth | None = None,
        direct: sessionmaker[Session] | None = None,
    ) -> None:
        self._sessions = sessions
        #: Batches of bulk writes run whole on this thread (see make_direct_writer).
        self._direct = direct
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="group-commit") if direct is not None else None
        )
        self.health = health or WriteHealth()
        self._committing = False
        self.on_commit = on_commit
        self._window = window
        self._max = max_jobs
        self._lock = lock
        # Bounded: a full queue answers `busy` at once, rather than holding every
        # waiting writer's data in memory behind a slow or stuck disk.
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(depth)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="group-commit")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            # A commit already on the thread finishes (bounded by the busy timeout)
            # before the engine under it is disposed.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        while not self._queue.empty():
            self._queue.get_nowait().answer(False, RelayError("shutting_down", 503))

    async def submit(self, run: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await self._enqueue(run, None, None)  # type: ignore[no-any-return]

    async def submit_bulk(self, bulk: BulkRun, item: Any) -> Any:
        """Enqueue ``item`` for ``bulk``; its outcome, or the error it was refused with."""
        return await self._enqueue(None, bulk, item)

    def post_bulk(self, bulk: BulkRun, item: Any, done: Done) -> None:
        """Enqueue ``item`` for ``bulk``, to be answered through ``done``.

        Raises :class:`RelayError` at once (``busy``, ``storage_unavailable``)
        when it is not taken; once taken, ``done`` is called exactly once."""
        self._put(_Job(None, None, bulk, item, done))

    async def _enqueue(
        self, run: Callable[[AsyncSession], Awaitable[Any]] | None, bulk: BulkRun | None, item: Any
    ) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put(_Job(run, future, bulk, item))
        return await future

    def _put(self, job: _Job) -> None:
        if self.health.failing and self._committing:
            # The write in progress finds out whether the database is back; queueing
            # behind it would answer this one a busy timeout late, for nothing.
            raise storage_unavailable()
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise busy() from None

    async def _loop(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            deadline = time.monotonic() + self._window
            while len(jobs) < self._max:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                    else:
                        jobs.append(self._queue.get_nowait())
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            started = time.monotonic()
            self._committing = True
            try:
                await self._commit(jobs)
            finally:
                self._committing = False
            if self.on_commit is not None:
                self.on_commit(len(jobs), time.monotonic() - started)

    async def _commit(self, jobs: list[_Job]) -> None:
        if self._direct is not None and all(job.bulk is not None for job in jobs):
            await self._commit_direct(jobs)
            return
        results: list[tuple[_Job, bool, Any]] = []
        try:
            async with (
                self._lock if self._lock else contextlib.nullcontext(),
                self._sessions() as session,
                session.begin(),
            ):
                groups: dict[BulkRun, list[_Job]] = {}
                for job in jobs:
                    if job.bulk is not None:
                        groups.setdefault(job.bulk, []).append(job)
                        continue
                    assert job.run is not None
                    try:
                        async with session.begin_nested():
                            results.append((job, True, await job.run(session)))
                    except RelayError as exc:
                        results.append((job, False, exc))
                for bulk, group in groups.items():
                    outcomes = await session.run_sync(bulk, [job.item for job in group])
                    for job, outcome in zip(group, outcomes, strict=True):
                        results.append((job, not isinstance(outcome, RelayError), outcome))
        except Exception as exc:
            await self._failed(jobs, exc)
            return
        self._resolve(results)

    async def _commit_direct(self, jobs: list[_Job]) -> None:
        """A batch of bulk writes only: the transaction runs whole on our thread."""
        assert self._executor is not None
        groups: dict[BulkRun, list[_Job]] = {}
        for job in jobs:
            assert job.bulk is not None
            groups.setdefault(job.bulk, []).append(job)
        loop = asyncio.get_running_loop()
        retried = False
        while True:
            landed: asyncio.Future[Exception | None] = loop.create_future()
            async with self._lock if self._lock else contextlib.nullcontext():
                self._executor.submit(self._run_direct, loop, groups, landed)
                failure = await landed
            if failure is None:
                return
            if not retried and isinstance(failure, DBAPIError) and failure.connection_invalidated:
                # A pooled connection the server had closed (a restart): once
                # more on a new one, rather than a ping before every batch. A
                # batch is safe to run twice: what the first run stored comes
                # back as stored before.
                retried = True
                continue
            await self._failed(jobs, failure)
            return

    def _run_direct(
        self,
        loop: asyncio.AbstractEventLoop,
        groups: dict[BulkRun, list[_Job]],
        landed: asyncio.Future[Exception | None],
    ) -> None:
        """On the group-commit thread: run and commit, then hand the outcomes to
        the loop in one callback that answers every writer (see the module)."""
        assert self._direct is not None
        outcomes: list[list[Any]] | None = None
        failure: Exception | None = None
        try:
            with self._direct() as session, session.begin():
                found = [bulk(session, [job.item for job in g]) for bulk, g in groups.items()]
            outcomes = found  # only once the COMMIT (where a full disk shows) returned
        except Exception as exc:
            failure = exc
        with contextlib.suppress(RuntimeError):  # the loop closed under a shutdown
            loop.call_soon_threadsafe(self._landed, groups, outcomes, failure, landed)

    def _landed(
        self,
        groups: dict[BulkRun, list[_Job]],
        outcomes: list[list[Any]] | None,
        failure: Exception | None,
        landed: asyncio.Future[Exception | None],
    ) -> None:
        try:
            if outcomes is not None:
                results: list[tuple[_Job, bool, Any]] = []
                for group, found in zip(groups.values(), outcomes, strict=True):
                    for job, outcome in zip(group, found, strict=True):
                        results.append((job, not isinstance(outcome, RelayError), outcome))
                self._resolve(results)
        finally:
            if not landed.done():  # it is if the batcher was stopped meanwhile
                landed.set_result(failure)

    async def _failed(self, jobs: list[_Job], exc: Exception) -> None:
        """Nothing of ``jobs`` was committed: answer them, or retry each alone."""
        if len(jobs) == 1 or unavailable(exc):
            # Nothing was committed: every caller gets a clear error, nobody hangs.
            if unavailable(exc):
                self.health.failed(exc)
                # What queued behind this write would only wait to fail the same way.
                while not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
            for job in jobs:
                job.answer(False, storage_unavailable())
            return
        for job in jobs:
            await self._commit([job])

    def _resolve(self, results: list[tuple[_Job, bool, Any]]) -> None:
        self.health.succeeded()
        for job, ok, value in results:
            job.answer(ok, value)


