"""Events of a job's webhook, and the terminal state each one reports.

An expired job (its deadline passed before a worker ran it) sends `job.failed`, with the state
`expired` and the reason in the payload: for a caller both mean "no images, retry". The mapping
is repeated in the Lua of `service/queue/redis_scripts.py` (`schedule_webhook`).
"""

from __future__ import annotations

from typing import Literal

from service.queue.protocol import JobState

WebhookEvent = Literal["job.completed", "job.failed", "job.cancelled"]
EVENTS: tuple[WebhookEvent, ...] = ("job.completed", "job.failed", "job.cancelled")

EVENT_OF_STATE: dict[JobState, WebhookEvent] = {
    JobState.DONE: "job.completed",
    JobState.FAILED: "job.failed",
    JobState.EXPIRED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}
