"""The webhooks to send: due times, leases and outcomes, in Redis or in the process's memory.

Redis (`{p}` the queue's hash tag, `service/queue/keys.py`): `{p}:webhook:<job id>` holds one
delivery (url, event, state, attempts, last_error, last_attempt_at, owner; the job's result TTL) and
the sorted set `{p}:webhooks` its due time. The queue's terminal-state scripts write both
(`schedule_webhook` in `service/queue/redis_scripts.py`), so a delivery survives every restart.

A claim takes due deliveries in due order and moves each one's due time to the end of a lease,
atomically: while the lease runs no other API process claims it, and when the claimer dies it falls
due again. That new due time is the claim's fencing token: its outcome is stored only while the
score is still the one it set (a claim whose lease ran out and was taken over stores nothing).
Each owner (API key) has at most `WEBHOOK_CONCURRENCY_PER_KEY` deliveries leased at once, across
every API process (`{p}:webhook-leases:<owner>`, lease ends); a due delivery of an owner at its cap
is set aside (`{p}:webhook-parked:<owner>`) until one of its leases ends or settles, then due again
at its own due time: it neither takes a slot nor stands in front of other owners' deliveries, so a
key whose receiver never answers delays only its own webhooks. Times are
Redis' own clock (`TIME`), so the API processes' clocks do not matter.

In memory (the all-in-one process without Redis): the same, in dicts, lost on restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from service.queue.keys import lua_names
from service.queue.memory import InProcessQueue
from service.queue.protocol import JobQueue, JobRecord, QueueUnavailableError
from service.queue.redis_streams import RedisStreamsQueue
from service.queue.storage import RedisStorage
from service.settings import Settings
from service.webhooks.events import EVENT_OF_STATE

Outcome = Literal["delivered", "retry", "failed"]

# Most due deliveries one claim looks at (claimed, or put back behind their owner's leases).
CLAIM_SCAN_MAX = 1000

# KEYS[1]: the queue's stream (names every other key). ARGV: lease (s), most claimed, per-owner cap.
# First the deliveries set aside of owners that have room again go back to the due set with their
# own due times; then due deliveries are leased in due order, or set aside when their owner is at
# its cap (so they stand in front of no other owner's).
CLAIM = (
    "#!lua flags=allow-oom\n"
    + lua_names()
    + f"local SCAN_MAX = {CLAIM_SCAN_MAX}\n"
    + """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local lease_s, wanted, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due_key, parked_owners = K(N.webhooks_due), K(N.webhook_parked_owners)
local function in_flight(owner)
  local leases = K(N.webhook_leases .. owner)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  return redis.call('ZCARD', leases)
end
for _, owner in ipairs(redis.call('SMEMBERS', parked_owners)) do
  local room = cap - in_flight(owner)
  local parked = K(N.webhook_parked .. owner)
  if room > 0 then
    local back = redis.call('ZRANGE', parked, 0, room - 1, 'WITHSCORES')
    for i = 1, #back, 2 do
      redis.call('ZADD', due_key, back[i + 1], back[i])
      redis.call('ZREM', parked, back[i])
    end
    if redis.call('ZCARD', parked) == 0 then redis.call('SREM', parked_owners, owner) end
  end
end
local claimed, scanned = {}, 0
while #claimed < 2 * wanted and scanned < SCAN_MAX do
  local due = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, wanted, 'WITHSCORES')
  if #due == 0 then break end
  for i = 1, #due, 2 do
    local job_id = due[i]
    scanned = scanned + 1
    local owner = redis.call('HGET', K(N.webhook .. job_id), 'owner') or ''
    if in_flight(owner) < cap then
      -- Distinct per claim, so each claim's fencing token is its own.
      local lease = string.format('%.17g', now + lease_s + scanned / 1000000)
      local leases = K(N.webhook_leases .. owner)
      redis.call('ZADD', due_key, 'XX', lease, job_id)
      redis.call('ZADD', leases, lease, job_id)
      redis.call('PEXPIRE', leases, math.ceil(lease_s * 1000) + 1000)
      table.insert(claimed, job_id)
      table.insert(claimed, tostring(redis.call('ZSCORE', due_key, job_id)))
      if #claimed >= 2 * wanted then break end
    else
      redis.call('ZREM', due_key, job_id)
      redis.call('ZADD', K(N.webhook_parked .. owner), due[i + 1], job_id)
      redis.call('SADD', parked_owners, owner)
    end
  end
end
return claimed
"""
)

# KEYS[1]: the queue's stream. ARGV: job id, lease (the claim's score), outcome, attempts, last
# error, retry delay (s).
SETTLE = (
    "#!lua flags=allow-oom\n"
    + lua_names()
    + """
local due_key, hook = K(N.webhooks_due), K(N.webhook .. ARGV[1])
local score = redis.call('ZSCORE', due_key, ARGV[1])
if not score or score ~= ARGV[2] then return 0 end
redis.call('ZREM', K(N.webhook_leases .. (redis.call('HGET', hook, 'owner') or '')), ARGV[1])
if redis.call('EXISTS', hook) == 0 then
  redis.call('ZREM', due_key, ARGV[1])
  return 0
end
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('HSET', hook, 'attempts', ARGV[4], 'last_error', ARGV[5], 'last_attempt_at', tostring(now))
if ARGV[3] == 'retry' then
  redis.call('ZADD', due_key, 'XX', now + tonumber(ARGV[6]), ARGV[1])
else
  redis.call('ZREM', due_key, ARGV[1])
  redis.call('HSET', hook, 'state', ARGV[3])
end
return 1
"""
)


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
        """Up to `limit` due deliveries in due order, each leased for `lease_s`, with at most
        `WEBHOOK_CONCURRENCY_PER_KEY` of one owner leased at once."""
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
    def __init__(self, settings: Settings, storage: RedisStorage | None = None) -> None:
        self._owns_storage = storage is None
        self._storage = storage or RedisStorage(settings)
        self._client = self._storage.client
        self._keys = self._storage.keys
        self._per_owner = settings.webhook_concurrency_per_key
        self._claim = self._storage.script(CLAIM)
        self._settle = self._storage.script(SETTLE)

    async def claim(self, limit: int, lease_s: float) -> list[Delivery]:
        reply = await self._claim(keys=[self._keys.stream], args=[lease_s, limit, self._per_owner])
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
            keys=[self._keys.stream],
            args=[delivery.job_id, delivery.lease, outcome, attempts, error or "", retry_in_s],
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
        if self._owns_storage:
            await self._storage.close()


class MemoryOutbox:
    """The outbox of the in-process queue (`on_finished` is its listener); kept for `ttl_s`; each
    owner with at most `per_owner` deliveries leased at once."""

    def __init__(self, ttl_s: float, per_owner: int = 2) -> None:
        self._ttl_s = ttl_s
        self._per_owner = per_owner
        self._statuses: dict[str, WebhookStatus] = {}
        self._owners: dict[str, str] = {}
        self._due: dict[str, float] = {}
        self._expires: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # owner -> job id -> lease end
        self._claims = 0

    def on_finished(self, record: JobRecord) -> None:
        event = EVENT_OF_STATE.get(record.state)
        if record.webhook is None or event not in record.webhook.events or record.id in self._statuses:
            return
        status = WebhookStatus(url=record.webhook.url, event=event, state="pending", attempts=0)
        self._statuses[record.id] = status
        self._owners[record.id] = record.owner
        self._due[record.id] = time.monotonic()
        self._expires[record.id] = time.monotonic() + self._ttl_s

    async def claim(self, limit: int, lease_s: float) -> list[Delivery]:
        now = time.monotonic()
        for job_id in [job_id for job_id, expires in self._expires.items() if expires < now]:
            for store in (self._statuses, self._due, self._expires, self._owners):
                store.pop(job_id, None)
        claimed = []
        for job_id in sorted((job_id for job_id, due in self._due.items() if due <= now), key=self._due.get):
            owner = self._owners[job_id]
            leases = self._leases.setdefault(owner, {})
            for lapsed in [other for other, end in leases.items() if end <= now]:
                del leases[lapsed]
            if len(leases) >= self._per_owner:  # waits for one of its owner's slots
                continue
            self._claims += 1
            self._due[job_id] = leases[job_id] = now + lease_s
            status = self._statuses[job_id]
            claimed.append(Delivery(job_id, status.url, status.event, status.attempts, str(self._claims)))
            if len(claimed) == limit:
                break
        return claimed

    async def settle(
        self, delivery: Delivery, outcome: Outcome, attempts: int, error: str | None, retry_in_s: float
    ) -> bool:
        status = self._statuses.get(delivery.job_id)
        self._leases.get(self._owners.get(delivery.job_id, ""), {}).pop(delivery.job_id, None)
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
    """The Redis outbox beside the Redis queue (through its storage); the in-process queue's own otherwise."""
    if isinstance(queue, RedisStreamsQueue):
        return RedisOutbox(settings, queue.storage)
    assert isinstance(queue, InProcessQueue)
    outbox = MemoryOutbox(settings.result_ttl_s, settings.webhook_concurrency_per_key)
    queue.on_finished(outbox.on_finished)
    return outbox
