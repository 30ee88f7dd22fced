"""The webhooks to send: due times, leases and outcomes, in Redis or in the process's memory.

Redis (`{p}` the queue's hash tag, `service/queue/keys.py`): `{p}:webhook:<job id>` holds one
delivery (url, event, state, attempts, last_error, last_attempt_at; the job's result TTL) and the
sorted set `{p}:webhooks` its due time. The queue's terminal-state scripts write both
(`schedule_webhook` in `service/queue/redis_scripts.py`), so a delivery survives every restart.

A claim moves the due time of due deliveries to the end of a lease, atomically: while the lease
runs no other API process claims them, and when the claimer dies they fall due again. That new
due time is the claim's fencing token: its outcome is stored only while the score is still the
one it set (a claim whose lease ran out and was taken over stores nothing). Times are Redis' own
clock (`TIME`), so the API processes' clocks do not matter.

In memory (the all-in-one process without Redis): the same, in a dict, lost on restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from service.queue.connect import connect_async
from service.queue.keys import QueueKeys
from service.queue.memory import InProcessQueue
from service.queue.protocol import JobQueue, JobRecord, QueueUnavailableError
from service.settings import Settings
from service.webhooks.events import EVENT_OF_STATE

Outcome = Literal["delivered", "retry", "failed"]

CLAIM = """#!lua flags=allow-oom
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for index, job_id in ipairs(due) do
  -- Distinct per delivery, so each claim's fencing token is its own.
  local lease = now + tonumber(ARGV[1]) + index / 1000000
  redis.call('ZADD', KEYS[1], 'XX', lease, job_id)
  table.insert(claimed, job_id)
  table.insert(claimed, tostring(redis.call('ZSCORE', KEYS[1], job_id)))
end
return claimed
"""

# ARGV: job id, lease (the claim's score), outcome, attempts, last error, retry delay (s).
SETTLE = """#!lua flags=allow-oom
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or score ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('HSET', KEYS[2], 'attempts', ARGV[4], 'last_error', ARGV[5], 'last_attempt_at', tostring(now))
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[6]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'state', ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One claimed delivery."""

    job_id: str
    url: str
    event: str
    attempts: int  # attempts made before this claim
    lease: str  # fencing token of the claim


class WebhookStatus(BaseModel):
    """The webhook of a job, as `GET /jobs/{id}` shows it."""

    url: str
    event: str = Field(description="`job.completed`, `job.failed` or `job.cancelled`.")
    state: Literal["pending", "delivered", "failed"] = Field(
        description="`pending` while attempts remain, `delivered` once the receiver answered 2xx, `failed` "
        "after the last attempt."
    )
    attempts: int
    last_error: str | None = None
    last_attempt_at: float | None = Field(None, description="Unix time of the last attempt.")


class Outbox(Protocol):
    async def claim(self, limit: int, lease_s: float) -> list[Delivery]:
        """Up to `limit` due deliveries, each leased for `lease_s`."""
        ...

    async def settle(
        self, delivery: Delivery, outcome: Outcome, attempts: int, error: str | None, retry_in_s: float
    ) -> bool:
        """Store an attempt's outcome (`retry`: due again in `retry_in_s`); False when the lease was
        lost or the delivery is gone."""
        ...

    async def status(self, job_id: str) -> WebhookStatus | None: ...

    async def close(self) -> None: ...


class RedisOutbox:
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self._client = connect_async(
            settings.redis_url,
            settings.redis_password.get_secret_value() if settings.redis_password else None,
            settings.redis_sentinel_password.get_secret_value() if settings.redis_sentinel_password else None,
            health_check_interval=10,
        )
        self._keys = QueueKeys(settings.queue_name)
        self._claim = self._client.register_script(CLAIM)
        self._settle = self._client.register_script(SETTLE)

    async def claim(self, limit: int, lease_s: float) -> list[Delivery]:
        reply = await self._claim(keys=[self._keys.webhooks_due], args=[lease_s, limit], client=self._client)
        deliveries = []
        for index in range(0, len(reply), 2):
            job_id = reply[index].decode()
            fields = await self._client.hgetall(self._keys.webhook(job_id))
            if not fields:  # expired with its job (kept for the job's result TTL): nothing to send
                await self._client.zrem(self._keys.webhooks_due, job_id)
                continue
            deliveries.append(
                Delivery(
                    job_id=job_id,
                    url=fields[b"url"].decode(),
                    event=fields[b"event"].decode(),
                    attempts=int(fields[b"attempts"]),
                    lease=reply[index + 1].decode(),
                )
            )
        return deliveries

    async def settle(
        self, delivery: Delivery, outcome: Outcome, attempts: int, error: str | None, retry_in_s: float
    ) -> bool:
        stored = await self._settle(
            keys=[self._keys.webhooks_due, self._keys.webhook(delivery.job_id)],
            args=[delivery.job_id, delivery.lease, outcome, attempts, error or "", retry_in_s],
            client=self._client,
        )
        return bool(stored)

    async def status(self, job_id: str) -> WebhookStatus | None:
        try:
            fields = await self._client.hgetall(self._keys.webhook(job_id))
        except (RedisError, OSError) as error:
            raise QueueUnavailableError(f"Redis is unreachable: {error}") from error
        if not fields:
            return None
        return WebhookStatus(
            url=fields[b"url"].decode(),
            event=fields[b"event"].decode(),
            state=fields[b"state"].decode(),
            attempts=int(fields[b"attempts"]),
            last_error=fields.get(b"last_error", b"").decode() or None,
            last_attempt_at=float(fields[b"last_attempt_at"]) if b"last_attempt_at" in fields else None,
        )

    async def close(self) -> None:
        await self._client.aclose()


class MemoryOutbox:
    """The outbox of the in-process queue (`on_finished` is its listener); kept for `ttl_s`."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._statuses: dict[str, WebhookStatus] = {}
        self._due: dict[str, float] = {}
        self._expires: dict[str, float] = {}
        self._claims = 0

    def on_finished(self, record: JobRecord) -> None:
        event = EVENT_OF_STATE.get(record.state)
        if record.webhook is None or event not in record.webhook.events or record.id in self._statuses:
            return
        status = WebhookStatus(url=record.webhook.url, event=event, state="pending", attempts=0)
        self._statuses[record.id] = status
        self._due[record.id] = time.monotonic()
        self._expires[record.id] = time.monotonic() + self._ttl_s

    async def claim(self, limit: int, lease_s: float) -> list[Delivery]:
        now = time.monotonic()
        for job_id in [job_id for job_id, expires in self._expires.items() if expires < now]:
            for store in (self._statuses, self._due, self._expires):
                store.pop(job_id, None)
        claimed = []
        for job_id in [job_id for job_id, due in self._due.items() if due <= now][:limit]:
            self._claims += 1
            self._due[job_id] = now + lease_s
            status = self._statuses[job_id]
            claimed.append(Delivery(job_id, status.url, status.event, status.attempts, str(self._claims)))
        return claimed

    async def settle(
        self, delivery: Delivery, outcome: Outcome, attempts: int, error: str | None, retry_in_s: float
    ) -> bool:
        status = self._statuses.get(delivery.job_id)
        if status is None:
            return False
        update = {"attempts": attempts, "last_error": error, "last_attempt_at": time.time()}
        if outcome == "retry":
            self._due[delivery.job_id] = time.monotonic() + retry_in_s
        else:
            update["state"] = outcome
            self._due.pop(delivery.job_id, None)
        self._statuses[delivery.job_id] = status.model_copy(update=update)
        return True

    async def status(self, job_id: str) -> WebhookStatus | None:
        return self._statuses.get(job_id)

    async def close(self) -> None:
        """Nothing to release: the deliveries live and die with the process."""


def create_outbox(settings: Settings, queue: JobQueue) -> Outbox:
    """The Redis outbox beside the Redis queue; the in-process queue's own otherwise."""
    if settings.redis_url:
        return RedisOutbox(settings)
    assert isinstance(queue, InProcessQueue)
    outbox = MemoryOutbox(settings.result_ttl_s)
    queue.on_finished(outbox.on_finished)
    return outbox
