"""Signals and progress: what a running job's clients ask (cancel, watch) and what they are told.

The running jobs' signals are read in one round trip while a step computes; a cancelled job's rows
leave at the next boundary (the planner's `leaving`). Progress of every running job is published
after each step without ever being waited on: while a publish is in flight the newest events wait
in its place, so a slow queue coalesces steps and never delays the next step.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from realcustom.jobs import GenerationOutput
from service.queue.protocol import JobProgress, JobQueue, QueueUnavailableError, StepSignals
from service.worker.ledger import Held

logger = logging.getLogger(__name__)


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


async def read_signals(queue: JobQueue, ids: list[str]) -> StepSignals | None:
    try:
        return await queue.step_signals(ids)
    except QueueUnavailableError as error:  # the next boundary asks again
        logger.warning("could not read job signals: %s", error)
        return None


def cancelled_and_watched(signals: StepSignals | None, running: dict[str, Held]) -> set[str]:
    """Note which running jobs are watched (previews); return the cancelled ones. A job's deadline
    only stops it before it starts: a running job finishes and is fetched by id."""
    if signals is None:
        return set()
    for job_id, held in running.items():
        held.watched = job_id in signals.watched
    return {job_id for job_id in running if job_id in signals.cancelled}


class ProgressPublisher:
    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue
        self._publishing: asyncio.Task | None = None
        self._unsent: dict[str, JobProgress] = {}  # newest progress per job, not yet published

    def publish(self, outcome: StepOutcome, step_s: float | None) -> None:
        """Progress of every running job (ETA from the smoothed step time), never waited on."""
        events = {}
        for job_id, (done, steps) in outcome.progress.items():
            eta = None if step_s is None else (steps - done) * step_s
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
