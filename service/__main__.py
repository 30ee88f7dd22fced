"""`python -m service` (what `make serve` runs): API + in-process queue + one embedded worker.

With REDIS_URL set the same process serves the Redis queue instead, beside other workers.

The process cannot serve without its worker, so the worker is an essential background task
(service/background.py): when it ends for any reason but a shutdown (its model does not load, a
batch passes its compute deadline, an exception), the process exits non-zero with a log line that
says why, and a supervisor (Kubernetes, compose's restart policy, systemd) starts a fresh one. It
is not restarted in-process: a step past its deadline still runs on a thread nothing can stop, on
a device that may be wedged, and after an unexpected exception the engine's state is unknown; a
fresh process is the one state known to work. With the in-process queue, the jobs it held are lost
with it, as on any crash (use Redis to keep them). `/healthz` fails from the moment the worker
ends, and while it makes no progress for WORKER_STALL_S (a loop or a step that stopped moving).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from service.adapters import open_registry
from service.api.app import create_app, serve
from service.background import BackgroundTasks
from service.cancelling import cancel_and_wait
from service.logs import configure_logging
from service.queue.capacity import check_or_exit
from service.queue.protocol import JobQueue
from service.settings import Settings, load_settings
from service.worker.__main__ import EXIT_BATCH_ABANDONED
from service.worker.loop import ComputeDeadlineExceeded, Worker, load_worker_runner
from service.worker.subject_cache import TokenCache

logger = logging.getLogger("service")

WORKER_TASK = "embedded-worker"
# Exit status when the embedded worker ended otherwise than past a compute deadline.
EXIT_WORKER_FAILED = 1


def exit_status(error: BaseException | None) -> int:
    """A batch abandoned past its compute deadline exits as a worker process does (3)."""
    return EXIT_BATCH_ABANDONED if isinstance(error, ComputeDeadlineExceeded) else EXIT_WORKER_FAILED


async def _load_and_serve(
    settings: Settings, queue: JobQueue, worker_ready: asyncio.Future[Worker], background: BackgroundTasks
) -> None:
    try:
        runner = await asyncio.to_thread(load_worker_runner, settings)
        if settings.warmup:
            await asyncio.to_thread(runner.warmup)
    except Exception:
        logger.exception("the embedded worker could not load model %s", settings.model)
        raise
    worker = Worker(
        queue,
        runner,
        settings,
        settings.worker_name,
        TokenCache.from_settings(settings),
        adapters=open_registry(settings, queue),
    )
    background.probe(WORKER_TASK, lambda: _stalled(worker))
    worker_ready.set_result(worker)
    await worker.run()


def _stalled(worker: Worker) -> str | None:
    state = worker.progress.state()
    if state["alive"]:
        return None
    return f"no progress for {state['seconds_since_progress']:.0f} s (WORKER_STALL_S)"


@contextlib.asynccontextmanager
async def embedded_worker(
    settings: Settings, queue: JobQueue, background: BackgroundTasks
) -> AsyncIterator[None]:
    """Load the model in the background (the API answers /healthz meanwhile), then serve jobs;
    on shutdown, drain the in-process queue so no accepted job is lost."""
    worker_ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = background.essential(
        WORKER_TASK, _load_and_serve(settings, queue, worker_ready, background), exit_status
    )
    try:
        yield
    finally:
        # A worker that ended before the shutdown was fatal, and logged: nothing to stop.
        if not task.done() and worker_ready.done():
            worker_ready.result().stop(drain=not settings.redis_url)
            with contextlib.suppress(asyncio.CancelledError, Exception):  # logged by the background tasks
                await task
        else:
            await cancel_and_wait(task)


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    if settings.model == "tiny":
        logger.warning(
            "no model weights configured (MODEL unset or 'tiny'): serving the TINY random-weight model, "
            "for trying the service only. Set MODEL=/path/to/weights for real images."
        )
    check_or_exit(settings, logger)
    serve(create_app(settings, companion=functools.partial(embedded_worker, settings)), settings)


if __name__ == "__main__":
    main()
