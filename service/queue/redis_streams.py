"""Redis Streams queue: many API processes and many workers on any machines.

Layout under the `queue_name` prefix:
- `<p>:stream`: one message per accepted job (`id`, `deadline`, `spec`), consumer group `workers`.
  Messages are acknowledged and deleted only once their job's terminal record is stored, so the
  stream length is the number of unfinished jobs (the bounded depth).
- `<p>:job:<id>`: hash with the job's `state`, `worker`, `error`, `result`, `meta` and stream id.
- `<p>:idem:<key>`: idempotency key -> job id.
- `<p>:workers`: sorted set worker -> last heartbeat (readiness).
- `<p>:done`: pub/sub channel carrying the ids of finished jobs, so waiting requests wake at once.

Every state change that must be atomic (accept within the depth bound, start, finish + ack,
cancel, release) is one Lua script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from service.queue.protocol import (
    JobMeta,
    JobRecord,
    JobResult,
    JobSpec,
    JobState,
    QueueFullError,
    QueueUnavailableError,
    TakenJob,
)

logger = logging.getLogger(__name__)

GROUP = "workers"
# Waiters re-read their job at least this often, in case a wake-up was lost while Redis restarted.
WAKE_SAFETY_INTERVAL_S = 1.0

_SUBMIT = """
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'existing', existing} end
end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', tostring(depth)} end
local msg = redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'deadline', ARGV[3], 'spec', ARGV[4])
redis.call('HSET', KEYS[2], 'state', 'queued', 'meta', ARGV[5], 'msg', msg)
redis.call('EXPIRE', KEYS[2], ARGV[6])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[6]) end
return {'new', msg}
"""

_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3])
  return 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return 0
"""

_FINISH = """
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'worker', ARGV[4], 'error', ARGV[5], 'result', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[8])
return 1
"""

_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return state end
local msg = redis.call('HGET', KEYS[1], 'msg')
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('XACK', KEYS[2], ARGV[1], msg)
redis.call('XDEL', KEYS[2], msg)
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 'cancelled'
"""

_RELEASE = """
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if state ~= 'queued' and state ~= 'running' then return 0 end
local msg = redis.call('XADD', KEYS[2], '*', 'id', ARGV[3], 'deadline', ARGV[4], 'spec', ARGV[5])
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'msg', msg)
return 1
"""


class RedisStreamsQueue:
    """The `JobQueue` backed by Redis Streams with a consumer group."""

    def __init__(
        self,
        url: str,
        prefix: str,
        max_depth: int,
        retry_after_s: int,
        result_ttl_s: int,
        job_timeout_s: float,
        reclaim_idle_s: float,
        worker_ttl_s: float,
    ) -> None:
        self._client = aioredis.Redis.from_url(url, health_check_interval=10)
        self._prefix = prefix
        self._stream = f"{prefix}:stream"
        self._channel = f"{prefix}:done"
        self._workers_key = f"{prefix}:workers"
        self._max_depth = max_depth
        self._retry_after_s = retry_after_s
        self._result_ttl_s = result_ttl_s
        # A queued job's record must outlive its deadline, plus the time to read its result.
        self._record_ttl_s = int(job_timeout_s) + result_ttl_s + 1
        self._reclaim_idle_ms = int(reclaim_idle_s * 1000)
        self._worker_ttl_s = worker_ttl_s
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("submit", _SUBMIT),
                ("start", _START),
                ("finish", _FINISH),
                ("cancel", _CANCEL),
                ("release", _RELEASE),
            )
        }
        self._group_ready = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._last_reclaim = 0.0

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        """The client, with Redis failures turned into QueueUnavailableError."""
        try:
            if not self._group_ready:
                await self._ensure_group()
            yield self._client
        except ResponseError as error:
            if "NOGROUP" in str(error):
                # Redis came back without its data (no AOF): recreate the group on the next call.
                self._group_ready = False
            raise QueueUnavailableError(f"Redis error: {error}") from error
        except (RedisError, OSError) as error:
            raise QueueUnavailableError(f"Redis is unreachable: {error}") from error

    async def _ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    # --- API side ------------------------------------------------------------------------------
    async def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> JobRecord:
        meta = spec.meta().model_dump_json()
        idem_key = f"{self._prefix}:idem:{idempotency_key}" if idempotency_key else ""
        async with self._redis() as client:
            outcome, value = await self._scripts["submit"](
                keys=[self._stream, self._job_key(spec.id), idem_key],
                args=[
                    self._max_depth,
                    spec.id,
                    repr(spec.deadline),
                    spec.model_dump_json(),
                    meta,
                    self._record_ttl_s,
                ],
                client=client,
            )
        outcome, value = outcome.decode(), value.decode()
        if outcome == "full":
            raise QueueFullError(int(value), self._retry_after_s)
        if outcome == "existing":
            existing = await self.get(value)
            if existing is not None:
                return existing
            raise QueueUnavailableError("the job of this Idempotency-Key has just expired; retry")
        return spec.record(JobState.QUEUED)

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._redis() as client:
            fields = await client.hgetall(self._job_key(job_id))
        if not fields or b"meta" not in fields:
            return None
        meta = JobMeta.model_validate_json(fields[b"meta"])
        result = fields.get(b"result")
        return JobRecord.from_meta(
            job_id,
            JobState(fields[b"state"].decode()),
            meta,
            worker=fields.get(b"worker", b"").decode() or None,
            error=fields.get(b"error", b"").decode() or None,
            result=JobResult.model_validate_json(result) if result else None,
        )

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        self._ensure_listener()
        give_up = time.monotonic() + max(timeout_s, 0.0)
        while True:
            wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(job_id, set()).add(wake)
            try:
                # Read after registering, so a wake-up between the two cannot be missed.
                try:
                    record = await self.get(job_id)
                except QueueUnavailableError:
                    # Redis is restarting: the accepted job is safe in it, so keep waiting.
                    if time.monotonic() >= give_up:
                        raise
                else:
                    if record is None or record.state.finished or time.monotonic() >= give_up:
                        return record
                remaining = max(give_up - time.monotonic(), 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake, min(remaining, WAKE_SAFETY_INTERVAL_S))
            finally:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(wake)
                    if not waiters:
                        del self._waiters[job_id]

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="redis-done-listener")

    async def _listen(self) -> None:
        """Wake the waiters of every finished job; survive Redis restarts."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                # Anything finished while we were not subscribed is caught by the waiters' re-read.
                self._wake_all()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._wake(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                logger.warning("result channel lost (%s); resubscribing", error)
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    def _wake(self, job_id: str) -> None:
        for future in self._waiters.get(job_id, ()):
            if not future.done():
                future.set_result(None)

    def _wake_all(self) -> None:
        for job_id in list(self._waiters):
            self._wake(job_id)

    async def cancel(self, job_id: str) -> JobRecord | None:
        async with self._redis() as client:
            await self._scripts["cancel"](
                keys=[self._job_key(job_id), self._stream, self._channel],
                args=[GROUP, self._result_ttl_s, job_id],
                client=client,
            )
        return await self.get(job_id)

    async def depth(self) -> int:
        async with self._redis() as client:
            return int(await client.xlen(self._stream))

    async def ready_workers(self) -> int:
        async with self._redis() as client:
            return int(await client.zcount(self._workers_key, time.time() - self._worker_ttl_s, "+inf"))

    async def ping(self) -> bool:
        try:
            async with self._redis() as client:
                return bool(await client.ping())
        except QueueUnavailableError:
            return False

    # --- worker side ---------------------------------------------------------------------------
    async def take(self, worker: str, max_jobs: int, block_s: float) -> list[TakenJob]:
        taken = await self._reclaim(worker, max_jobs)
        if len(taken) < max_jobs:
            async with self._redis() as client:
                replies = await client.xreadgroup(
                    GROUP,
                    worker,
                    {self._stream: ">"},
                    count=max_jobs - len(taken),
                    block=max(int(block_s * 1000), 1) if not taken else None,
                )
            for _stream, messages in replies or []:
                taken += [job for job in map(self._parse, messages) if job is not None]
        return taken

    async def _reclaim(self, worker: str, max_jobs: int) -> list[TakenJob]:
        """Take over jobs whose worker stopped refreshing them (it died)."""
        now = time.monotonic()
        if now - self._last_reclaim < min(1.0, self._reclaim_idle_ms / 4000):
            return []
        self._last_reclaim = now
        async with self._redis() as client:
            _cursor, messages, _deleted = await client.xautoclaim(
                self._stream, GROUP, worker, self._reclaim_idle_ms, start_id="0-0", count=max_jobs
            )
        jobs = [job for job in map(self._parse, messages) if job is not None]
        for job in jobs:
            logger.warning("reclaimed job %s from a worker that stopped", job.spec.id)
        return jobs

    def _parse(self, message: tuple[bytes, dict[bytes, bytes]]) -> TakenJob | None:
        message_id, fields = message
        if not fields:  # deleted while pending (cancelled)
            return None
        return TakenJob(spec=JobSpec.model_validate_json(fields[b"spec"]), token=message_id.decode())

    async def start(self, worker: str, job: TakenJob) -> bool:
        async with self._redis() as client:
            started = await self._scripts["start"](
                keys=[self._job_key(job.spec.id), self._stream],
                args=[GROUP, job.token, worker],
                client=client,
            )
        return bool(started)

    async def finish(self, job: TakenJob, record: JobRecord) -> None:
        result = record.result.model_dump_json() if record.result is not None else ""
        async with self._redis() as client:
            await self._scripts["finish"](
                keys=[self._job_key(job.spec.id), self._stream, self._channel],
                args=[
                    GROUP,
                    job.token,
                    record.state.value,
                    record.worker or "",
                    record.error or "",
                    result,
                    self._result_ttl_s,
                    job.spec.id,
                ],
                client=client,
            )

    async def release(self, job: TakenJob) -> None:
        async with self._redis() as client:
            await self._scripts["release"](
                keys=[self._job_key(job.spec.id), self._stream],
                args=[GROUP, job.token, job.spec.id, repr(job.spec.deadline), job.spec.model_dump_json()],
                client=client,
            )

    async def heartbeat(self, worker: str, ready: bool, in_flight: list[TakenJob]) -> None:
        async with self._redis() as client:
            if ready:
                await client.zadd(self._workers_key, {worker: time.time()})
            else:
                await client.zrem(self._workers_key, worker)
            if in_flight:
                # Resets the idle time of our own deliveries, so XAUTOCLAIM leaves them alone.
                await client.xclaim(
                    self._stream, GROUP, worker, 0, [job.token for job in in_flight], justid=True
                )

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._client.aclose()
