"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
import math

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from realcustom.native_size import native_size
from realcustom.presets import PRESETS
from service import metrics
from service.api import health
from service.api.deps import Caller, QueueDep, SettingsDep
from service.api.openapi import ERROR_RESPONSES
from service.queue.protocol import QueueUnavailableError
from service.schemas import HealthResponse, ModelInfo, PresetInfo

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "A background task or the worker is down"}},
    summary="The process is alive: its background tasks run (also on HEALTH_PORT)",
)
async def healthz(request: Request) -> JSONResponse:
    return health.reply(health.liveness(request.app.state))


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={
        503: {
            "model": HealthResponse,
            "description": "Not alive, the queue unreachable, or (all-in-one) its worker not warm",
        }
    },
    summary="This process can serve: its queue is reachable (also on HEALTH_PORT)",
)
async def readyz(request: Request) -> JSONResponse:
    return health.reply(await health.readiness(request.app.state))


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
        presets=[
            PresetInfo(
                name=preset.name,
                family=preset.family,
                scheduler=preset.scheduler,
                num_inference_steps=preset.steps,
                guidance_scale=preset.guidance_scale,
                mask_reused_step=preset.mask_reused_step,
                adapter=preset.adapter,
            )
            for preset in PRESETS.values()
        ],
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
