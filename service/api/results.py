"""From queue records to HTTP replies (shared by the synchronous and asynchronous routes)."""

from __future__ import annotations

import base64
import hashlib
import time

from fastapi import Response

from service import metrics
from service.api.ratelimit import retry_after_header
from service.errors import ApiError
from service.images import MEDIA_TYPES
from service.queue.protocol import JobQueue, JobRecord, JobSpec, JobState, QueueFullError
from service.schemas import CustomizeResponse, JobStatusResponse, Timings

# Refusals counted by tier and priority: admission's own (a bounded set of codes, every other
# error reply is counted by realcustom_requests_rejected_total alone).
ADMISSION_CODES = frozenset(
    {
        "queue_full",
        "key_queue_full",
        "key_cost_in_flight",
        "deadline_unmeetable",
        "subjects_full",
        "key_subjects_full",
        "request_too_costly",
        "priority_not_allowed",
    }
)


def count_refusal(error: ApiError, tier: str, priority: str) -> None:
    if error.code in ADMISSION_CODES:
        metrics.ADMISSION_REFUSALS.labels(tier=tier, priority=priority or "none", reason=error.code).inc()


def refusal(error: QueueFullError, tier: str, priority: str = "") -> ApiError:
    """A limit's refusal as the 429 that names it (counted by tier and priority)."""
    reply = ApiError(429, error.code, str(error), headers=retry_after_header(error.retry_after_s))
    count_refusal(reply, tier, priority)
    return reply


async def submit(queue: JobQueue, spec: JobSpec, idempotency_key: str | None) -> JobRecord:
    """Enqueue; an Idempotency-Key is scoped to the job's owner and bound to its request."""
    scoped_key = None
    if idempotency_key:
        scoped_key = hashlib.sha256(f"{spec.owner}\0{idempotency_key}".encode()).hexdigest()
    try:
        record = await queue.submit(spec, scoped_key)
    except QueueFullError as error:
        raise refusal(error, spec.tier, spec.priority) from None
    if record.id == spec.id:
        metrics.JOBS_ACCEPTED.inc()
    elif record.request_hash != spec.request_hash:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"Idempotency-Key {idempotency_key!r} was used for another request (job {record.id}); "
            "send a new key for a new request, or repeat the original request unchanged",
            field="Idempotency-Key",
        )
    return record


def owned(record: JobRecord | None, owner: str) -> JobRecord | None:
    """The record if `owner` created it; another caller's job looks like no job at all."""
    return record if record is not None and record.owner == owner else None


def effective_state(record: JobRecord) -> JobState:
    """A queued job past its deadline will be dropped by the worker that takes it: say so now."""
    if record.state == JobState.QUEUED and time.time() > record.deadline:
        return JobState.EXPIRED
    return record.state


def to_response(record: JobRecord, total_s: float) -> CustomizeResponse:
    result = record.result
    assert result is not None, "a done job always has a result"
    return CustomizeResponse(
        id=record.id,
        images=[base64.b64encode(image).decode() for image in result.images],
        masks=[base64.b64encode(mask).decode() for mask in result.masks]
        if result.masks is not None
        else None,
        seed=record.seed,
        output_format=record.output_format,
        timings=Timings(
            queue_wait=result.queue_wait_seconds,
            prepare=result.prepare_seconds,
            inference=result.inference_seconds,
            total=total_s,
        ),
    )


def raise_unless_done(record: JobRecord, timeout_s: float) -> None:
    """Turn a job that did not succeed into the matching error reply (with its id, for GET /jobs)."""
    state = effective_state(record)
    job = {"X-Job-Id": record.id}
    if state == JobState.DONE:
        return
    if state == JobState.FAILED:
        # The worker's exception text stays in its log (and GET /jobs/{id}); the reply names the job.
        raise ApiError(
            500,
            "generation_failed",
            f"the generation failed (job {record.id}); see GET /jobs/{record.id}",
            headers=job,
        )
    if state == JobState.CANCELLED:
        raise ApiError(409, "cancelled", "the job was cancelled", headers=job)
    if state == JobState.RUNNING:
        outcome = f"it is running and will finish: fetch the result with GET /jobs/{record.id}"
    else:
        outcome = "it was not started and will not be computed; retry later, when the service is less busy"
    raise ApiError(
        504,
        "deadline_exceeded",
        f"the job did not finish within its {timeout_s:.0f} s deadline; {outcome}",
        headers=job,
    )


def status_response(record: JobRecord) -> JobStatusResponse:
    state = effective_state(record)
    result = None
    if state == JobState.DONE and record.result is not None:
        result = to_response(record, record.result.finished_at - record.enqueued_at)
    return JobStatusResponse(
        id=record.id, status=state, worker=record.worker, error=record.error, result=result
    )


def raw_image_response(record: JobRecord, total_s: float) -> Response:
    """The first image, labelled with the format the stored job was encoded in."""
    result = record.result
    assert result is not None, "a done job always has a result"
    return Response(
        content=result.images[0],
        media_type=MEDIA_TYPES[record.output_format],
        headers={
            "X-Job-Id": record.id,
            "X-Seed": str(record.seed),
            "X-Timings": f"queue_wait={result.queue_wait_seconds:.4f}, "
            f"inference={result.inference_seconds:.4f}, total={total_s:.4f}",
        },
    )
