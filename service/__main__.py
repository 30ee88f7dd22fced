"""`python -m service` (what `make serve` runs): API + in-process queue + one embedded worker.

With REDIS_URL set the same process serves the Redis queue instead, beside other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from engines.runner import load_runner
from service.api.app import create_app, serve
from service.logs import configure_logging
from service.queue.capacity import check_or_exit
from service.queue.protocol import JobQueue
from service.settings import Settings, load_settings
from service.worker.loop import Worker
from service.worker.subject_cache import TokenCache

logger = logging.getLogger("service")


async def _load_and_serve(settings: Settings, queue: JobQueue, worker_ready: asyncio.Future[Worker]) -> None:
    try:
        runner = await asyncio.to_thread(
            load_runner, settings.model, settings.backend, settings.device, settings.buckets
        )
        if settings.warmup:
            await asyncio.to_thread(runner.warmup)
    except Exception:
        logger.exception(
            "the embedded worker could not load model %s; /readyz stays not ready", settings.model
        )
        raise
    worker = Worker(queue, runner, settings, settings.worker_name, TokenCache.from_settings(settings))
    worker_ready.set_result(worker)
    await worker.run()


@contextlib.asynccontextmanager
async def embedded_worker(settings: Settings, queue: JobQueue) -> AsyncIterator[None]:
    """Load the model in the background (the API answers /healthz meanwhile), then serve jobs;
    on shutdown, drain the in-process queue so no accepted job is lost."""
    worker_ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_load_and_serve(settings, queue, worker_ready), name="embedded-worker")
    try:
        yield
    finally:
        if worker_ready.done():
            worker_ready.result().stop(drain=not settings.redis_url)
            await task
        else:
            task.cancel()
            # A load failure was logged when it happened.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


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
