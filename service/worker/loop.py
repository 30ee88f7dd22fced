"""The worker loop: step-level continuous batching over the queue, planned fairly.

Four concerns, one module each, on one asyncio loop:

* intake (intake.py): take jobs (up to 2 x MAX_BATCH held) and prepare them on the preparation
  thread while the batch steps;
* stepping (stepping.py): the planner (engines/planner.py) decides which ready jobs start and
  where rows go; the executor (engines/step_scheduler.py) applies each plan and steps;
* signals and progress (signals.py): cancellations and watchers read while a step computes;
  progress published after it, never waited on;
* recovery (recovery.py): a step past its compute deadline releases its jobs and stops the worker;
  at exit every held job goes back to the queue;
* adapters (adapters.py): the LoRA adapter bank follows the adapter registry, loaded before the
  worker reports ready and kept in step at step boundaries.

What a worker holds is its `Ledger` (ledger.py). Heartbeats keep held jobs claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engines.runner import Runner, load_runner
from engines.step_scheduler import StepScheduler
from realcustom.lora.bank import BankLayout
from service import metrics
from service.adapters import AdapterRegistry
from service.background import how_it_ended
from service.cancelling import cancel_and_wait
from service.queue.protocol import JobQueue, QueueUnavailableError
from service.settings import Settings
from service.worker.adapters import AdapterSync
from service.worker.health import Progress
from service.worker.intake import TAKE_BLOCK_S, Intake
from service.worker.ledger import RETRY_DELAY_S, Ledger
from service.worker.recovery import ComputeDeadlineExceeded, Recovery, compute_deadline_s
from service.worker.stepping import Stepping
from service.worker.subject_cache import TokenCache

__all__ = ["ComputeDeadlineExceeded", "Worker", "WorkerTaskEnded", "compute_deadline_s", "load_worker_runner"]

logger = logging.getLogger(__name__)


def load_worker_runner(settings: Settings) -> Runner:
    """The model and backend a worker serves with: its buckets and captured samplers, the adapter
    bank of `LORA_*` installed before capture (none without slots)."""
    bank = None
    if settings.lora_slots:
        bank = BankLayout(
            settings.lora_targets, settings.lora_slots, settings.lora_max_rank, settings.lora_max_per_request
        )
    return load_runner(
        settings.model,
        settings.backend,
        settings.device,
        settings.buckets,
        bank,
        settings.graph_schedulers,
        settings.graph_uncond_prefixes,
    )


class WorkerTaskEnded(Exception):
    """A task the worker needs (heartbeat, intake) ended while the worker was running."""


class Worker:
    """Serves jobs from `queue` with `runner` until `stop()`; finishes or returns in-flight work.
    `tokens`: this process' subject-token cache (made by its entry point); `adapters`: the adapter
    registry its LoRA bank follows (needed when the runner's UNet has a bank)."""

    def __init__(
        self,
        queue: JobQueue,
        runner: Runner,
        settings: Settings,
        name: str,
        tokens: TokenCache,
        progress: Progress | None = None,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self._queue = queue
        self._runner = runner
        self._settings = settings
        self._name = name
        self.progress = progress or Progress(settings.worker_stall_s)
        scheduler = StepScheduler(runner, settings.max_batch)
        self._ledger = Ledger(queue, name, scheduler.release)
        self._recovery = Recovery(self._ledger, self._stop_intake)
        self._stepping = Stepping(
            self._ledger, scheduler, runner, settings, self.progress, self._recovery, lambda: self._accepting
        )
        self._adapters: AdapterSync | None = None
        if scheduler.adapters is not None:
            if adapters is None:
                raise ValueError(
                    "the runner's UNet has an adapter bank: give the worker the adapter registry"
                )
            self._adapters = AdapterSync(adapters, scheduler, settings, name, self._stepping.between_steps)
        self._intake = Intake(self._ledger, scheduler, settings, tokens, lambda: self._stepping.boundary)
        self._intake_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._drain = False

    def stop(self, drain: bool = False) -> None:
        """Stop taking jobs and finish the running ones; with `drain`, only once the queue is empty."""
        self._drain = drain
        self._stopping.set()
        self._ledger.wake.set()
        metrics.WORKER_READY.set(0)  # probes see the stop at once, not after the batch

    @property
    def _accepting(self) -> bool:
        return not self._stopping.is_set() or self._drain

    async def run(self) -> None:
        ledger = self._ledger
        self.progress.beat()
        if self._adapters is not None:
            await self._adapters.start()
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat")
        self._intake_task = asyncio.create_task(
            self._intake.run(lambda: self._accepting), name="worker-intake"
        )
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
                    if self._adapters is not None:
                        await self._adapters.sync()
                    await self._stepping.at_boundary()
                    if ledger.running:
                        await self._stepping.step()
                    else:
                        ledger.wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(ledger.wake.wait(), TAKE_BLOCK_S)
                except QueueUnavailableError as error:
                    logger.warning("queue unavailable (%s); retrying", error)
                    await asyncio.sleep(RETRY_DELAY_S)
        finally:
            if self._adapters is not None:
                self._adapters.close()
            await self._stop_intake()
            await asyncio.gather(*ledger.stores, return_exceptions=True)
            await self._recovery.return_held()
            await cancel_and_wait(heartbeat)  # a failure of it was raised above
            with contextlib.suppress(QueueUnavailableError):
                await self._queue.heartbeat(self._name, ready=False, in_flight=[])
            logger.info("worker %s stopped", self._name)

    def _check_helpers(self, heartbeat: asyncio.Task) -> None:
        """The heartbeat and intake tasks end only when the worker stops: one that ended otherwise
        (an exception, a cancellation) leaves a worker that looks alive but takes or keeps no jobs,
        so the worker ends too (its process is restarted)."""
        for task in (heartbeat, self._intake_task):
            if task is not None and task.done() and not self._stopping.is_set():
                ended, error = how_it_ended(task)
                raise WorkerTaskEnded(f"the worker's {task.get_name()} task {ended}") from error

    async def _should_exit(self) -> bool:
        ledger = self._ledger
        if not self._stopping.is_set() or ledger.running or ledger.starting:
            return False
        if self._drain:
            with contextlib.suppress(QueueUnavailableError):
                return not ledger.held and await self._queue.depth() == 0
            return False
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            if not self.progress.busy:  # the loop ticks; a running batch shows progress itself
                self.progress.beat(self.progress.stall_s + self._settings.heartbeat_s)
            try:
                await self._queue.heartbeat(
                    self._name, ready=not self._stopping.is_set(), in_flight=list(self._ledger.held.values())
                )
            except QueueUnavailableError as error:
                logger.warning("heartbeat failed: %s", error)
            await asyncio.sleep(self._settings.heartbeat_s)

    async def _stop_intake(self) -> None:
        """Stop taking jobs and let the intake's last `take` return (at most TAKE_BLOCK_S): a
        take cancelled mid-call could leave a delivery with this worker, found only by reclaim."""
        self.stop()
        if self._intake_task is not None:
            await asyncio.wait([self._intake_task])  # how it ended is _check_helpers' business
