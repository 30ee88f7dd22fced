"""Stepping: the planner decides, the executor applies, one step at a time.

The worker's only view of the engine is `StepScheduler`'s executor surface: `prepare` (intake),
`running()` and `shapes()` (what the planner reads), `apply(plan)`, `step()`, `decode`, `progress`,
`preview` and `run_alone`. Every decision (which ready jobs start, where rows go, which leave) is
the planner's (engines/planner.py), from plain data built here out of the worker's ledger: owner,
priority, fair-share weight, cost and deadline of each job (its `JobSpec`).

One step: while it computes on the stepping thread, the asyncio loop reads the running jobs'
signals and asks the planner which ready jobs will fit at its end (rows only free up during a
step: the rows that finish in it are counted free), and marks those running in the queue. At the
boundary the planner places them (and drops cancelled rows); the executor loads their rows.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from engines.planner import Boundary, Planner, RunningRows, StepPlan, WaitingJob
from engines.runner import Runner
from engines.step_scheduler import StepScheduler
from service import metrics
from service.cancelling import cancel_in_background
from service.queue.protocol import JobState, QueueUnavailableError
from service.settings import Settings
from service.worker.gpu import record_gpu_memory
from service.worker.health import Progress
from service.worker.ledger import Held, Ledger
from service.worker.recovery import Recovery, compute_deadline_s
from service.worker.signals import ProgressPublisher, StepOutcome, cancelled_and_watched, read_signals

logger = logging.getLogger(__name__)

# Weight of the newest step in the step-time average behind the ETA.
ETA_SMOOTHING = 0.3


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Stepping:
    def __init__(
        self,
        ledger: Ledger,
        scheduler: StepScheduler,
        runner: Runner,
        settings: Settings,
        progress: Progress,
        recovery: Recovery,
        accepting: Callable[[], bool],
    ) -> None:
        self._ledger = ledger
        self._scheduler = scheduler
        self._runner = runner
        self._settings = settings
        self._progress = progress
        self._recovery = recovery
        self._accepting = accepting
        self._planner = Planner(settings.scheduler_max_wait_steps)
        self._publisher = ProgressPublisher(ledger.queue)
        self._engine_stats = metrics.EngineStatsExporter()
        # One thread steps (the device's owner); the preparation thread is the intake's.
        self._stepper = ThreadPoolExecutor(1, thread_name_prefix="worker-step")
        self.boundary = 0  # step boundaries so far: the planner's clock
        self._step_s: float | None = None
        self._joins = 0  # since the last step
        self._join_s = 0.0  # stepping-thread time loading joining rows since the last step
        self._last_step_end: float | None = None  # perf_counter, stepping thread

    async def between_steps(self, function, *args):
        """Run `function(*args)` on the stepping thread, between two steps (adapter loads)."""
        return await asyncio.get_running_loop().run_in_executor(self._stepper, function, *args)

    # ---- the planner's view ------------------------------------------------------------------------

    def _waiting(self, committed: bool) -> list[WaitingJob]:
        """The starting jobs (committed: a plan admitted them) and, when asked, the ready ones."""
        jobs = [(held, True) for held in self._ledger.starting]
        if not committed:
            jobs += [(held, False) for held in self._ledger.ready]
        return [
            WaitingJob(
                held.id,
                held.prepared.family,
                held.prepared.rows,
                held.spec.cost,
                held.ready_at,
                held.spec.owner,
                held.spec.weight,
                held.spec.priority,
                held.spec.deadline,
                is_committed,
                held.prepared.cfg,
            )
            for held, is_committed in jobs
        ]

    def _boundary(self, running: list[RunningRows], leaving: set[str], admit: bool) -> Boundary:
        waiting = self._waiting(committed=not admit)
        for index, row in enumerate(running):
            spec = self._ledger.running[row.key].spec
            running[index] = replace(row, owner=spec.owner, priority=spec.priority)
        families = {row.family for row in running} | {job.family for job in waiting if job.family is not None}
        shapes = self._scheduler.shapes(families)
        return Boundary(self.boundary, tuple(running), tuple(waiting), shapes, frozenset(leaving), admit)

    # ---- admission: which ready jobs start ---------------------------------------------------------

    async def admit(self, running: list[RunningRows]) -> None:
        """Mark running in the queue the ready jobs the planner admits, given the rows that will
        run at the next boundary; at the boundary they are placed."""
        if not (self._ledger.ready and self._accepting()):
            return
        plan = self._planner.plan(self._boundary(running, set(), admit=True))
        admitted = set(plan.admitted)
        await self._start([held for held in self._ledger.ready if held.id in admitted])

    async def _start(self, candidates: list[Held]) -> None:
        """Mark candidates running in the queue, in order; each started one moves to `starting`
        at once (a queue error leaves the rest ready: starting again is harmless)."""
        ledger = self._ledger
        for held in candidates:
            if held.spec.expired():
                ledger.ready.remove(held)
                await ledger.finish(held.taken, JobState.EXPIRED, error="the deadline passed while queued")
                continue
            started = await ledger.queue.start(ledger.name, held.taken)
            ledger.ready.remove(held)
            if started:
                ledger.starting.append(held)
            else:  # cancelled, finished or taken over: `start` dropped our delivery
                ledger.forget(held.taken)
                logger.info("skipping job %s: cancelled or finished elsewhere", held.id)

    # ---- the boundary ------------------------------------------------------------------------------

    async def at_boundary(self) -> None:
        """Between two steps: an idle worker first starts what the planner admits now; then the
        started jobs are placed (jobs run alone go first)."""
        ledger = self._ledger
        if not ledger.running and not ledger.starting:
            await self.admit([])
        await self.place()
        ledger.rows_by_class()

    async def place(self, leaving: set[str] | None = None, cancelled: bool = True) -> None:
        """Apply the planner's placement of the started jobs and drop `leaving` rows (finished
        `cancelled` unless the caller ends them)."""
        ledger = self._ledger
        leaving = leaving or set()
        if not leaving and not ledger.starting:
            return
        plan = self._planner.plan(self._boundary(self._scheduler.running(), leaving, admit=False))
        starting = {held.id: held for held in ledger.starting}
        for key in plan.alone:
            held = starting.pop(key)
            ledger.starting.remove(held)
            await self.run_alone(held)
        await self._apply(plan, starting)
        for key in plan.leave:
            held = ledger.running.pop(key)
            if cancelled:
                metrics.CANCELLED_RUNNING.inc()
                await ledger.finish(held.taken, JobState.CANCELLED, error="cancelled while running")

    async def _apply(self, plan: StepPlan, starting: dict[str, Held]) -> None:
        ledger = self._ledger
        joining = {join.key: starting[join.key].prepared for join in plan.joins}
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self._stepper, self._scheduler.apply, plan, joining)
        if plan.joins:
            self._join_s += time.perf_counter() - started
        for join in plan.joins:
            held = starting[join.key]
            ledger.starting.remove(held)
            held.joined_at = time.perf_counter()
            metrics.TIME_TO_FIRST_STEP_SECONDS.observe(max(0.0, time.time() - held.spec.enqueued_at))
            ledger.running[held.id] = held
            self._joins += 1

    # ---- one step ----------------------------------------------------------------------------------

    async def step(self) -> None:
        ledger = self._ledger
        ids = list(ledger.running)
        signals = asyncio.create_task(read_signals(ledger.queue, ids))
        # The rows that run at the next boundary: those whose loop does not end in this step.
        after = [
            replace(row, steps_left=row.steps_left - 1)
            for row in self._scheduler.running()
            if row.steps_left > 1
        ]
        starting = asyncio.create_task(self._prestart(after))
        rows = self._scheduler.rows_by_batch()
        deadline_s = compute_deadline_s(self._settings, sum(rows))
        watched = [job_id for job_id in ids if ledger.running[job_id].watched]
        if not self._progress.busy:
            # The first step after idle may take its deadline; after it, every step shows progress
            # within WORKER_STALL_S or /healthz reports the worker stalled.
            metrics.WORKER_BUSY.set(1)
            self._progress.busy = True
            self._progress.beat(deadline_s + self._progress.stall_s)
        loop = asyncio.get_running_loop()
        compute = loop.run_in_executor(self._stepper, self._compute_step, watched)
        try:
            # shield: at the deadline only the waiting stops; the thread cannot be cancelled.
            outcome = await asyncio.wait_for(asyncio.shield(compute), deadline_s)
        except TimeoutError:
            cancel_in_background(signals)
            await starting
            raise await self._recovery.abandon(deadline_s) from None
        except Exception as error:  # a failing step must still end every job it holds
            cancel_in_background(signals)
            await starting
            self._idle()
            await self._step_failed(error)
            return
        await starting
        self.boundary += 1
        self._progress.step()
        self._engine_stats.record(self._scheduler.stats)
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
            ledger.store(ledger.running.pop(job_id), output)
        self._publisher.publish(outcome, self._step_s)
        # Cancelled rows leave now: they never compute past this boundary.
        await self.place(cancelled_and_watched(await signals, ledger.running))
        ledger.rows_by_class()
        if not ledger.running:
            self._idle()

    async def _prestart(self, running: list[RunningRows]) -> None:
        try:
            await self.admit(running)
        except QueueUnavailableError as error:  # they stay ready; the boundary tries again
            logger.warning("queue unavailable while starting jobs (%s)", error)

    def _idle(self) -> None:
        self._last_step_end = None
        metrics.WORKER_BUSY.set(0)
        self._progress.busy = False
        self._progress.beat()

    def _compute_step(self, watched: list[str]) -> StepOutcome:
        """Stepping thread: one step, then decode what finished and snapshot watched jobs."""
        running = self._ledger.running
        started = time.perf_counter()
        finished = self._scheduler.step()
        outcome = StepOutcome(time.perf_counter() - started)
        if self._last_step_end is not None:
            outcome.gap_s = max(0.0, started - self._last_step_end - self._join_s)
        for done in finished:
            held = running[done.key]
            inference_s = time.perf_counter() - held.joined_at
            outcome.finished.append((done.key, self._scheduler.decode(done, held.job, inference_s)))
        for job_id in running:
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

    # ---- jobs run alone ----------------------------------------------------------------------------

    async def run_alone(self, held: Held) -> None:
        """A job no running batch holds: its whole loop, alone, under the loop's compute deadline."""
        job = held.job
        deadline_s = compute_deadline_s(self._settings, job.num_inference_steps * job.num_images)
        metrics.WORKER_BUSY.set(1)
        self._progress.busy = True
        self._progress.beat(deadline_s + self._progress.stall_s)
        loop = asyncio.get_running_loop()
        compute = loop.run_in_executor(self._stepper, self._scheduler.run_alone, job)
        try:
            output = await asyncio.wait_for(asyncio.shield(compute), deadline_s)
        except TimeoutError:
            raise await self._recovery.abandon(deadline_s, [held]) from None
        except Exception as error:
            logger.error("job %s failed", held.id, exc_info=error)
            await self._ledger.finish(held.taken, JobState.FAILED, error=f"{type(error).__name__}: {error}")
            return
        finally:
            if not self._ledger.running:
                self._idle()
        self._ledger.store(held, output)

    async def _step_failed(self, failure: Exception) -> None:
        """A step raised: its rows' state is suspect. Each running job runs again alone, so one bad
        job (or a batch too large for the device) fails alone."""
        ledger = self._ledger
        logger.error("a step of %d jobs failed; running each alone", len(ledger.running), exc_info=failure)
        record_gpu_memory()
        jobs = list(ledger.running.values())
        await self.place({held.id for held in jobs}, cancelled=False)
        for held in jobs:
            await self.run_alone(held)
