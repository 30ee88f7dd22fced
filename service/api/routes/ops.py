"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
import math

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from realcustom.native_size import native_size
from service import metrics
from service.api.deps import Caller, QueueDep, SettingsDep
from service.api.openapi import ERROR_RESPONSES
from service.queue.protocol import QueueUnavailableError
from service.schemas import HealthResponse, ModelInfo

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={
        503: {
            "model": HealthResponse,
            "description": "The queue is unreachable (or, in the all-in-one process, its worker is not warm)",
        }
    },
    summary="This process can serve: its queue is reachable",
)
async def readyz(request: Request, queue: QueueDep, settings: SettingsDep) -> HealthResponse | JSONResponse:
    """Ready while the queue answers, with or without a warm worker: jobs are accepted into the
    queue and wait there for one (up to JOB_TIMEOUT_S), so a worker restart or drain never takes
    the API out of its Service; `detail.ready_workers` says how many are warm."""
    reachable = await queue.ping()
    workers = 0
    if reachable:
        try:
            workers = await queue.ready_workers()
        except QueueUnavailableError:
            reachable = False
    ready = reachable and (workers > 0 or not request.app.state.ready_needs_worker)
    body = HealthResponse(
        status="ok" if ready else "not_ready",
        detail={
            "queue_reachable": reachable,
            "ready_workers": workers,
            "native_size": native_size(settings.model),
        },
    )
    if body.status == "ok":
        return body
    return JSONResponse(body.model_dump(), status_code=503)


@router.get(
    "/v1/models", response_model=ModelInfo, summary="The model served, its native size and the limits"
)
async def models(settings: SettingsDep) -> ModelInfo:
    return ModelInfo(
        model=settings.model,
        native_size=native_size(settings.model),
        min_side=settings.min_side,
        max_side=settings.max_side,
        max_steps=settings.max_steps,
        max_num_images=settings.max_num_images,
        max_subjects=settings.max_subjects,
        max_request_cost=settings.request_cost_cap if math.isfinite(settings.request_cost_cap) else None,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (needs an API key when keys are set)",
    response_class=Response,
    responses=ERROR_RESPONSES,
)
async def prometheus_metrics(_caller: Caller, queue: QueueDep, settings: SettingsDep) -> Response:
    # On an outage the last known depth stays; readyz reports the outage.
    with contextlib.suppress(QueueUnavailableError):
        metrics.QUEUE_DEPTH.set(await queue.depth())
        metrics.QUEUE_BYTES.set(await queue.held_bytes())
        usage = await queue.usage(settings.tier_names)
        for tier, held in usage.tiers.items():
            metrics.QUEUE_TIER_JOBS.labels(tier=tier).set(held.jobs)
            metrics.QUEUE_TIER_BYTES.labels(tier=tier).set(held.bytes)
        metrics.QUEUE_SECONDS_PER_COST.set(usage.seconds_per_cost or 0.0)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
