"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.api.deps import QueueDep
from service.queue.protocol import QueueUnavailableError
from service.schemas import HealthResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "No warm worker, or the queue is unreachable"}},
    summary="A worker is warm and the queue is reachable",
)
async def readyz(queue: QueueDep) -> HealthResponse | JSONResponse:
    reachable = await queue.ping()
    workers = 0
    if reachable:
        try:
            workers = await queue.ready_workers()
        except QueueUnavailableError:
            reachable = False
    body = HealthResponse(
        status="ok" if reachable and workers > 0 else "not_ready",
        detail={"queue_reachable": reachable, "ready_workers": workers},
    )
    if body.status == "ok":
        return body
    return JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(queue: QueueDep) -> Response:
    # On an outage the last known depth stays; readyz reports the outage.
    with contextlib.suppress(QueueUnavailableError):
        metrics.QUEUE_DEPTH.set(await queue.depth())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
