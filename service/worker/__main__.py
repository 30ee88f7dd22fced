"""`python -m service.worker`: one worker process (one per GPU) serving the Redis queue."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from prometheus_client import start_http_server

from engines.runner import load_runner
from service.logs import configure_logging
from service.queue import create_queue
from service.queue.capacity import check_or_exit
from service.settings import Settings, load_settings
from service.worker.loop import Worker

logger = logging.getLogger("service.worker")


async def serve(settings: Settings) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    logger.info("loading model %s (backend %s)", settings.model, settings.backend)
    runner = await asyncio.to_thread(
        load_runner, settings.model, settings.backend, settings.device, settings.buckets
    )
    if settings.warmup:
        await asyncio.to_thread(runner.warmup)
    if stopping.is_set():
        return
    queue = create_queue(settings)
    worker = Worker(queue, runner, settings, settings.worker_name)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait([task, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
        logger.info("stopping: finishing the batch in flight and returning the rest")
        worker.stop()
        await task
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
    check_or_exit(settings, logger)
    serve_metrics(settings.worker_metrics_host, settings.worker_metrics_port)
    asyncio.run(serve(settings))
    # Every job is stored or returned and the queue is closed. Skip the interpreter's teardown of
    # torch's modules: it took 1.6-3.5 s on 2 busy cores (more under load, past a test's stop
    # timeout), time a stopping pod spends doing nothing useful.
    logging.shutdown()
    os._exit(0)


def serve_metrics(host: str, port: int) -> None:
    """Start the Prometheus endpoint. A taken port (another worker on this host) falls back to a
    free one; no port at all only costs the metrics, never the worker."""
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as error:
        if port == 0:
            logger.error("worker metrics disabled: cannot listen on %s (%s)", host, error)
            return
        logger.warning(
            "worker metrics port %d on %s is taken (%s), maybe by another worker on this host: using a "
            "free port instead; give each worker its own WORKER_METRICS_PORT",
            port,
            host,
            error.strerror or error,
        )
        serve_metrics(host, 0)
        return
    logger.info("worker metrics on http://%s:%d/metrics", host, server.server_port)


if __name__ == "__main__":
    main()
