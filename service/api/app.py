"""The FastAPI application: shared resources in the lifespan, routers, middleware, handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from realcustom.tokenizer import load_clip_tokenizer
from service.adapters import open_registry
from service.api.docs import install_docs
from service.api.errors import InternalErrors, install_error_handlers
from service.api.health import bind, health_app
from service.api.http_protocol import EdgeLimits, protocol_class
from service.api.intake import Intake
from service.api.middleware import BodySizeLimitMiddleware, RequestMetricsMiddleware
from service.api.openapi import install_openapi
from service.api.ratelimit import RateLimiter
from service.api.routes import customize, demo, events, jobs, loras, ops, subjects, webhooks
from service.background import BackgroundTasks
from service.queue import create_queue
from service.queue.protocol import JobQueue
from service.settings import Settings
from service.subjects.store import open_subject_store
from service.webhooks.dispatcher import delivering
from service.webhooks.outbox import create_outbox

logger = logging.getLogger(__name__)

# Something that runs beside the API for the app's lifetime, given the queue and the background
# tasks (the embedded worker).
Companion = Callable[[JobQueue, BackgroundTasks], AbstractAsyncContextManager[None]]
# After a fatal failure, how long replies in flight have before the process exits anyway.
FATAL_EXIT_GRACE_S = 3.0
# The health listener serves two small routes to a few probes.
HEALTH_LIMITS = EdgeLimits(
    header_timeout_s=5.0, body_timeout_s=5.0, max_header_bytes=8192, max_connections=64, max_requests=32
)

DESCRIPTION = """
RealCustom++ subject customisation: the subject of each reference photo is bound to a real word of
the prompt ("a **cat** in the snow") and generated into the prompt's scene.

`POST /customize` answers when the images are ready; `POST /jobs` queues and returns at once.
"""


def create_app(settings: Settings, companion: Companion | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.api_keys:
            logger.info("API keys required (%d configured)", len(settings.api_keys))
        else:
            logger.warning("no API_KEYS configured: the API is open to every caller")
        app.state.settings = settings
        tokenizer = await run_in_threadpool(load_clip_tokenizer, settings.tokenizer_path)
        app.state.intake = Intake(settings, tokenizer)
        app.state.event_streams = events.stream_slots(settings)
        app.state.rate_limiter = (
            RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        )
        app.state.queue = create_queue(settings)
        app.state.webhooks = create_outbox(settings, app.state.queue)
        app.state.subjects = open_subject_store(settings, app.state.queue)
        app.state.adapters = open_registry(settings, app.state.queue)
        # The all-in-one process can serve only once its own worker is warm; the API alone once
        # Redis answers (workers come and go behind the queue).
        app.state.ready_needs_worker = companion is not None
        # `serve` sets on_fatal: the process exits when an essential task ends.
        background = BackgroundTasks(getattr(app.state, "on_fatal", None))
        logger.info("queue: %s", "Redis Streams" if settings.redis_url else "in-process")
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(
                    delivering(app.state.webhooks, app.state.queue, settings, background)
                )
                if companion is not None:
                    await stack.enter_async_context(companion(app.state.queue, background))
                app.state.background = background
                try:
                    yield
                finally:
                    background.stopping()
        finally:
            await background.stop()
            app.state.intake.close()
            await app.state.webhooks.close()
            await app.state.subjects.close()
            await app.state.queue.close()

    app = FastAPI(
        title="RealCustom++ service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by routes/docs.py from local assets
        redoc_url=None,
    )
    app.include_router(customize.router)
    app.include_router(jobs.router)
    app.include_router(subjects.router)
    app.include_router(events.router)
    app.include_router(ops.router)
    app.include_router(loras.router)
    app.include_router(demo.router)
    app.include_router(webhooks.router)
    install_docs(app)
    install_error_handlers(app)
    install_openapi(app)
    # Added last = outermost: metrics see every reply, the size limit's 413s included, and the size
    # limit applies before anything reads the body.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)
    # Outermost: a 500 for whatever no handler took, the connection kept (service/api/errors.py).
    app.add_middleware(InternalErrors)
    return app


def startup_problem(settings: Settings) -> str | None:
    """Why the API must not start with these settings, or None."""
    if settings.require_api_keys and not settings.api_keys:
        return "REQUIRE_API_KEYS is set but API_KEYS is empty: refusing to serve an open API. Set API_KEYS."
    return None


def edge_limits(settings: Settings) -> EdgeLimits:
    return EdgeLimits(
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.http_max_header_bytes,
        max_connections=settings.http_max_connections,
        max_requests=settings.http_limit_concurrency,
    )


class HealthServer(uvicorn.Server):
    """The health listener's server, on its socket: it leaves the signals to the API's server,
    which stops it."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self.socket = sock

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def servers(app: FastAPI, settings: Settings) -> tuple[uvicorn.Server, HealthServer]:
    """The API's uvicorn server on PORT and the health listener on HEALTH_PORT (bound now)."""
    log_level = settings.log_level.lower()
    api = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            http=protocol_class(edge_limits(settings)),
            timeout_keep_alive=settings.http_keep_alive_s,
            h11_max_incomplete_event_size=settings.http_max_header_bytes,
        )
    )
    sock = bind(settings.host, settings.health_port)
    host, port = sock.getsockname()[:2]
    health = HealthServer(
        uvicorn.Config(
            health_app(app.state),
            host=host,
            port=port,
            log_level=log_level,
            lifespan="off",
            access_log=False,
            http=protocol_class(HEALTH_LIMITS),
            timeout_keep_alive=settings.http_keep_alive_s,
        ),
        sock,
    )
    logger.info("health listener on http://%s:%d (/healthz, /readyz)", host, port)
    return api, health


async def serve_both(api: uvicorn.Server, health: HealthServer) -> None:
    """The health listener runs for as long as the API's server, its shutdown included."""
    listening = asyncio.create_task(health.serve(sockets=[health.socket]), name="health-listener")
    try:
        await api.serve()
    finally:
        health.should_exit = True
        await listening


def exit_on_fatal(api: uvicorn.Server, status: list[int]) -> Callable[[str, int], None]:
    """What a fatal failure does: stop serving (replies in flight get FATAL_EXIT_GRACE_S), then
    exit with `status` (`serve` does, or a timer if the shutdown hangs, e.g. on a hung worker)."""

    def on_fatal(_why: str, exit_status: int) -> None:
        status.append(exit_status)
        api.should_exit = True
        timer = threading.Timer(FATAL_EXIT_GRACE_S, _exit_now, (exit_status,))
        timer.daemon = True
        timer.start()

    return on_fatal


def _exit_now(status: int) -> None:
    logging.shutdown()
    # Not sys.exit: a thread stuck in a computation (a hung worker step) would keep the process up.
    os._exit(status)


def serve(app: FastAPI, settings: Settings) -> None:
    """Serve the API and its health listener until SIGTERM, or exit non-zero on a fatal failure."""
    problem = startup_problem(settings)
    if problem is not None:
        logger.error(problem)
        sys.exit(2)
    api, health = servers(app, settings)
    status: list[int] = []
    app.state.on_fatal = exit_on_fatal(api, status)
    asyncio.run(serve_both(api, health))
    if status:
        _exit_now(status[0])
