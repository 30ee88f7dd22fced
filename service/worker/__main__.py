"""`python -m service.worker`: one worker process (one per GPU) serving the Redis queue."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from service.adapters import open_registry
from service.logs import configure_logging
from service.queue import create_queue
from service.queue.capacity import check_or_exit
from service.settings import Settings, load_settings
from service.worker.driver import check_driver_or_exit
from service.worker.health import Progress, serve_health
from service.worker.loop import ComputeDeadlineExceeded, Worker, load_worker_runner
from service.worker.subject_cache import TokenCache

logger = logging.getLogger("service.worker")

# Exit status of a worker that abandoned a hung batch (its orchestrator restarts it).
EXIT_BATCH_ABANDONED = 3


async def serve(settings: Settings, progress: Progress) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    logger.info("loading model %s (backend %s)", settings.model, settings.backend)
    runner = await asyncio.to_thread(load_worker_runner, settings)
    if settings.warmup:
        await asyncio.to_thread(runner.warmup)
    runner.on_step = progress.step  # every backend reports each denoising step
    if stopping.is_set():
        return
    queue = create_queue(settings)
    tokens = TokenCache.from_settings(settings)
    worker = Worker(
        queue,
        runner,
        settings,
        settings.worker_name,
        tokens,
        progress,
        adapters=open_registry(settings, queue),
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait([task, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
        logger.info("stopping: finishing the batch in flight and returning the rest")
        worker.stop()
        await task
    except ComputeDeadlineExceeded:
        await queue.close()
        # Not a normal return: asyncio.run would wait forever for the hung compute thread.
        logging.shutdown()
        os._exit(EXIT_BATCH_ABANDONED)
    finally:
        await queue.close()


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    if not settings.redis_url:
        logger.error(
            "REDIS_URL is not set: a separate worker needs the Redis queue. Set REDIS_URL, or run "
            "`python -m service` (API + in-process queue + worker in one process)."
        )
        sys.exit(2)
    check_driver_or_exit(settings.device)
    check_or_exit(settings, logger)
    progress = Progress(settings.worker_stall_s)
    serve_health(settings.worker_metrics_host, settings.worker_metrics_port, progress)
    asyncio.run(serve(settings, progress))
    # Every job is stored or returned and the queue is closed. Skip the interpreter's teardown of
    # torch's modules: it took 1.6-3.5 s on 2 busy cores (more under load, past a test's stop
    # timeout), time a stopping pod spends doing nothing useful.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
