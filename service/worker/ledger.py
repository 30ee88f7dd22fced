"""What a worker holds, from a delivery to its terminal record, and the one way a job ends.

Every delivery taken and not yet finished or returned is `held` (by token: heartbeats keep it
claimed). A held job is `ready` once prepared, `starting` once marked running in the queue (it
joins at the next step boundary), then `running` until its rows leave. Whatever way a held job
ends (finished in any state, returned to the queue), `forget` releases what its preparation
holds (its LoRA adapters), once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from engines.step_scheduler import Prepared
from realcustom.jobs import GenerationJob, GenerationOutput
from service import metrics
from service.queue.protocol import JobQueue, JobResult, JobSpec, JobState, QueueUnavailableError, TakenJob
from service.worker.convert import to_result

logger = logging.getLogger(__name__)

# Back-off while the queue is unreachable (Redis restarting).
RETRY_DELAY_S = 0.5


class Held:
    """A job this worker holds, from its delivery to its terminal record."""

    def __init__(self, taken: TakenJob, prepared: Prepared | None = None, ready_at: int = 0) -> None:
        self.taken = taken
        self.prepared = prepared
        self.ready_at = ready_at  # the step boundary it became ready at (the planner's clock)
        self.joined_at = 0.0  # perf_counter at its first step
        self.watched = False

    @property
    def id(self) -> str:
        return self.taken.spec.id

    @property
    def spec(self) -> JobSpec:
        return self.taken.spec

    @property
    def job(self) -> GenerationJob:
        return self.prepared.job


class Ledger:
    """The jobs of one worker and their stages; stores results and terminal records."""

    def __init__(self, queue: JobQueue, name: str, release: Callable[[Prepared], None] | None = None) -> None:
        self.queue = queue
        self.name = name
        self.held: dict[str, TakenJob] = {}
        self.prepared: dict[str, Prepared] = {}  # by token: held jobs whose preparation holds resources
        self._release = release
        self.ready: list[Held] = []  # prepared, not started, in arrival order
        self.starting: list[Held] = []  # started in the queue, joining at the next boundary
        self.running: dict[str, Held] = {}
        self.room = asyncio.Event()  # intake may take more
        self.wake = asyncio.Event()  # a job became ready
        self.stores: set[asyncio.Task] = set()
        self._classes: set[tuple[str, str]] = set()  # key classes whose rows gauge was set

    def forget(self, taken: TakenJob) -> None:
        self.held.pop(taken.token, None)
        prepared = self.prepared.pop(taken.token, None)
        if prepared is not None and self._release is not None:
            self._release(prepared)
        self.room.set()

    async def finish(
        self, taken: TakenJob, state: JobState, error: str | None = None, result: JobResult | None = None
    ) -> None:
        spec = taken.spec
        record = spec.record(state, worker=self.name, error=error, result=result)
        # The result must be stored before the delivery is acknowledged: retry through outages.
        while True:
            try:
                await self.queue.finish(taken, record)
                self.forget(taken)
                break
            except QueueUnavailableError as outage:
                logger.warning("storing job %s failed (%s); retrying", spec.id, outage)
                await asyncio.sleep(RETRY_DELAY_S)
        metrics.JOBS_FINISHED.labels(state.value).inc()

    def store(self, held: Held, output: GenerationOutput) -> None:
        """Encode and store a finished job in a task, so the next step does not wait for it."""
        metrics.INFERENCE_SECONDS.observe(output.inference_seconds)
        queue_wait = max(0.0, time.time() - output.inference_seconds - held.spec.enqueued_at)

        async def store() -> None:
            prepare_s = held.prepared.prepare_s
            result = await asyncio.to_thread(to_result, held.spec, output, queue_wait, self.name, prepare_s)
            await self.finish(held.taken, JobState.DONE, result=result)

        task = asyncio.create_task(store())
        self.stores.add(task)
        task.add_done_callback(self.stores.discard)

    def rows_by_class(self) -> None:
        """`realcustom_rows_in_flight{tier,priority}` from the running jobs."""
        rows: dict[tuple[str, str], int] = {}
        for held in self.running.values():
            labels = metrics.key_class(held.spec.tier, held.spec.priority)
            key = (labels["tier"], labels["priority"])
            rows[key] = rows.get(key, 0) + held.prepared.rows
        for tier, priority in set(rows) | self._classes:
            metrics.ROWS_IN_FLIGHT.labels(tier=tier, priority=priority).set(rows.get((tier, priority), 0))
        self._classes |= set(rows)
