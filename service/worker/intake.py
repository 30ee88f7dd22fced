"""Intake: take deliveries while the batch steps, and prepare them off the stepping thread.

A worker holds at most 2 x MAX_BATCH jobs (running + prepared). Each delivery is converted to the
method's job (references as images, cached tokens looked up in the injected `TokenCache`) and
prepared on the preparation thread (text, reference encoding, projector, image K/V, noise: one
call down through engines into realcustom); an expired or unpreparable job is finished at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from engines.step_scheduler import Prepared, StepScheduler
from service import metrics
from service.queue.protocol import JobSpec, JobState, QueueUnavailableError, TakenJob
from service.settings import Settings
from service.worker.convert import to_generation_job
from service.worker.ledger import RETRY_DELAY_S, Held, Ledger
from service.worker.subject_cache import TokenCache

logger = logging.getLogger(__name__)

# How long one `take` blocks for the first job; bounds how quickly a stop request is noticed.
TAKE_BLOCK_S = 0.5


class Intake:
    def __init__(
        self,
        ledger: Ledger,
        scheduler: StepScheduler,
        settings: Settings,
        tokens: TokenCache,
        clock: Callable[[], int],
    ) -> None:
        self._ledger = ledger
        self._scheduler = scheduler
        self._settings = settings
        self._tokens = tokens
        self._clock = clock  # the step boundary now: a ready job's age counts from it
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="worker-prepare")

    async def run(self, accepting: Callable[[], bool]) -> None:
        """Take and prepare jobs while the batch steps: at most 2 x MAX_BATCH held at once."""
        ledger = self._ledger
        limit = 2 * self._settings.max_batch
        while accepting():
            room = limit - len(ledger.held)
            if room <= 0:
                ledger.room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ledger.room.wait(), TAKE_BLOCK_S)
                continue
            try:
                taken = await ledger.queue.take(ledger.name, room, block_s=TAKE_BLOCK_S)
            except QueueUnavailableError as error:
                logger.warning("queue unavailable (%s); retrying", error)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            for job in taken:
                ledger.held[job.token] = job
            for job in taken:
                if not accepting():
                    break  # held: returned to the queue at exit
                await self._accept(job)

    async def _accept(self, taken: TakenJob) -> None:
        """Prepare a delivery (off the stepping thread), or finish it at once (expired, bad)."""
        spec = taken.spec
        if spec.expired():
            await self._ledger.finish(
                taken, JobState.EXPIRED, error="the deadline passed before a worker was free"
            )
            return
        labels = metrics.key_class(spec.tier, spec.priority)
        metrics.QUEUE_WAIT_SECONDS.labels(**labels).observe(max(0.0, time.time() - spec.enqueued_at))
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self._preparer, self._prepare, spec)
        except Exception as error:  # one bad job must fail alone, never stop the worker
            logger.warning("job %s could not be prepared: %s", spec.id, error)
            message = f"the job could not be prepared: {type(error).__name__}: {error}"
            await self._ledger.finish(taken, JobState.FAILED, error=message)
            return
        metrics.PREPARE_SECONDS.observe(prepared.prepare_s)
        if taken.token not in self._ledger.held:  # returned or finished meanwhile: hold nothing
            self._scheduler.release(prepared)
            return
        self._ledger.prepared[taken.token] = prepared
        self._ledger.ready.append(Held(taken, prepared, ready_at=self._clock()))
        self._ledger.wake.set()

    def _prepare(self, spec: JobSpec) -> Prepared:
        """Preparation thread: the method's job (references as images, cached tokens looked up),
        then its loop inputs; `prepare_s` counts both."""
        started = time.perf_counter()
        prepared = self._scheduler.prepare(to_generation_job(spec, self._tokens))
        prepared.prepare_s = time.perf_counter() - started
        return prepared
