"""The delivery loop: every API process (and the all-in-one process) runs one.

It claims due deliveries (leased, so several API replicas never send one at the same time; at
most `WEBHOOK_CONCURRENCY_PER_KEY` of one API key in flight, outbox.py), sends each in its own
task, at most `WEBHOOK_CONCURRENCY` at once, and stores the outcome:
delivered, due again after an exponential backoff with jitter, or failed after
`WEBHOOK_MAX_ATTEMPTS`. It runs beside the API on its event loop and never touches the workers,
so a slow or dead receiver never delays generation. A process stopped mid-attempt leaves its
lease to run out; another process (or itself, restarted) sends again: delivery is at least once,
and receivers deduplicate on `webhook-id` (one per job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from redis.exceptions import RedisError

from service import metrics
from service.background import BackgroundTasks
from service.cancelling import cancel_and_wait
from service.queue.protocol import JobQueue, JobRecord, JobState, QueueUnavailableError
from service.settings import Settings
from service.webhooks.addresses import RESOLVE_TIMEOUT_S, WebhookUrlError, parse_target, resolve
from service.webhooks.outbox import Delivery, Outbox
from service.webhooks.sender import DeliveryError, post, tls_context
from service.webhooks.signing import signed_headers, signing_secret

logger = logging.getLogger(__name__)

# A lease outlives the longest attempt (resolve + connect + reply) by this much.
LEASE_MARGIN_S = 10.0
DISPATCHER_TASK = "webhook-dispatcher"


def message_id(job_id: str) -> str:
    """The `webhook-id` of a job's webhook: the same for every attempt (receivers dedupe on it)."""
    return f"msg_{job_id}"


def job_url(base: str, job_id: str) -> str:
    return f"{base}/jobs/{job_id}"


def payload(record: JobRecord, event: str, base: str) -> bytes:
    """The body: the event, when it happened, and the job as GET /jobs/{id} shows it, with URLs
    for its images instead of their bytes."""
    url = job_url(base, record.id)
    data: dict[str, object] = {"id": record.id, "status": record.state.value, "url": url}
    data["error"] = record.error
    happened = time.time()
    if record.state == JobState.DONE and record.result is not None:
        result = record.result
        happened = result.finished_at
        data["seed"] = record.seed
        data["output_format"] = record.output_format
        data["images"] = [f"{url}/images/{index}" for index in range(len(result.images))]
        masks = result.masks
        data["masks"] = [f"{url}/masks/{index}" for index in range(len(masks))] if masks is not None else None
    timestamp = datetime.fromtimestamp(happened, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": event, "timestamp": timestamp, "data": data}, separators=(",", ":")).encode()


def backoff_s(attempt: int, settings: Settings) -> float:
    """Delay after failed attempt number `attempt` (1-based): doubling, capped, jittered to 50-100%
    so the retries of many jobs failing together spread out."""
    delay = min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0)


class WebhookDispatcher:
    def __init__(self, outbox: Outbox, queue: JobQueue, settings: Settings) -> None:
        self._outbox = outbox
        self._queue = queue
        self._settings = settings
        attempt_s = RESOLVE_TIMEOUT_S + settings.webhook_connect_timeout_s + settings.webhook_timeout_s
        self._lease_s = attempt_s + LEASE_MARGIN_S
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls = tls_context(settings.webhook_ca_file)
        self._freed = asyncio.Event()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._freed.set()

    async def run(self) -> None:
        try:
            while True:
                room = self._settings.webhook_concurrency - len(self._tasks)
                claimed: list[Delivery] = []
                if room > 0:
                    try:
                        claimed = await self._outbox.claim(room, self._lease_s)
                    except (RedisError, OSError) as error:
                        logger.warning("webhook outbox unreachable (%s); retrying", error)
                    for delivery in claimed:
                        task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery.job_id}")
                        self._tasks.add(task)
                        task.add_done_callback(self._task_done)
                self._freed.clear()
                # Claim again as soon as a delivery ends (a slot frees, and its owner may have
                # deliveries waiting for their per-key cap), else at the next poll.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), self._settings.webhook_poll_s)
        finally:
            # Interrupted attempts are sent again once their lease runs out.
            await cancel_and_wait(*self._tasks)

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            record = await self._queue.get(delivery.job_id)
        except QueueUnavailableError as error:
            logger.warning("webhook of job %s waits for the queue (%s)", delivery.job_id, error)
            return  # its lease runs out and it is claimed again
        if record is None:
            expired = "the job's record expired before delivery"
            await self._settle(delivery, "expired", delivery.attempts, expired)
            return
        attempt = delivery.attempts + 1
        try:
            await self._attempt(delivery, record)
        except Exception as error:  # whatever went wrong is one failed attempt, never a stuck delivery
            if isinstance(error, WebhookUrlError | DeliveryError):
                message = str(error)[:500]
            else:
                logger.exception("webhook of job %s: unexpected error", record.id)
                message = f"{type(error).__name__}: {error}"[:500]
            if attempt >= self._settings.webhook_max_attempts:
                logger.warning("webhook of job %s failed after %d attempts: %s", record.id, attempt, message)
                await self._settle(delivery, "failed", attempt, message)
            else:
                logger.info("webhook of job %s: attempt %d failed (%s)", record.id, attempt, message)
                await self._settle(delivery, "retried", attempt, message, backoff_s(attempt, self._settings))
            return
        logger.info("webhook of job %s delivered (attempt %d)", record.id, attempt)
        await self._settle(delivery, "delivered", attempt, None)

    async def _attempt(self, delivery: Delivery, record: JobRecord) -> None:
        settings = self._settings
        if settings.webhook_secret is None:
            raise DeliveryError("WEBHOOK_SECRET is not set on this API process; cannot sign")
        # Checked again now: the name may resolve elsewhere than at submission (DNS rebinding).
        destination = await resolve(parse_target(delivery.url, settings.webhook_allow_hosts))
        body = payload(record, delivery.event, settings.public_url or "")
        secret = signing_secret(settings.webhook_secret.get_secret_value(), record.owner)
        headers = signed_headers(secret, message_id(record.id), body)
        await post(
            destination,
            body,
            headers,
            settings.webhook_connect_timeout_s,
            settings.webhook_timeout_s,
            self._tls,
        )

    async def _settle(
        self, delivery: Delivery, outcome: str, attempts: int, error: str | None, retry_in_s: float = 0.0
    ) -> None:
        """Store the outcome (`retried` is stored as due again) and count it."""
        metrics.WEBHOOK_DELIVERIES.labels(outcome).inc()
        stored_outcome = {"retried": "retry", "expired": "failed"}.get(outcome, outcome)
        try:
            stored = await self._outbox.settle(delivery, stored_outcome, attempts, error, retry_in_s)
        except (RedisError, OSError) as error:
            logger.warning("webhook of job %s: outcome not stored (%s); sent again", delivery.job_id, error)
            return
        if not stored:
            logger.info("webhook of job %s: lease lost to another process", delivery.job_id)


@contextlib.asynccontextmanager
async def delivering(
    outbox: Outbox, queue: JobQueue, settings: Settings, background: BackgroundTasks
) -> AsyncIterator[None]:
    """Run the delivery loop for the duration of the block, a fresh one whenever it ends."""
    background.keep_running(DISPATCHER_TASK, lambda: WebhookDispatcher(outbox, queue, settings).run())
    try:
        yield
    finally:
        await background.stop_task(DISPATCHER_TASK)
