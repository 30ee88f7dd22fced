"""Liveness and readiness, answered on the API's own port and on the health listener.

The health listener (`HEALTH_PORT`, same `HOST`) is a second uvicorn server on the API's event
loop with connection limits of its own, so that no number of client connections on `PORT` can
make the probes wait for a slot or answer 503 for want of one; it serves only these two routes.
Being on the same event loop is deliberate: an event loop that stopped turning is not alive.

Alive = every background task is running (service/background.py) and the embedded worker, if
any, makes progress. Ready = alive, the queue answers, and (all-in-one process) its worker is warm.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from realcustom.native_size import native_size
from service.background import BackgroundTasks
from service.queue.protocol import QueueUnavailableError
from service.schemas import HealthResponse

logger = logging.getLogger(__name__)


def liveness(state: Any) -> HealthResponse:
    """`ok`, or `failing` with the problems (the process must be restarted if they last)."""
    background: BackgroundTasks | None = getattr(state, "background", None)
    if background is None:  # the lifespan has not started yet: loading, alive
        return HealthResponse(status="ok", detail={"starting": True})
    problems = background.problems()
    return HealthResponse(
        status="failing" if problems else "ok", detail={"problems": problems, "tasks": background.detail()}
    )


async def readiness(state: Any) -> HealthResponse:
    """Ready while alive and the queue answers, with or without a warm worker: jobs are accepted
    into the queue and wait there for one (up to JOB_TIMEOUT_S), so a worker restart or drain never
    takes the API out of its Service; the all-in-one process needs its own worker warm."""
    if getattr(state, "queue", None) is None:
        return HealthResponse(status="not_ready", detail={"starting": True})
    alive = liveness(state)
    queue = state.queue
    reachable = await queue.ping()
    workers = 0
    if reachable:
        try:
            workers = await queue.ready_workers()
        except QueueUnavailableError:
            reachable = False
    ready = alive.status == "ok" and reachable and (workers > 0 or not state.ready_needs_worker)
    return HealthResponse(
        status="ok" if ready else "not_ready",
        detail={  # why it is not alive: /healthz says
            "queue_reachable": reachable,
            "ready_workers": workers,
            "native_size": native_size(state.settings.model),
        },
    )


def reply(health: HealthResponse) -> JSONResponse:
    return JSONResponse(health.model_dump(), status_code=200 if health.status == "ok" else 503)


def health_app(state: Any) -> Starlette:
    """The health listener's application: the two probes over the API app's `state`."""

    async def healthz(_request: Request) -> JSONResponse:
        return reply(liveness(state))

    async def readyz(_request: Request) -> JSONResponse:
        return reply(await readiness(state))

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)])


def bind(host: str, port: int) -> socket.socket:
    """The health listener's socket; a taken port (a second API process on the host) falls back to a
    free one, with a warning: the probes then fail, which says so too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        if port == 0:
            raise
        logger.warning(
            "health port %d on %s is taken (%s): using a free port instead; give each API process its own "
            "HEALTH_PORT",
            port,
            host,
            error.strerror or error,
        )
        sock.bind((host, 0))
    sock.set_inheritable(True)
    return sock
