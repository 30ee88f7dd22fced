"""In-process queue for the all-in-one process: asyncio only, no Redis.

The API and the embedded worker share one event loop, so plain dicts guarded by that loop are
enough; waiters are woken by per-job events, workers by a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from service.queue.blobs import stored_size
from service.queue.protocol import (
    PROGRESS_EVENTS_KEPT,
    JobProgress,
    JobRecord,
    JobSpec,
    JobState,
    QueueFullError,
    StepSignals,
    TakenJob,
)


def _event_key(event_id: str) -> tuple[int, int]:
    first, _, second = event_id.partition("-")
    return int(first), int(second)


class InProcessQueue:
    """The `JobQueue` of one process. Tokens are job ids (one delivery per job)."""

    def __init__(
        self, max_depth: int, max_bytes: int, retry_after_s: int, result_ttl_s: float, worker_ttl_s: float
    ) -> None:
        self._max_depth = max_depth
        self._max_bytes = max_bytes
        self._retry_after_s = retry_after_s
        self._result_ttl_s = result_ttl_s
        self._worker_ttl_s = worker_ttl_s
        self._specs: dict[str, JobSpec] = {}
        self._records: dict[str, JobRecord] = {}
        self._expires: dict[str, float] = {}
        # Bytes each job holds against `max_bytes`: its payload until it ends, then its result.
        self._sizes: dict[str, int] = {}
        self._idempotency: dict[str, str] = {}
        self._pending: deque[str] = deque()
        # Acceptance order of unfinished jobs (queue positions).
        self._order: dict[str, int] = {}
        self._accepted = 0
        # Running jobs whose cancellation was requested (their worker ends them at a step boundary).
        self._cancel_requested: set[str] = set()
        # Jobs watched with previews -> when that watch lapses (monotonic).
        self._watched: dict[str, float] = {}
        # Each job's newest progress events, and an event set (then replaced) at every new one.
        self._events: dict[str, deque[tuple[str, JobProgress]]] = {}
        self._event_posted: dict[str, asyncio.Event] = {}
        self._event_seq = 0
        self._finished_events: dict[str, asyncio.Event] = {}
        self._work_available = asyncio.Condition()
        self._workers: dict[str, float] = {}
        self._finished_listeners: list[Callable[[JobRecord], None]] = []

    def on_finished(self, listener: Callable[[JobRecord], None]) -> None:
        """Call `listener` with every terminal record as it is stored (the webhook outbox)."""
        self._finished_listeners.append(listener)

    def _purge(self) -> None:
        now = time.monotonic()
        for job_id in [job_id for job_id, expires in self._expires.items() if expires < now]:
            stores = (self._records, self._specs, self._expires, self._finished_events, self._sizes)
            for store in (*stores, self._events, self._event_posted):
                store.pop(job_id, None)
        for key in [key for key, job_id in self._idempotency.items() if job_id not in self._records]:
            del self._idempotency[key]

    async def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> JobRecord:
        self._purge()
        if idempotency_key and idempotency_key in self._idempotency:
            return self._records[self._idempotency[idempotency_key]]
        depth = await self.depth()
        if depth >= self._max_depth:
            raise QueueFullError(f"the queue holds {depth} jobs, its limit", self._retry_after_s)
        size, held = stored_size(spec), await self.held_bytes()
        if held + size > self._max_bytes:
            raise QueueFullError.for_bytes(held, size, self._max_bytes, self._retry_after_s)
        self._sizes[spec.id] = size
        record = spec.record(JobState.QUEUED)
        self._specs[spec.id] = spec
        self._records[spec.id] = record
        self._finished_events[spec.id] = asyncio.Event()
        if idempotency_key:
            self._idempotency[idempotency_key] = spec.id
        self._pending.append(spec.id)
        self._order[spec.id] = self._accepted
        self._accepted += 1
        async with self._work_available:
            self._work_available.notify()
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        self._purge()
        return self._records.get(job_id)

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        event = self._finished_events.get(job_id)
        if event is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=max(timeout_s, 0.0))
        return self._records.get(job_id)

    async def cancel(self, job_id: str) -> JobRecord | None:
        record = self._records.get(job_id)
        if record is not None and record.state == JobState.RUNNING:
            self._cancel_requested.add(job_id)
        if record is None or record.state != JobState.QUEUED:
            return record
        if job_id in self._pending:  # else a worker holds it and will skip it at start
            self._pending.remove(job_id)
        return self._store(job_id, record.model_copy(update={"state": JobState.CANCELLED}))

    async def events(self, job_id: str, after: str | None, block_s: float) -> list[tuple[str, JobProgress]]:
        if job_id not in self._records:
            return []
        newer = self._events_after(job_id, after)
        if newer or block_s <= 0:
            return newer
        posted = self._event_posted.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(posted.wait(), block_s)
        return self._events_after(job_id, after)

    def _events_after(self, job_id: str, after: str | None) -> list[tuple[str, JobProgress]]:
        kept = self._events.get(job_id, ())
        if after is None:
            return list(kept)
        return [(event_id, event) for event_id, event in kept if _event_key(event_id) > _event_key(after)]

    async def position(self, job_id: str) -> int | None:
        record = self._records.get(job_id)
        if record is None or record.state != JobState.QUEUED:
            return None
        mine = self._order[job_id]
        return sum(
            order < mine and self._records[other].state == JobState.QUEUED
            for other, order in self._order.items()
        )

    async def watch(self, job_id: str, previews: bool, ttl_s: float) -> None:
        if not previews:
            return
        now = time.monotonic()
        for lapsed in [other for other, until in self._watched.items() if until <= now]:
            del self._watched[lapsed]
        self._watched[job_id] = now + ttl_s

    async def depth(self) -> int:
        return sum(not record.state.finished for record in self._records.values())

    async def held_bytes(self) -> int:
        self._purge()
        return sum(self._sizes.values())

    def hold_bytes(self, key: str, size: int, ttl_s: float) -> None:
        """Count `size` bytes kept `ttl_s` under `key` (a subject or its tokens, service/subjects)
        against the byte budget, replacing what `key` held; QueueFullError when they would pass it."""
        self._purge()
        held = sum(self._sizes.values()) - self._sizes.get(key, 0)
        if held + size > self._max_bytes:
            raise QueueFullError.for_bytes(held, size, self._max_bytes, self._retry_after_s)
        self._sizes[key] = size
        self._expires[key] = time.monotonic() + ttl_s

    @property
    def retry_after_s(self) -> int:
        return self._retry_after_s

    def release_bytes(self, key: str) -> None:
        self._sizes.pop(key, None)
        self._expires.pop(key, None)

    async def ready_workers(self) -> int:
        now = time.monotonic()
        return sum(seen > now - self._worker_ttl_s for seen in self._workers.values())

    async def ping(self) -> bool:
        return True

    async def take(self, worker: str, max_jobs: int, block_s: float) -> list[TakenJob]:
        if not self._pending:
            async with self._work_available:
                try:
                    await asyncio.wait_for(self._work_available.wait_for(self._has_pending), block_s)
                except TimeoutError:
                    return []
        taken: list[TakenJob] = []
        while self._pending and len(taken) < max_jobs:
            job_id = self._pending.popleft()
            taken.append(TakenJob(spec=self._specs[job_id], token=job_id))
        return taken

    def _has_pending(self) -> bool:
        return bool(self._pending)

    async def start(self, worker: str, job: TakenJob) -> bool:
        record = self._records.get(job.spec.id)
        if record is None or record.state.finished:
            return False
        self._records[job.spec.id] = record.model_copy(update={"state": JobState.RUNNING, "worker": worker})
        return True

    async def finish(self, job: TakenJob, record: JobRecord) -> None:
        self._store(job.spec.id, record)

    async def step_signals(self, job_ids: list[str]) -> StepSignals:
        now = time.monotonic()
        return StepSignals(
            cancelled={job_id for job_id in job_ids if job_id in self._cancel_requested},
            watched={job_id for job_id in job_ids if self._watched.get(job_id, 0.0) > now},
        )

    async def publish_progress(self, job_id: str, progress: JobProgress) -> None:
        record = self._records.get(job_id)
        if record is None or record.state != JobState.RUNNING:
            return
        self._event_seq += 1
        kept = self._events.setdefault(job_id, deque(maxlen=PROGRESS_EVENTS_KEPT))
        kept.append((f"{self._event_seq}-0", progress))
        posted = self._event_posted.pop(job_id, None)
        if posted is not None:
            posted.set()

    async def release(self, job: TakenJob) -> None:
        record = self._records.get(job.spec.id)
        if record is not None and not record.state.finished:
            self._records[job.spec.id] = record.model_copy(update={"state": JobState.QUEUED, "worker": None})
            self._pending.appendleft(job.spec.id)
            async with self._work_available:
                self._work_available.notify()

    async def heartbeat(self, worker: str, ready: bool, in_flight: list[TakenJob]) -> None:
        if ready:
            self._workers[worker] = time.monotonic()
        else:
            self._workers.pop(worker, None)

    async def close(self) -> None:
        self._workers.clear()

    def _store(self, job_id: str, record: JobRecord) -> JobRecord:
        self._records[job_id] = record
        self._order.pop(job_id, None)
        self._cancel_requested.discard(job_id)
        self._expires[job_id] = time.monotonic() + self._result_ttl_s
        self._sizes[job_id] = stored_size(record.result) if record.result is not None else 0
        self._specs.pop(job_id, None)
        event = self._finished_events.get(job_id)
        if event is not None:
            event.set()
        for listener in self._finished_listeners:
            listener(record)
        return record
