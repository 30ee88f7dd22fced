"""`POST /customize`: validate, enqueue, wait for the worker, reply."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request, Response

from service.api import results
from service.api.deps import AcceptedCustomize, QueueDep, SettingsDep
from service.api.errors import CLIENT_GONE
from service.api.openapi import ERROR_RESPONSES, RAW_IMAGE_RESPONSE
from service.cancelling import cancel_in_background
from service.queue.protocol import JobQueue, JobRecord
from service.schemas import CustomizeResponse

logger = logging.getLogger(__name__)
router = APIRouter(tags=["generation"])


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read, so only a disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait_unless_gone(request: Request, queue: JobQueue, record: JobRecord) -> JobRecord | None:
    """The finished (or deadline-time) record, or None when the client left: its job is then
    cancelled (a running one stops at its next denoising step)."""
    waiting = asyncio.ensure_future(queue.wait(record.id, timeout_s=record.deadline - time.time()))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    if waiting.done():
        cancel_in_background(gone)
        return waiting.result() or record
    cancel_in_background(waiting)
    cancelled = await queue.cancel(record.id)
    logger.info("client left before job %s finished; it is now %s", record.id, cancelled and cancelled.state)
    return None


@router.post(
    "/customize",
    response_model=CustomizeResponse,
    responses={**RAW_IMAGE_RESPONSE, **ERROR_RESPONSES},
    summary="Generate images of the reference subjects in the scene of the prompt (synchronous)",
)
async def customize(
    request: Request, accepted: AcceptedCustomize, queue: QueueDep, settings: SettingsDep
) -> CustomizeResponse | Response:
    finished = await _wait_unless_gone(request, queue, accepted.record)
    if finished is None:
        return Response(status_code=CLIENT_GONE)
    results.raise_unless_done(finished, settings.job_timeout_s)
    total_s = time.perf_counter() - accepted.arrived  # from arrival: queue_wait <= total
    if accepted.raw_media_type is not None:
        return results.raw_image_response(finished, total_s)
    return results.to_response(finished, total_s)
