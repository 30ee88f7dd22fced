"""The worker loop: step-level continuous batching over the queue.

Three activities overlap on one asyncio loop:

* intake: take jobs (up to 2 x MAX_BATCH held), decode them and prepare their loop inputs (text,
  reference encoding, projector, noise) on the preparation thread, while the batch steps;
* stepping: one step of every running batch on the stepping thread; meanwhile the loop fetches
  the running jobs' signals (cancellations, watchers) in one round trip;
* at each step boundary: finished rows leave (decoded on the stepping thread, stored by a task),
  cancelled and expired rows are dropped, prepared jobs join free rows (marked running first), and
  every running job's progress is published (previews only for watched jobs; never waited on).

Heartbeats keep held jobs claimed; each step has a compute deadline: past it the running jobs are
released to other workers and the worker stops with ComputeDeadlineExceeded (a thread cannot be
interrupted; the process exits and is restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from engines.jobs import GenerationJob, GenerationOutput
from engines.runner import Runner
from engines.step_scheduler import Prepared, StepScheduler
from service import metrics
from service.background import how_it_ended
from service.queue.protocol import (
    JobProgress,
    JobQueue,
    JobResult,
    JobSpec,
    JobState,
    QueueUnavailableError,
    StepSignals,
    TakenJob,
)
from service.settings import Settings
from service.worker.convert import to_generation_job, to_result
from service.worker.gpu import record_gpu_memory
from service.worker.health import Progress

logger = logging.getLogger(__name__)

# How long one `take` blocks for the first job; bounds how quickly a stop request is noticed.
TAKE_BLOCK_S = 0.5
# Back-off while the queue is unreachable (Redis restarting).
RETRY_DELAY_S = 0.5
# Weight of the newest step in the step-time average behind the ETA.
ETA_SMOOTHING = 0.3


class ComputeDeadlineExceeded(Exception):
    """A step (or a loop run alone) ran past its compute deadline; its jobs were released. The
    process must exit: the thread running it cannot be stopped, and the device may be wedged."""


class WorkerTaskEnded(Exception):
    """A task the worker needs (heartbeat, intake) ended while the worker was running."""


def compute_deadline_s(settings: Settings, image_steps: int) -> float:
    """The compute deadline of `image_steps` image-steps: a fixed part plus an allowance each."""
    return settings.compute_deadline_s + settings.compute_s_per_image_step * image_steps


@dataclass
class Held:
    """A job this worker holds, from its delivery to its terminal record."""

    taken: TakenJob
    prepared: Prepared | None = None
    joined_at: float = 0.0  # perf_counter at its first step
    watched: bool = False

    @property
    def id(self) -> str:
        return self.taken.spec.id

    @property
    def job(self) -> GenerationJob:
        return self.prepared.job


@dataclass
class StepOutcome:
    """What one scheduler step produced, computed on the stepping thread."""

    seconds: float
    # Host time between the previous step's end and this one's start, beyond loading joining rows
    # (None after idle): what the device waited for at the boundary.
    gap_s: float | None = None
    finished: list[tuple[str, GenerationOutput]] = field(default_factory=list)
    progress: dict[str, tuple[int, int]] = field(default_factory=dict)
    previews: dict[str, tuple[bytes, list[bytes]]] = field(default_factory=dict)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Worker:
    """Serves jobs from `queue` with `runner` until `stop()`; finishes or returns in-flight work."""

    def __init__(
        self, queue: JobQueue, runner: Runner, settings: Settings, name: str, progress: Progress | None = None
    ) -> None:
        self._queue = queue
        self._runner = runner
        self._settings = settings
        self._name = name
        self._scheduler = StepScheduler(runner, settings.max_batch)
        self._engine_stats = metrics.EngineStatsExporter()
        # One thread steps (the device's owner); another prepares joining jobs meanwhile.
        self._stepper = ThreadPoolExecutor(1, thread_name_prefix="worker-step")
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="worker-prepare")
        # Every delivery taken and not yet finished or returned, by token: kept claimed by heartbeats.
        self._held: dict[str, TakenJob] = {}
        self._ready: list[Held] = []  # prepared, not started, in arrival order
        self._starting: list[Held] = []  # started in the queue, joining at the next boundary
        self._running: dict[str, Held] = {}
        self._room = asyncio.Event()  # intake may take more
        self._wake = asyncio.Event()  # a job became ready
        self._stores: set[asyncio.Task] = set()
        self._publishing: asyncio.Task | None = None
        self._unsent: dict[str, JobProgress] = {}  # newest progress per job, not yet published
        self._step_s: float | None = None
        self._joins = 0  # since the last step
        self._join_s = 0.0  # stepping-thread time loading joining rows since the last step
        self._last_step_end: float | None = None  # perf_counter, stepping thread
        self._stopping = asyncio.Event()
        self._drain = False
        self._intake: asyncio.Task | None = None
        self.progress = progress or Progress(settings.worker_stall_s)

    def stop(self, drain: bool = False) -> None:
        """Stop taking jobs and finish the running ones; with `drain`, only once the queue is empty."""
        self._drain = drain
        self._stopping.set()
        self._wake.set()
        metrics.WORKER_READY.set(0)  # probes see the stop at once, not after the batch

    @property
    def _accepting(self) -> bool:
        return not self._stopping.is_set() or self._drain

    async def run(self) -> None:
        self.progress.beat()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat")
        self._intake = asyncio.create_task(self._intake_loop(), name="worker-intake")
        metrics.WORKER_READY.set(1)
        logger.info(
            "worker %s ready (model=%s, backend=%s)",
            self._name,
            self._runner.model_name,
            self._runner.backend_name,
        )
        try:
            while not await self._should_exit():
                self._check_helpers(heartbeat)
                try:
                    await self._join_ready()
                    if self._running:
                        await self._step()
                    else:
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), TAKE_BLOCK_S)
                except QueueUnavailableError as error:
                    logger.warning("queue unavailable (%s); retrying", error)
                    await asyncio.sleep(RETRY_DELAY_S)
        finally:
            await self._stop_intake()
            await asyncio.gather(*self._stores, return_exceptions=True)
            await self._return_held()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a failure was raised above
                await heartbeat
            with contextlib.suppress(QueueUnavailableError):
                await self._queue.heartbeat(self._name, ready=False, in_flight=[])
            logger.info("worker %s stopped", self._name)

    def _check_helpers(self, heartbeat: asyncio.Task) -> None:
        """The heartbeat and intake tasks end only when the worker stops: one that ended otherwise
        (an exception, a cancellation) leaves a worker that looks alive but takes or keeps no jobs,
        so the worker ends too (its process is restarted)."""
        for task in (heartbeat, self._intake):
            if task is not None and task.done() and not self._stopping.is_set():
                ended, error = how_it_ended(task)
                raise WorkerTaskEnded(f"the worker's {task.get_name()} task {ended}") from error

    async def _should_exit(self) -> bool:
        if not self._stopping.is_set() or self._running or self._starting:
            return False
        if self._drain:
            with contextlib.suppress(QueueUnavailableError):
                return not self._held and await self._queue.depth() == 0
            return False
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            if not self.progress.busy:  # the loop ticks; a running batch shows progress itself
                self.progress.beat(self.progress.stall_s + self._settings.heartbeat_s)
            try:
                await self._queue.heartbeat(
                    self._name, ready=not self._stopping.is_set(), in_flight=list(self._held.values())
                )
            except QueueUnavailableError as error:
                logger.warning("heartbeat failed: %s", error)
            await asyncio.sleep(self._settings.heartbeat_s)

    # ---- intake ---------------------------------------------------------------------------------

    async def _stop_intake(self) -> None:
        """Stop taking jobs and let the intake's last `take` return (at most TAKE_BLOCK_S): a
        take cancelled mid-call could leave a delivery with this worker, found only by reclaim."""
        self.stop()
        if self._intake is not None:
            await asyncio.wait([self._intake])  # how it ended is _check_helpers' business

    async def _intake_loop(self) -> None:
        """Take and prepare jobs while the batch steps: at most 2 x MAX_BATCH held at once."""
        limit = 2 * self._settings.max_batch
        while self._accepting:
            room = limit - len(self._held)
            if room <= 0:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), TAKE_BLOCK_S)
                continue
            try:
                taken = await self._queue.take(self._name, room, block_s=TAKE_BLOCK_S)
            except QueueUnavailableError as error:
                logger.warning("queue unavailable (%s); retrying", error)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            for job in taken:
                self._held[job.token] = job
            for job in taken:
                if not self._accepting:
                    break  # held: returned to the queue at exit
                await self._accept(job)

    async def _accept(self, taken: TakenJob) -> None:
        """Prepare a delivery (off the stepping thread), or finish it at once (expired, bad)."""
        if taken.spec.expired():
            await self._finish(taken, JobState.EXPIRED, error="the deadline passed before a worker was free")
            return
        metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - taken.spec.enqueued_at))
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self._preparer, self._prepare, taken.spec)
        except Exception as error:  # one bad job must fail alone, never stop the worker
            logger.warning("job %s could not be prepared: %s", taken.spec.id, error)
            message = f"the job could not be prepared: {type(error).__name__}: {error}"
            await self._finish(taken, JobState.FAILED, error=message)
            return
        metrics.PREPARE_SECONDS.observe(prepared.prepare_s)
        self._ready.append(Held(taken, prepared))
        self._wake.set()

    def _prepare(self, spec: JobSpec) -> Prepared:
        """Preparation thread: the runner's job (references as images, cached tokens looked up),
        then its loop inputs; `prepare_s` counts both."""
        started = time.perf_counter()
        prepared = self._scheduler.prepare(to_generation_job(spec))
        prepared.prepare_s = time.perf_counter() - started
        return prepared

    async def _return_held(self) -> None:
        """At exit, give every job still held back to the queue for another worker: those taken
        but not started, also those whose preparation the stop interrupted (if the queue is
        unreachable they stay with this consumer and are reclaimed once it stops heart-beating)."""
        for taken in list(self._held.values()):
            with contextlib.suppress(QueueUnavailableError):
                await self._queue.release(taken)
                self._forget(taken)
                logger.info("returned job %s to the queue", taken.spec.id)
        self._ready = []

    # ---- step boundary: joins --------------------------------------------------------------------

    async def _join_ready(self) -> None:
        """At a step boundary: the jobs started during the last step join. While rows run, other
        ready jobs wait for the next step to be started (the device does not wait on the queue),
        except those of a family without a running batch: that is made here, on the stepping
        thread. An idle worker starts whatever fits at once."""
        await self._join_started()
        if not (self._ready and self._accepting):
            return
        ready = self._ready
        if self._running:
            ready = [held for held in ready if held.prepared.family not in self._scheduler.batches]
        if ready:
            loop = asyncio.get_running_loop()
            candidates = await loop.run_in_executor(self._stepper, self._fitting, ready, True)
            await self._start(candidates)
            await self._join_started()
        metrics.ROWS_IN_FLIGHT.set(self._scheduler.rows_in_flight)

    async def _prestart(self) -> None:
        """During a step: mark running the ready jobs that will fit at its end (rows only free up
        during a step), so that at the boundary only their rows are loaded."""
        if self._ready and self._accepting:
            try:
                await self._start(self._fitting(list(self._ready), False))
            except QueueUnavailableError as error:  # they stay ready; the boundary tries again
                logger.warning("queue unavailable while starting jobs (%s)", error)

    async def _start(self, candidates: list[Held]) -> None:
        """Mark candidates running in the queue, in order; each started one moves to `_starting`
        at once (a queue error leaves the rest ready: starting again is harmless)."""
        for held in candidates:
            if held.taken.spec.expired():
                self._ready.remove(held)
                await self._finish(held.taken, JobState.EXPIRED, error="the deadline passed while queued")
                continue
            started = await self._queue.start(self._name, held.taken)
            self._ready.remove(held)
            if started:
                self._starting.append(held)
            else:  # cancelled, finished or taken over: `start` dropped our delivery
                self._forget(held.taken)
                logger.info("skipping job %s: cancelled or finished elsewhere", held.id)

    async def _join_started(self) -> None:
        loop = asyncio.get_running_loop()
        while self._starting:
            held = self._starting[0]
            if held.prepared.request is None:
                self._starting.pop(0)
                await self._run_alone(held)
                continue
            join_started = time.perf_counter()
            await loop.run_in_executor(self._stepper, self._scheduler.join, held.prepared)
            self._join_s += time.perf_counter() - join_started
            self._starting.pop(0)
            held.joined_at = time.perf_counter()
            metrics.TIME_TO_FIRST_STEP_SECONDS.observe(max(0.0, time.time() - held.taken.spec.enqueued_at))
            self._running[held.id] = held
            self._joins += 1

    def _fitting(self, ready: list[Held], new_families: bool) -> list[Held]:
        """The ready jobs that fit now, in arrival order; a job that does not fit holds back the
        later jobs of its family (no starvation), not the others. With `new_families` (stepping
        thread only) a family without a running batch gets one; without, its jobs wait."""
        rows: dict = {}
        blocked: set = set()
        chosen = []
        for held in ready:
            family = held.prepared.family
            if family in blocked:
                continue
            if held.prepared.request is None:
                chosen.append(held)
                continue
            if family not in rows:
                if not new_families and family not in self._scheduler.batches:
                    blocked.add(family)
                    continue
                rows[family] = self._scheduler.batch_for(family).free_rows
            if held.prepared.request.rows <= rows[family]:
                rows[family] -= held.prepared.request.rows
                chosen.append(held)
            else:
                blocked.add(family)
        return chosen

    # ---- one step --------------------------------------------------------------------------------

    async def _step(self) -> None:
        ids = list(self._running)
        signals = asyncio.create_task(self._signals(ids))
        starting = asyncio.create_task(self._prestart())
        rows = self._scheduler.rows_by_batch()
        deadline_s = compute_deadline_s(self._settings, sum(rows))
        watched = [job_id for job_id in ids if self._running[job_id].watched]
        if not self.progress.busy:
            # The first step after idle may take its deadline; after it, every step shows progress
            # within WORKER_STALL_S or /healthz reports the worker stalled.
            metrics.WORKER_BUSY.set(1)
            self.progress.busy = True
            self.progress.beat(deadline_s + self.progress.stall_s)
        loop = asyncio.get_running_loop()
        compute = loop.run_in_executor(self._stepper, self._compute_step, watched)
        try:
            # shield: at the deadline only the waiting stops; the thread cannot be cancelled.
            outcome = await asyncio.wait_for(asyncio.shield(compute), deadline_s)
        except TimeoutError:
            signals.cancel()
            await starting
            raise await self._abandon(deadline_s) from None
        except Exception as error:  # a failing step must still end every job it holds
            signals.cancel()
            await starting
            self._idle()
            await self._step_failed(error)
            return
        await starting
        self.progress.step()
        self._engine_stats.record(self._runner.stats)
        metrics.STEP_SECONDS.labels(rows=str(sum(rows))).observe(outcome.seconds)
        metrics.JOINS_PER_STEP.observe(self._joins)
        if outcome.gap_s is not None:
            metrics.STEP_GAP_SECONDS.labels(joined="yes" if self._joins else "no").observe(outcome.gap_s)
        self._joins, self._join_s = 0, 0.0
        self._step_s = (
            outcome.seconds
            if self._step_s is None
            else (1 - ETA_SMOOTHING) * self._step_s + ETA_SMOOTHING * outcome.seconds
        )
        for job_id, output in outcome.finished:
            held = self._running.pop(job_id)
            self._store(held, output)
        self._publish(outcome)
        await self._apply(await signals)
        metrics.ROWS_IN_FLIGHT.set(self._scheduler.rows_in_flight)
        if not self._running:
            self._idle()

    def _idle(self) -> None:
        self._last_step_end = None
        metrics.WORKER_BUSY.set(0)
        self.progress.busy = False
        self.progress.beat()

    def _compute_step(self, watched: list[str]) -> StepOutcome:
        """Stepping thread: one step, then decode what finished and snapshot watched jobs."""
        started = time.perf_counter()
        finished = self._scheduler.step()
        outcome = StepOutcome(time.perf_counter() - started)
        if self._last_step_end is not None:
            outcome.gap_s = max(0.0, started - self._last_step_end - self._join_s)
        for done in finished:
            held = self._running[done.key]
            inference_s = time.perf_counter() - held.joined_at
            outcome.finished.append((done.key, self._scheduler.decode(done, held.job, inference_s)))
        for job_id in self._running:
            found = self._scheduler.progress(job_id)
            if found is not None:
                outcome.progress[job_id] = found
        for job_id in watched:
            preview = self._scheduler.preview(job_id)
            if preview is not None:
                image, masks = preview
                outcome.previews[job_id] = (_png(image), [_png(mask) for mask in masks])
        self._last_step_end = time.perf_counter()
        return outcome

    async def _signals(self, ids: list[str]) -> StepSignals | None:
        try:
            return await self._queue.step_signals(ids)
        except QueueUnavailableError as error:  # the next boundary asks again
            logger.warning("could not read job signals: %s", error)
            return None

    async def _apply(self, signals: StepSignals | None) -> None:
        """Drop cancelled rows (they never compute past this boundary); note watchers. A job's
        deadline only stops it before it starts: a running job finishes and is fetched by id."""
        if signals is None:
            return
        for job_id, held in list(self._running.items()):
            held.watched = job_id in signals.watched
            if job_id not in signals.cancelled:
                continue
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._stepper, self._scheduler.cancel, job_id)
            del self._running[job_id]
            metrics.CANCELLED_RUNNING.inc()
            await self._finish(held.taken, JobState.CANCELLED, error="cancelled while running")

    def _publish(self, outcome: StepOutcome) -> None:
        """Progress of every running job, never waited on: while a publish is in flight the newest
        events wait in its place (a slow queue coalesces steps, it never delays the next step)."""
        events = {}
        for job_id, (done, steps) in outcome.progress.items():
            eta = None if self._step_s is None else (steps - done) * self._step_s
            preview, masks = outcome.previews.get(job_id, (None, None))
            events[job_id] = JobProgress(step=done, steps=steps, eta_s=eta, preview=preview, masks=masks)
        self._unsent.update(events)
        if self._unsent and (self._publishing is None or self._publishing.done()):
            self._publishing = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self._unsent:
            events, self._unsent = self._unsent, {}
            results = await asyncio.gather(
                *(self._queue.publish_progress(job_id, event) for job_id, event in events.items()),
                return_exceptions=True,
            )
            failures = [result for result in results if isinstance(result, Exception)]
            if failures:
                logger.warning("publishing progress failed for %d jobs: %s", len(failures), failures[0])

    # ---- results ---------------------------------------------------------------------------------

    def _store(self, held: Held, output: GenerationOutput) -> None:
        """Encode and store a finished job in a task, so the next step does not wait for it."""
        metrics.INFERENCE_SECONDS.observe(output.inference_seconds)
        queue_wait = max(0.0, time.time() - output.inference_seconds - held.taken.spec.enqueued_at)

        async def store() -> None:
            prepare_s = held.prepared.prepare_s
            result = await asyncio.to_thread(
                to_result, held.taken.spec, output, queue_wait, self._name, prepare_s
            )
            await self._finish(held.taken, JobState.DONE, result=result)

        task = asyncio.create_task(store())
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def _run_alone(self, held: Held) -> None:
        """A job no running batch holds: its whole loop, alone, under the loop's compute deadline."""
        job = held.job
        deadline_s = compute_deadline_s(self._settings, job.num_inference_steps * job.num_images)
        metrics.WORKER_BUSY.set(1)
        self.progress.busy = True
        self.progress.beat(deadline_s + self.progress.stall_s)
        loop = asyncio.get_running_loop()
        compute = loop.run_in_executor(self._stepper, self._scheduler.run_alone, job)
        try:
            output = await asyncio.wait_for(asyncio.shield(compute), deadline_s)
        except TimeoutError:
            raise await self._abandon(deadline_s, [held]) from None
        except Exception as error:
            logger.error("job %s failed", held.id, exc_info=error)
            await self._finish(held.taken, JobState.FAILED, error=f"{type(error).__name__}: {error}")
            return
        finally:
            if not self._running:
                self._idle()
        self._store(held, output)

    async def _step_failed(self, failure: Exception) -> None:
        """A step raised: its rows' state is suspect. Each running job runs again alone, so one bad
        job (or a batch too large for the device) fails alone."""
        logger.error("a step of %d jobs failed; running each alone", len(self._running), exc_info=failure)
        record_gpu_memory()
        loop = asyncio.get_running_loop()
        jobs = list(self._running.values())
        for held in jobs:
            await loop.run_in_executor(self._stepper, self._scheduler.cancel, held.id)
            del self._running[held.id]
        for held in jobs:
            await self._run_alone(held)

    async def _abandon(self, deadline_s: float, alone: list[Held] | None = None) -> ComputeDeadlineExceeded:
        """Give a hung step's jobs (and a hung job run `alone`) back to the queue (another worker
        runs them; a late result of this one is refused by the fencing token) and stop this worker:
        raise what it returns."""
        metrics.BATCHES_ABANDONED.inc()
        await self._stop_intake()  # else it could take the jobs released here right back
        running = list(self._running.values()) + self._starting + (alone or [])
        for held in running:
            try:
                await self._queue.release(held.taken)
                self._forget(held.taken)
            except QueueUnavailableError as error:
                # Still claimed by us: reclaimed by another worker once our heartbeats stop.
                logger.warning("could not release job %s (%s)", held.id, error)
        ids = ", ".join(held.id for held in running)
        logger.error(
            "batch of %d jobs (%s) still computing after its compute deadline of %.1f s: released them "
            "to other workers; this worker exits to restart its engine",
            len(running),
            ids,
            deadline_s,
        )
        return ComputeDeadlineExceeded(f"batch of {len(running)} jobs passed its {deadline_s:.1f} s deadline")

    def _forget(self, taken: TakenJob) -> None:
        self._held.pop(taken.token, None)
        self._room.set()

    async def _finish(
        self, taken: TakenJob, state: JobState, error: str | None = None, result: JobResult | None = None
    ) -> None:
        spec = taken.spec
        record = spec.record(state, worker=self._name, error=error, result=result)
        # The result must be stored before the delivery is acknowledged: retry through outages.
        while True:
            try:
                await self._queue.finish(taken, record)
                self._forget(taken)
                break
            except QueueUnavailableError as outage:
                logger.warning("storing job %s failed (%s); retrying", spec.id, outage)
                await asyncio.sleep(RETRY_DELAY_S)
        metrics.JOBS_FINISHED.labels(state.value).inc()
