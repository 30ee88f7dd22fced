"""The FastAPI application: shared resources in the lifespan, routers, middleware, handlers."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from realcustom.tokenizer import load_clip_tokenizer
from service.api.docs import install_docs
from service.api.errors import install_error_handlers
from service.api.intake import Intake
from service.api.middleware import BodySizeLimitMiddleware, RequestMetricsMiddleware
from service.api.openapi import install_openapi
from service.api.ratelimit import RateLimiter
from service.api.routes import customize, demo, events, jobs, ops, subjects, webhooks
from service.queue import create_queue
from service.queue.protocol import JobQueue
from service.settings import Settings
from service.subjects.store import open_subject_store
from service.webhooks.dispatcher import delivering
from service.webhooks.outbox import create_outbox

logger = logging.getLogger(__name__)

# Something that runs beside the API for the app's lifetime, given the queue (the embedded worker).
Companion = Callable[[JobQueue], AbstractAsyncContextManager[None]]

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
        # The all-in-one process can serve only once its own worker is warm; the API alone once
        # Redis answers (workers come and go behind the queue).
        app.state.ready_needs_worker = companion is not None
        logger.info("queue: %s", "Redis Streams" if settings.redis_url else "in-process")
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(delivering(app.state.webhooks, app.state.queue, settings))
                if companion is not None:
                    await stack.enter_async_context(companion(app.state.queue))
                yield
        finally:
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
    app.include_router(demo.router)
    app.include_router(webhooks.router)
    install_docs(app)
    install_error_handlers(app)
    install_openapi(app)
    # Added last = outermost: metrics see every reply, the size limit's 413s included, and the size
    # limit applies before anything reads the body.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)
    return app


def startup_problem(settings: Settings) -> str | None:
    """Why the API must not start with these settings, or None."""
    if settings.require_api_keys and not settings.api_keys:
        return "REQUIRE_API_KEYS is set but API_KEYS is empty: refusing to serve an open API. Set API_KEYS."
    return None


def serve(app: FastAPI, settings: Settings) -> None:
    """uvicorn with the edge's connection limits (the HTTP server of both entry points)."""
    problem = startup_problem(settings)
    if problem is not None:
        logger.error(problem)
        sys.exit(2)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        limit_concurrency=settings.http_limit_concurrency,
        timeout_keep_alive=settings.http_keep_alive_s,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
    )
