"""Asynchronous jobs: `POST /jobs`, `GET /jobs/{id}`, `DELETE /jobs/{id}`."""

from __future__ import annotations

from fastapi import APIRouter, status
from starlette.concurrency import run_in_threadpool

from service.api import results
from service.api.deps import (
    Caller,
    CustomizeBody,
    IdempotencyKey,
    QueueDep,
    RateLimitedCaller,
    SettingsDep,
    TokenizerDep,
)
from service.api.openapi import ERROR_RESPONSES
from service.errors import ApiError
from service.queue.protocol import JobQueue, JobRecord, JobState
from service.schemas import JobAccepted, JobStatusResponse
from service.validation import build_job_spec

router = APIRouter(prefix="/jobs", tags=["jobs"])


async def _find(queue: JobQueue, job_id: str) -> JobRecord:
    record = await queue.get(job_id)
    if record is None:
        raise ApiError(404, "not_found", f"no job {job_id}; finished jobs are kept for a limited time")
    return record


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses=ERROR_RESPONSES,
    summary="Queue a customisation job; poll GET /jobs/{id} for the result",
)
async def create_job(
    # Declared first: FastAPI resolves dependencies in order, so auth and rate limit come
    # before the body is read and validated.
    caller: RateLimitedCaller,
    body: CustomizeBody,
    queue: QueueDep,
    settings: SettingsDep,
    tokenizer: TokenizerDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    spec = await run_in_threadpool(build_job_spec, body, settings, tokenizer)
    record = await results.submit(queue, spec, caller, idempotency_key)
    return JobAccepted(id=record.id, status=results.effective_state(record), url=f"/jobs/{record.id}")


@router.get("/{job_id}", response_model=JobStatusResponse, responses=ERROR_RESPONSES, summary="Job status")
async def get_job(_caller: Caller, job_id: str, queue: QueueDep) -> JobStatusResponse:
    return results.status_response(await _find(queue, job_id))


@router.delete(
    "/{job_id}", response_model=JobStatusResponse, responses=ERROR_RESPONSES, summary="Cancel a queued job"
)
async def cancel_job(_caller: Caller, job_id: str, queue: QueueDep) -> JobStatusResponse:
    await _find(queue, job_id)
    record = await queue.cancel(job_id)
    if record is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    if record.state != JobState.CANCELLED:
        raise ApiError(
            409,
            "not_cancellable",
            f"job {job_id} is {results.effective_state(record)}; only queued jobs cancel",
        )
    return results.status_response(record)
