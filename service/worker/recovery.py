"""Recovery: what a worker does when compute hangs, and with the jobs it still holds at exit.

Each step (and each job run alone) has a compute deadline. Past it the running jobs are released
to other workers (a late result of this one is refused by the fencing token) and the worker stops
with `ComputeDeadlineExceeded`: a thread cannot be interrupted, so the process exits and is
restarted. At exit every job still held (taken, not started, or interrupted while preparing) is
given back to the queue. (A step that raises instead reruns each of its jobs alone: stepping.py.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

from service import metrics
from service.queue.protocol import QueueUnavailableError
from service.settings import Settings
from service.worker.ledger import Held, Ledger

logger = logging.getLogger(__name__)


class ComputeDeadlineExceeded(Exception):
    """A step (or a loop run alone) ran past its compute deadline; its jobs were released. The
    process must exit: the thread running it cannot be stopped, and the device may be wedged."""


def compute_deadline_s(settings: Settings, image_steps: int) -> float:
    """The compute deadline of `image_steps` image-steps: a fixed part plus an allowance each."""
    return settings.compute_deadline_s + settings.compute_s_per_image_step * image_steps


class Recovery:
    def __init__(self, ledger: Ledger, stop_intake: Callable[[], Awaitable[None]]) -> None:
        self._ledger = ledger
        self._stop_intake = stop_intake

    async def abandon(self, deadline_s: float, alone: list[Held] | None = None) -> ComputeDeadlineExceeded:
        """Give a hung step's jobs (and a hung job run `alone`) back to the queue (another worker
        runs them) and stop this worker: raise what it returns."""
        ledger = self._ledger
        metrics.BATCHES_ABANDONED.inc()
        await self._stop_intake()  # else it could take the jobs released here right back
        running = list(ledger.running.values()) + ledger.starting + (alone or [])
        for held in running:
            try:
                await ledger.queue.release(held.taken)
                ledger.forget(held.taken)
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

    async def return_held(self) -> None:
        """At exit, give every job still held back to the queue for another worker: those taken
        but not started, also those whose preparation the stop interrupted (if the queue is
        unreachable they stay with this consumer and are reclaimed once it stops heart-beating)."""
        ledger = self._ledger
        for taken in list(ledger.held.values()):
            with contextlib.suppress(QueueUnavailableError):
                await ledger.queue.release(taken)
                ledger.forget(taken)
                logger.info("returned job %s to the queue", taken.spec.id)
        ledger.ready = []
