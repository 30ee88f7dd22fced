"""Asynchronous jobs: `POST /jobs`, `GET /jobs/{id}`, `DELETE /jobs/{id}` (a queued job at once, a
running one at its next denoising step), and each result image
at `GET /jobs/{id}/images/{n}` (`/masks/{n}`), the URLs a webhook carries.

A job belongs to the caller that created it (its API key; its address when the API is open):
for any other caller it does not exist (404).
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from service.api import results
from service.api.deps import AcceptedJob, Caller, QueueDep, SettingsDep, WebhooksDep, owner_of
from service.api.openapi import ERROR_RESPONSES
from service.errors import ApiError
from service.images import MEDIA_TYPES
from service.queue.protocol import JobQueue, JobRecord, JobState
from service.schemas import JobAccepted, JobStatusResponse

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no job {job_id} of yours; finished jobs are kept for a limited time")


async def _find(queue: JobQueue, job_id: str, caller: str) -> JobRecord:
    record = results.owned(await queue.get(job_id), owner_of(caller))
    if record is None:
        raise _not_found(job_id)
    return record


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses=ERROR_RESPONSES,
    summary="Queue a customisation job; poll GET /jobs/{id} (the Location header) for the result",
)
async def create_job(accepted: AcceptedJob, response: Response) -> JobAccepted:
    record = accepted.record
    url = f"/jobs/{record.id}"
    response.headers["Location"] = url
    return JobAccepted(id=record.id, status=results.effective_state(record), url=url)


@router.get("/{job_id}", response_model=JobStatusResponse, responses=ERROR_RESPONSES, summary="Job status")
async def get_job(caller: Caller, job_id: str, queue: QueueDep, webhooks: WebhooksDep) -> JobStatusResponse:
    response = results.status_response(await _find(queue, job_id, caller))
    if response.status.finished:
        response.webhook = await webhooks.status(job_id)
    return response


async def _result_file(queue: JobQueue, job_id: str, caller: str, kind: str, index: int) -> Response:
    record = await _find(queue, job_id, caller)
    if record.state != JobState.DONE or record.result is None:
        raise ApiError(
            409, "not_done", f"job {job_id} is {results.effective_state(record)}; it has no images"
        )
    files = record.result.images if kind == "images" else record.result.masks or []
    if not 0 <= index < len(files):
        raise ApiError(404, "not_found", f"job {job_id} has {len(files)} {kind}; indices start at 0")
    media_type = MEDIA_TYPES[record.output_format] if kind == "images" else MEDIA_TYPES["png"]
    return Response(content=files[index], media_type=media_type)


@router.get(
    "/{job_id}/images/{index}",
    response_class=Response,
    responses={**ERROR_RESPONSES, 200: {"content": {media: {} for media in MEDIA_TYPES.values()}}},
    summary="One image of a done job, as raw bytes",
)
async def get_job_image(caller: Caller, job_id: str, index: int, queue: QueueDep) -> Response:
    return await _result_file(queue, job_id, caller, "images", index)


@router.get(
    "/{job_id}/masks/{index}",
    response_class=Response,
    responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}}}},
    summary="One subject mask of a done job (return_masks), as PNG",
)
async def get_job_mask(caller: Caller, job_id: str, index: int, queue: QueueDep) -> Response:
    return await _result_file(queue, job_id, caller, "masks", index)


@router.delete(
    "/{job_id}",
    response_model=JobStatusResponse,
    responses={
        **ERROR_RESPONSES,
        202: {
            "model": JobStatusResponse,
            "description": "The job is running: it stops at its next denoising step (see `message`)",
        },
    },
    summary="Cancel a job: a queued one at once, a running one at its next step",
)
async def cancel_job(
    caller: Caller, job_id: str, queue: QueueDep, settings: SettingsDep, response: Response
) -> JobStatusResponse:
    await _find(queue, job_id, caller)
    record = await queue.cancel(job_id)
    if record is not None and record.state == JobState.RUNNING:
        # Its worker ends it at the next step boundary: usually well within the wait.
        record = await queue.wait(job_id, timeout_s=settings.cancel_wait_s)
    if record is None:
        raise _not_found(job_id)
    if record.state == JobState.RUNNING:
        response.status_code = status.HTTP_202_ACCEPTED
        reply = results.status_response(record)
        reply.message = (
            f"cancellation requested: job {job_id} stops at its next denoising step and then reads "
            f"`cancelled` at GET /jobs/{job_id}"
        )
        return reply
    if record.state != JobState.CANCELLED:
        raise ApiError(
            409,
            "not_cancellable",
            f"job {job_id} is {results.effective_state(record)}; only queued or running jobs cancel",
        )
    return results.status_response(record)
