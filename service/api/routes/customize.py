"""`POST /customize`: validate, enqueue, wait for the worker, reply."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Response
from starlette.concurrency import run_in_threadpool

from service.api import results
from service.api.deps import (
    CustomizeBody,
    IdempotencyKey,
    QueueDep,
    RateLimitedCaller,
    SettingsDep,
    TokenizerDep,
)
from service.api.openapi import ERROR_RESPONSES, RAW_IMAGE_RESPONSE
from service.schemas import CustomizeResponse
from service.validation import build_job_spec

router = APIRouter(tags=["generation"])


@router.post(
    "/customize",
    response_model=CustomizeResponse,
    responses={**RAW_IMAGE_RESPONSE, **ERROR_RESPONSES},
    summary="Generate images of the reference subjects in the scene of the prompt (synchronous)",
)
async def customize(
    # Declared first: FastAPI resolves dependencies in order, so auth and rate limit come
    # before the body is read and validated.
    caller: RateLimitedCaller,
    body: CustomizeBody,
    queue: QueueDep,
    settings: SettingsDep,
    tokenizer: TokenizerDep,
    idempotency_key: IdempotencyKey = None,
    accept: Annotated[str | None, Header(description="`image/png` (one image) for raw bytes.")] = None,
) -> CustomizeResponse | Response:
    started = time.perf_counter()
    raw_type = results.raw_image_type(accept, body)
    # Image decoding is CPU work: keep it off the event loop.
    spec = await run_in_threadpool(build_job_spec, body, settings, tokenizer)
    record = await results.submit(queue, spec, caller, idempotency_key)
    finished = await queue.wait(record.id, timeout_s=record.deadline - time.time())
    record = finished or record
    results.raise_unless_done(record, settings.job_timeout_s)
    total_s = time.perf_counter() - started
    if raw_type is not None:
        return results.raw_image_response(record, raw_type, total_s)
    return results.to_response(record, total_s)
