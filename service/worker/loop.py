"""The worker loop: take jobs, batch compatible ones, run them, store results, acknowledge.

Runs on an asyncio loop; the runner itself runs in a thread, so while a batch computes the loop
keeps heart-beating (which keeps this worker's jobs from being reclaimed) and takes and decodes
the next jobs. Heartbeats alone would keep a hung batch's jobs claimed forever, so each batch has
a compute deadline: past it the jobs are released to other workers and the worker stops with
ComputeDeadlineExceeded (a thread cannot be interrupted; the process exits and is restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from engines.jobs import GenerationJob
from engines.runner import Runner
from service import metrics
from service.queue.protocol import (
    JobQueue,
    JobResult,
    JobState,
    QueueUnavailableError,
    TakenJob,
)
from service.settings import Settings
from service.worker.batcher import PendingJob, next_batch
from service.worker.convert import to_generation_job, to_result
from service.worker.gpu import record_gpu_memory
from service.worker.health import Progress

logger = logging.getLogger(__name__)

# How long one `take` blocks for the first job; bounds how quickly a stop request is noticed.
TAKE_BLOCK_S = 0.5
# Back-off while the queue is unreachable (Redis restarting).
RETRY_DELAY_S = 0.5


class ComputeDeadlineExceeded(Exception):
    """A batch ran past its compute deadline; its jobs were released. The process must exit: the
    thread running the batch cannot be stopped, and the device may be wedged."""


def compute_deadline_s(settings: Settings, jobs: list[GenerationJob]) -> float:
    """The compute deadline of one batch: a fixed part plus an allowance per image step."""
    image_steps = sum(job.num_inference_steps * job.num_images for job in jobs)
    return settings.compute_deadline_s + settings.compute_s_per_image_step * image_steps


class Worker:
    """Serves jobs from `queue` with `runner` until `stop()`; finishes or returns in-flight work."""

    def __init__(
        self, queue: JobQueue, runner: Runner, settings: Settings, name: str, progress: Progress | None = None
    ) -> None:
        self._queue = queue
        self._runner = runner
        self._settings = settings
        self._name = name
        self._backlog: list[PendingJob] = []
        self._engine_stats = metrics.EngineStatsExporter()
        # Every delivery taken and not yet finished or returned, by token: kept claimed by heartbeats.
        self._held: dict[str, TakenJob] = {}
        self._stopping = asyncio.Event()
        self._drain = False
        self.progress = progress or Progress(settings.worker_stall_s)

    def stop(self, drain: bool = False) -> None:
        """Stop after the current batch; with `drain`, only once the queue is empty too."""
        self._drain = drain
        self._stopping.set()
        metrics.WORKER_READY.set(0)  # probes see the stop at once, not after the batch

    async def run(self) -> None:
        self.progress.beat()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat")
        metrics.WORKER_READY.set(1)
        logger.info(
            "worker %s ready (model=%s, backend=%s)",
            self._name,
            self._runner.model_name,
            self._runner.backend_name,
        )
        try:
            while not await self._should_exit():
                try:
                    batch, self._backlog = next_batch(self._backlog, self._settings.max_batch)
                    if not batch:
                        await self._fill_backlog()
                        continue
                    # Take and decode the next jobs while this batch computes.
                    prefetch = asyncio.create_task(self._fill_backlog())
                    try:
                        await self._run_batch(batch)
                    finally:
                        await prefetch
                except QueueUnavailableError as error:
                    logger.warning("queue unavailable (%s); retrying", error)
                    await asyncio.sleep(RETRY_DELAY_S)
        finally:
            metrics.WORKER_READY.set(0)
            await self._return_backlog()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            with contextlib.suppress(QueueUnavailableError):
                await self._queue.heartbeat(self._name, ready=False, in_flight=[])
            logger.info("worker %s stopped", self._name)

    async def _should_exit(self) -> bool:
        if not self._stopping.is_set():
            return False
        if self._drain:
            with contextlib.suppress(QueueUnavailableError):
                return not self._backlog and await self._queue.depth() == 0
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            if not self.progress.busy:  # the loop ticks; a running batch shows progress itself
                self.progress.beat(self.progress.stall_s + self._settings.heartbeat_s)
            try:
                in_flight = list(self._held.values())
                await self._queue.heartbeat(
                    self._name, ready=not self._stopping.is_set(), in_flight=in_flight
                )
            except QueueUnavailableError as error:
                logger.warning("heartbeat failed: %s", error)
            await asyncio.sleep(self._settings.heartbeat_s)

    async def _fill_backlog(self) -> None:
        room = self._settings.max_batch - len(self._backlog)
        if room <= 0 or (self._stopping.is_set() and not self._drain):
            return
        taken = await self._queue.take(self._name, room, block_s=0.0 if self._backlog else TAKE_BLOCK_S)
        window_s = self._settings.batch_window_ms / 1000
        if taken and len(taken) < room and window_s > 0:
            # Concurrent requests arrive a few milliseconds apart: wait briefly to batch them.
            await asyncio.sleep(window_s)
            with contextlib.suppress(QueueUnavailableError):  # what was taken is held either way
                taken += await self._queue.take(self._name, room - len(taken), block_s=0.0)
        for job in taken:
            self._held[job.token] = job
            await self._accept(job)

    async def _accept(self, taken: TakenJob) -> None:
        """Decode a delivery into the backlog, or finish it at once (expired, undecodable)."""
        if taken.spec.expired():
            await self._finish(taken, JobState.EXPIRED, error="the deadline passed before a worker was free")
            return
        try:
            job = await asyncio.to_thread(to_generation_job, taken.spec)
        except Exception as error:  # one bad job must fail alone, never stop the worker
            logger.warning("job %s could not be prepared: %s", taken.spec.id, error)
            message = f"the job could not be prepared: {type(error).__name__}: {error}"
            await self._finish(taken, JobState.FAILED, error=message)
            return
        self._backlog.append(PendingJob(taken=taken, job=job))

    async def _run_batch(self, batch: list[PendingJob]) -> None:
        runnable: list[PendingJob] = []
        for index, pending in enumerate(batch):
            if pending.taken.spec.expired():
                await self._finish(pending.taken, JobState.EXPIRED, error="the deadline passed while queued")
                continue
            try:
                started = await self._queue.start(self._name, pending.taken)
            except QueueUnavailableError:
                # Back to the front of the backlog (starting again is harmless), never stranded.
                self._backlog[:0] = runnable + batch[index:]
                raise
            if started:
                runnable.append(pending)
            else:  # cancelled, finished or taken over: `start` dropped our delivery
                self._held.pop(pending.taken.token, None)
                logger.info("skipping job %s: cancelled or finished elsewhere", pending.taken.spec.id)
        if runnable:
            await self._compute_and_store(runnable)

    async def _compute_and_store(self, runnable: list[PendingJob]) -> None:
        started_at = time.time()
        metrics.WORKER_BUSY.set(1)
        metrics.BATCH_SIZE.observe(len(runnable))
        for pending in runnable:
            metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, started_at - pending.taken.spec.enqueued_at))
        deadline_s = compute_deadline_s(self._settings, [pending.job for pending in runnable])
        self.progress.busy = True
        self.progress.beat(deadline_s + self.progress.stall_s)
        compute = asyncio.ensure_future(asyncio.to_thread(self._compute, runnable, started_at))
        failure: Exception | None = None
        try:
            # shield: at the deadline only the waiting stops; the thread cannot be cancelled.
            results = await asyncio.wait_for(asyncio.shield(compute), deadline_s)
        except TimeoutError:
            await self._abandon(runnable, deadline_s)
        except Exception as error:  # a failing batch must still end every job it holds
            failure = error
        finally:
            metrics.WORKER_BUSY.set(0)
        self.progress.busy = False
        self.progress.beat()
        record_gpu_memory()
        self._engine_stats.record(self._runner.stats)
        if failure is not None:
            logger.error("batch of %d jobs failed", len(runnable), exc_info=failure)
            if len(runnable) > 1:
                # One bad job (or a batch too large for the device) must not fail the others.
                for pending in runnable:
                    await self._compute_and_store([pending])
                return
            message = f"{type(failure).__name__}: {failure}"
            await self._finish(runnable[0].taken, JobState.FAILED, error=message)
            return
        metrics.INFERENCE_SECONDS.observe(results[0].inference_seconds)
        for pending, result in zip(runnable, results, strict=True):
            await self._finish(pending.taken, JobState.DONE, result=result)

    async def _abandon(self, runnable: list[PendingJob], deadline_s: float) -> None:
        """Give a hung batch's jobs back to the queue (another worker runs them; a late result of
        this one is refused by the fencing token) and stop this worker."""
        metrics.BATCHES_ABANDONED.inc()
        self.stop()
        for pending in runnable:
            try:
                await self._queue.release(pending.taken)
                self._held.pop(pending.taken.token, None)
            except QueueUnavailableError as error:
                # Still claimed by us: reclaimed by another worker once our heartbeats stop.
                logger.warning("could not release job %s (%s)", pending.taken.spec.id, error)
        ids = ", ".join(pending.taken.spec.id for pending in runnable)
        logger.error(
            "batch of %d jobs (%s) still computing after its compute deadline of %.1f s: released them "
            "to other workers; this worker exits to restart its engine",
            len(runnable),
            ids,
            deadline_s,
        )
        raise ComputeDeadlineExceeded(f"batch of {len(runnable)} jobs passed its {deadline_s:.1f} s deadline")

    def _compute(self, batch: list[PendingJob], started_at: float) -> list[JobResult]:
        outputs = self._runner.run([pending.job for pending in batch])
        return [
            to_result(
                pending.taken.spec, output, max(0.0, started_at - pending.taken.spec.enqueued_at), self._name
            )
            for pending, output in zip(batch, outputs, strict=True)
        ]

    async def _finish(
        self, taken: TakenJob, state: JobState, error: str | None = None, result: JobResult | None = None
    ) -> None:
        spec = taken.spec
        record = spec.record(state, worker=self._name, error=error, result=result)
        # The result must be stored before the delivery is acknowledged: retry through outages.
        while True:
            try:
                await self._queue.finish(taken, record)
                self._held.pop(taken.token, None)
                break
            except QueueUnavailableError as outage:
                logger.warning("storing job %s failed (%s); retrying", spec.id, outage)
                await asyncio.sleep(RETRY_DELAY_S)
        metrics.JOBS_FINISHED.labels(state.value).inc()

    async def _return_backlog(self) -> None:
        """Give jobs taken but not started back to the queue for another worker (if the queue is
        unreachable they stay with this consumer and are reclaimed once it stops heart-beating)."""
        for pending in self._backlog:
            with contextlib.suppress(QueueUnavailableError):
                await self._queue.release(pending.taken)
                self._held.pop(pending.taken.token, None)
                logger.info("returned job %s to the queue", pending.taken.spec.id)
        self._backlog = []
