"""In-process queue for the all-in-one process: asyncio only, no Redis.

The API and the embedded worker share one event loop, so plain dicts guarded by that loop are
enough; waiters are woken by per-job events, workers by a condition. Jobs are handed out in the
tenant-fair order (`fair.py`), owners are held to their quotas and jobs to their deadlines
(`policy.py`), and every byte is counted in one budget shared with the subject store (`budget.py`),
whose expired entries free their memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable

from service.queue.blobs import stored_size
from service.queue.budget import ByteBudget, Holding
from service.queue.fair import Entry, FairOrder
from service.queue.policy import QueuePolicy, Throughput, deadline_refusal, quota_refusal
from service.queue.protocol import (
    PROGRESS_EVENTS_KEPT,
    JobProgress,
    JobRecord,
    JobSpec,
    JobState,
    QueueFullError,
    QueueUsage,
    StepSignals,
    TakenJob,
    TierUsage,
)


def _event_key(event_id: str) -> tuple[int, int]:
    first, _, second = event_id.partition("-")
    return int(first), int(second)


class InProcessQueue:
    """The `JobQueue` of one process. Tokens are job ids (one delivery per job)."""

    def __init__(
        self,
        max_depth: int,
        max_bytes: int,
        retry_after_s: int,
        result_ttl_s: float,
        worker_ttl_s: float,
        policy: QueuePolicy | None = None,
    ) -> None:
        self._max_depth = max_depth
        self._retry_after_s = retry_after_s
        self._result_ttl_s = result_ttl_s
        self._worker_ttl_s = worker_ttl_s
        self._policy = policy or QueuePolicy()
        # Bytes each job holds: its payload while unfinished, then its result until it expires.
        self.budget = ByteBudget(max_bytes)
        self.budget.on_expired("result", self._forget_job)
        self._fair = FairOrder(self._policy.batch_max_wait_s)
        self._throughput = Throughput()
        self._specs: dict[str, JobSpec] = {}  # unfinished jobs
        self._handed: dict[str, Entry] = {}  # handed to a worker, not finished: its place if given back
        self._records: dict[str, JobRecord] = {}
        self._idempotency: dict[str, str] = {}
        self._idempotency_of: dict[str, str] = {}
        self._owner_jobs: Counter[str] = Counter()
        self._owner_cost: dict[str, float] = {}
        self._tier_jobs: Counter[str] = Counter()
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
        self.budget.purge(time.time())

    def _forget_job(self, job_id: str, holding: Holding) -> None:
        """A finished job's record expired: drop everything kept of it."""
        for store in (self._records, self._finished_events, self._events, self._event_posted):
            store.pop(job_id, None)
        key = self._idempotency_of.pop(job_id, None)
        if key is not None:
            self._idempotency.pop(key, None)
        self._forget_owner_if_idle(holding.owner)

    def _forget_owner_if_idle(self, owner: str) -> None:
        if owner and not self._owner_jobs[owner] and not self.budget.holds_anything(owner):
            self._owner_jobs.pop(owner, None)
            self._owner_cost.pop(owner, None)
            self._fair.forget(owner)

    async def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> JobRecord:
        self._purge()
        if idempotency_key and idempotency_key in self._idempotency:
            return self._records[self._idempotency[idempotency_key]]
        depth = await self.depth()
        if depth >= self._max_depth:
            raise QueueFullError(f"the queue holds {depth} jobs, its limit", self._retry_after_s)
        size, held = stored_size(spec), self.budget.held
        if held + size > self.budget.max_bytes:
            raise QueueFullError.for_bytes(held, size, self.budget.max_bytes, self._retry_after_s)
        cost = spec.cost
        refusal = quota_refusal(
            self._policy.quota(spec.tier),
            self._owner_jobs[spec.owner],
            self.budget.owner_bytes(spec.owner),
            self._owner_cost.get(spec.owner, 0.0),
            size,
            cost,
            self._retry_after_s,
        )
        now = time.time()
        if refusal is None and self._policy.deadline_admission:
            ahead = self._fair.cost_ahead(spec.owner, spec.priority)
            refusal = deadline_refusal(ahead, cost, self._throughput.seconds_per_cost, now, spec.deadline)
        if refusal is not None:
            raise refusal
        if not depth:
            self._throughput.busy_from(now)
        self.budget.hold(spec.id, size, "job", spec.owner, spec.tier)
        self._owner_jobs[spec.owner] += 1
        self._owner_cost[spec.owner] = self._owner_cost.get(spec.owner, 0.0) + cost
        self._tier_jobs[spec.tier] += 1
        record = spec.record(JobState.QUEUED)
        self._specs[spec.id] = spec
        self._records[spec.id] = record
        self._finished_events[spec.id] = asyncio.Event()
        if idempotency_key:
            self._idempotency[idempotency_key] = spec.id
            self._idempotency_of[spec.id] = idempotency_key
        self._fair.push(spec.id, spec.owner, spec.priority, cost, spec.weight, now)
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
        self._fair.remove(job_id)  # else a worker holds it and will skip it at start
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
        return self._fair.position(job_id) or 0  # 0: taken by a worker, not yet started

    async def watch(self, job_id: str, previews: bool, ttl_s: float) -> None:
        if not previews:
            return
        now = time.monotonic()
        for lapsed in [other for other, until in self._watched.items() if until <= now]:
            del self._watched[lapsed]
        self._watched[job_id] = now + ttl_s

    async def depth(self) -> int:
        return len(self._specs)

    async def held_bytes(self) -> int:
        self._purge()
        return self.budget.held

    async def usage(self, tiers: list[str]) -> QueueUsage:
        self._purge()
        return QueueUsage(
            tiers={
                tier: TierUsage(jobs=self._tier_jobs[tier], bytes=self.budget.tier_bytes(tier))
                for tier in tiers
            },
            seconds_per_cost=self._throughput.seconds_per_cost,
        )

    @property
    def retry_after_s(self) -> int:
        return self._retry_after_s

    async def ready_workers(self) -> int:
        now = time.monotonic()
        return sum(seen > now - self._worker_ttl_s for seen in self._workers.values())

    async def ping(self) -> bool:
        return True

    async def take(self, worker: str, max_jobs: int, block_s: float) -> list[TakenJob]:
        if not len(self._fair):
            async with self._work_available:
                try:
                    await asyncio.wait_for(self._work_available.wait_for(self._has_pending), block_s)
                except TimeoutError:
                    return []
        taken: list[TakenJob] = []
        while len(taken) < max_jobs and (entry := self._fair.pop(time.time())) is not None:
            self._handed[entry.job_id] = entry
            taken.append(TakenJob(spec=self._specs[entry.job_id], token=entry.job_id))
        return taken

    def _has_pending(self) -> bool:
        return bool(len(self._fair))

    async def start(self, worker: str, job: TakenJob) -> bool:
        record = self._records.get(job.spec.id)
        if record is None or record.state.finished:
            return False
        self._records[job.spec.id] = record.model_copy(update={"state": JobState.RUNNING, "worker": worker})
        return True

    async def finish(self, job: TakenJob, record: JobRecord) -> None:
        if job.spec.id not in self._specs:
            return  # already ended (cancelled while taken): its terminal record stays
        done_cost = job.spec.cost if record.state == JobState.DONE else 0.0
        self._throughput.finished(time.time(), done_cost)
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
        if record is None or record.state.finished:
            return
        self._records[job.spec.id] = record.model_copy(update={"state": JobState.QUEUED, "worker": None})
        entry = self._handed.pop(job.spec.id, None)
        if entry is not None and job.spec.id not in self._fair:  # it waits again in its place
            self._fair.restore(entry, time.time())
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
        """Store a terminal record: the job's payload gives way to its result until it expires."""
        spec = self._specs.pop(job_id)
        self._handed.pop(job_id, None)
        self._records[job_id] = record
        self._cancel_requested.discard(job_id)
        self._owner_jobs[spec.owner] -= 1
        self._owner_cost[spec.owner] = max(0.0, self._owner_cost.get(spec.owner, 0.0) - spec.cost)
        self._tier_jobs[spec.tier] -= 1
        size = stored_size(record.result) if record.result is not None else 0
        self.budget.hold(job_id, size, "result", spec.owner, spec.tier, time.time() + self._result_ttl_s)
        event = self._finished_events.get(job_id)
        if event is not None:
            event.set()
        for listener in self._finished_listeners:
            listener(record)
        return record
