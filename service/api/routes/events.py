"""`GET /jobs/{id}/events`: a job's live progress as Server-Sent Events.

While the job is queued: `queued` events with its position (when it changes). While it runs:
`progress` events (their `id` is the event log's, so `Last-Event-ID` resumes after it), with a
preview and the subject masks as data: URLs when `previews=true`. Then one final event (`done`,
`failed`, `cancelled` or `expired`) and the stream closes. Streams are bounded in number (per
caller and per API process) and in duration; a client past the duration reconnects with its
Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api import results
from service.api.deps import Caller, QueueDep, SettingsDep, owner_of
from service.api.openapi import ERROR_RESPONSES
from service.api.ratelimit import retry_after_header
from service.cancelling import cancel_in_background
from service.errors import ApiError
from service.queue.protocol import (
    EVENT_ID_PATTERN,
    JobProgress,
    JobQueue,
    JobRecord,
    JobState,
    QueueUnavailableError,
)
from service.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

# How often a queued job's position is looked at (an event is sent only when it changes).
QUEUED_POLL_S = 0.5
# A comment line at least this often, so proxies and clients keep an idle stream open.
KEEPALIVE_S = 15.0
# Longest wait for a running job's next event (or its end) in one go.
RUNNING_BLOCK_S = 5.0
# How long a preview watch lasts in the queue, and how often an open stream renews it.
WATCH_TTL_S = 5.0
WATCH_RENEW_S = 2.0
# Delay EventSource waits before reconnecting (sent as the stream's `retry:`).
RECONNECT_MS = 1000

FINAL_MESSAGES = {
    JobState.FAILED: "the generation failed",
    JobState.CANCELLED: "the job was cancelled",
    JobState.EXPIRED: "the job missed its deadline and was not computed",
}


class StreamSlots:
    """Event streams open in this API process: at most `total`, and `per_caller` per caller."""

    def __init__(self, total: int, per_caller: int) -> None:
        self._total = total
        self._per_caller = per_caller
        self._open: Counter[str] = Counter()

    def acquire(self, caller: str) -> Callable[[], None]:
        """Take a slot (429 when none is free); returns the function that frees it."""
        if self._open[caller] >= self._per_caller:
            raise ApiError(
                429,
                "too_many_streams",
                f"this caller already has {self._per_caller} event streams open "
                "(EVENTS_MAX_STREAMS_PER_CALLER); close one first",
                headers=retry_after_header(1),
            )
        if self._open.total() >= self._total:
            raise ApiError(
                429,
                "too_many_streams",
                f"this API process serves {self._total} event streams, its limit; retry shortly or poll "
                "GET /jobs/{id}",
                headers=retry_after_header(1),
            )
        self._open[caller] += 1

        def release() -> None:
            self._open[caller] -= 1
            if self._open[caller] <= 0:
                del self._open[caller]

        return release


def stream_slots(settings: Settings) -> StreamSlots:
    return StreamSlots(settings.events_max_streams, settings.events_max_streams_per_caller)


class EventStream(StreamingResponse):
    """`text/event-stream` that frees its slot however the stream ends (also when it never starts)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        # no-cache / no buffering: every event reaches the client at once, also through nginx.
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    """One event in the text/event-stream format (JSON data is one line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _png_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def progress_data(progress: JobProgress, previews: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"step": progress.step, "steps": progress.steps, "eta_s": progress.eta_s}
    if previews and progress.preview is not None:
        data["preview"] = _png_url(progress.preview)
    if previews and progress.masks is not None:
        data["masks"] = [_png_url(mask) for mask in progress.masks]
    return data


def final_event(record: JobRecord | None, job_id: str) -> str:
    """The last event: where the results are (URLs, never image bytes), or what went wrong."""
    if record is None:
        return sse("expired", {"id": job_id, "status": "expired", "error": "the job is no longer kept"})
    state = results.effective_state(record)
    url = f"/jobs/{record.id}"
    if state == JobState.DONE and record.result is not None:
        result = record.result
        masks = result.masks
        data = {
            "id": record.id,
            "status": state.value,
            "url": url,
            "seed": record.seed,
            "output_format": record.output_format,
            "images": [f"{url}/images/{index}" for index in range(len(result.images))],
            "masks": [f"{url}/masks/{index}" for index in range(len(masks))] if masks is not None else None,
            "timings": {"queue_wait": result.queue_wait_seconds, "inference": result.inference_seconds},
        }
        return sse("done", data)
    error = record.error or FINAL_MESSAGES.get(state, "the job ended")
    return sse(state.value, {"id": record.id, "status": state.value, "error": error})


async def _events_or_end(
    queue: JobQueue, job_id: str, after: str | None, block_s: float
) -> list[tuple[str, JobProgress]]:
    """The next progress events, or none as soon as the job finishes (within `block_s`)."""
    reading = asyncio.ensure_future(queue.events(job_id, after, block_s))
    ending = asyncio.ensure_future(queue.wait(job_id, block_s))
    try:
        await asyncio.wait({reading, ending}, return_when=asyncio.FIRST_COMPLETED)
        return reading.result() if reading.done() else []
    finally:
        # Not awaited: a redis-py call cancelled while it connects may sit out its wait (block_s).
        # A late failure of a discarded read is not an error.
        cancel_in_background(reading, ending)


async def job_stream(
    queue: JobQueue, job_id: str, after: str | None, previews: bool, max_duration_s: float
) -> AsyncIterator[str]:
    """The events of one stream (module docstring); ends at the final event or the duration limit."""
    started = time.monotonic()
    last_sent = started
    watched_at = -WATCH_RENEW_S
    position: int | None = None
    yield f"retry: {RECONNECT_MS}\n\n"
    try:
        while time.monotonic() - started < max_duration_s:
            record = await queue.get(job_id)
            state = None if record is None else results.effective_state(record)
            if state is None or state.finished:
                for event_id, progress in await queue.events(job_id, after, block_s=0):
                    yield sse("progress", progress_data(progress, previews), event_id)
                yield final_event(record, job_id)
                return
            now = time.monotonic()
            if previews and now - watched_at >= WATCH_RENEW_S:
                await queue.watch(job_id, previews=True, ttl_s=WATCH_TTL_S)
                watched_at = now
            if state == JobState.QUEUED:
                ahead = await queue.position(job_id)
                if ahead is not None and ahead != position:
                    position = ahead
                    yield sse("queued", {"id": job_id, "status": "queued", "position": ahead})
                    last_sent = time.monotonic()
                events = await queue.events(job_id, after, block_s=QUEUED_POLL_S)
            else:
                block_s = WATCH_RENEW_S if previews else RUNNING_BLOCK_S
                events = await _events_or_end(queue, job_id, after, block_s)
            for event_id, progress in events:
                yield sse("progress", progress_data(progress, previews), event_id)
                after, last_sent = event_id, time.monotonic()
            if time.monotonic() - last_sent >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
        yield ": longest duration reached (EVENTS_MAX_DURATION_S); reconnect with Last-Event-ID\n\n"
    except QueueUnavailableError as error:
        # The client reconnects (EventSource does by itself) and resumes from its Last-Event-ID.
        logger.warning("event stream of job %s ended: %s", job_id, error)
        yield f": the queue is unreachable ({error}); reconnect to resume\n\n"


EventId = Annotated[str | None, Header(alias="Last-Event-ID", pattern=EVENT_ID_PATTERN)]
# Errors come before the stream starts, as JSON.
ERROR_DESCRIPTIONS = {
    **{code: ERROR_RESPONSES[code]["description"] for code in (401, 404, 422, 503)},
    429: "Too many event streams of this caller or of this API process; see Retry-After",
}
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for code, description in ERROR_DESCRIPTIONS.items()
}


@router.get(
    "/{job_id}/events",
    status_code=200,
    response_class=EventStream,
    responses={
        **JSON_ERRORS,
        200: {
            "description": "Server-Sent Events: `queued` {position}, `progress` {step, steps, eta_s[, "
            "preview, masks]} (with an `id`), then one of `done` {images, masks: URLs, seed, timings}, "
            "`failed`, `cancelled`, `expired` {error}. Comment lines keep the stream alive.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
    summary="Live progress of a job (Server-Sent Events)",
)
async def job_events(
    request: Request,
    caller: Caller,
    job_id: str,
    queue: QueueDep,
    settings: SettingsDep,
    previews: Annotated[
        bool, Query(description="Also send a small preview image and the subject masks at each step.")
    ] = False,
    last_event_id: EventId = None,
    last_event_id_query: Annotated[
        str | None,
        Query(
            alias="last_event_id",
            pattern=EVENT_ID_PATTERN,
            description="Resume after this event id (for clients that cannot set Last-Event-ID).",
        ),
    ] = None,
) -> EventStream:
    if results.owned(await queue.get(job_id), owner_of(caller)) is None:
        raise ApiError(
            404, "not_found", f"no job {job_id} of yours; finished jobs are kept for a limited time"
        )
    release = request.app.state.event_streams.acquire(caller)
    after = last_event_id or last_event_id_query
    return EventStream(job_stream(queue, job_id, after, previews, settings.events_max_duration_s), release)
