"""Redis Streams queue: many API processes and many workers on any machines.

Layout under the `queue_name` prefix `p`, every key inside the hash tag `{p}` so that a queue lives in
one Redis Cluster slot (every name is in `keys.py`):
- `{p}:stream`: one message per accepted job, consumer group `workers`. Fields: `id`, `deadline`,
  `v` (message format), `size` (payload bytes), `owner`, `tier`, `class` (priority) and `cost` (for
  the owner's counters and the fair order), `spec` (the job's JSON without its images), `blobs`
  (their count) and `blob:<i>` (each image as raw bytes, see `blobs.py`). Messages are
  acknowledged and deleted only once their job's terminal record is stored, so the stream length
  is the number of unfinished jobs (the bounded depth).
- `{p}:ready:<class>`, `{p}:active:<class>`, `{p}:sched`, `{p}:owner:<owner>`: the tenant-fair order
  of the jobs no worker took yet (`fair.py`) and each owner's counters (jobs, bytes, cost, subject
  bytes, queued cost, finish tags); `take` hands out the head of the order (redis_scripts.TAKE).
- `{p}:job:<id>`: hash with the job's `state`, `worker`, `fence` (ownership token), `error`,
  `result` (+ `rblob:<i>` raw result images), `meta`, stream id and place in the fair order.
- `{p}:bytes`, `{p}:held`, `{p}:totals`, `{p}:tiers`: the byte budget (bytes held, the expiring
  holdings: results, subjects, tokens) and the totals by kind and by tier.
- `{p}:rate`: the measured throughput (deadline admission, `policy.py`).
- `{p}:dead`: dead letters (messages no worker could read), bounded.
- `{p}:idem:<key>`: idempotency key -> job id.
- `{p}:workers`: sorted set worker -> last heartbeat (readiness).
- `{p}:done`: pub/sub channel carrying the ids of finished jobs, so waiting requests wake at once.
- `{p}:arrivals`: capped stream written at every submit and release: an idle taker blocks on it.
- `{p}:webhook:<id>`, `{p}:webhooks`, `{p}:webhook-leases:<owner>`: a finished job's webhook delivery,
  the due times of all of them and each owner's deliveries in flight (`service/webhooks/outbox.py`).
- `{p}:events:<id>`: stream of a running job's newest progress events (capped, expires after its last
  event); `{p}:watch:<id>`: present while a client watches the job with previews (expires). A
  cancellation request of a running job is the field `cancel` of its hash.

Every state change that must be atomic is one Lua script (`redis_scripts.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from service import metrics
from service.cancelling import cancel_and_wait
from service.queue.blobs import join_blobs, payload_size, split_blobs
from service.queue.keys import GROUP
from service.queue.policy import QueuePolicy, deadline_refusal, quota_refusal
from service.queue.protocol import (
    PROGRESS_EVENTS_KEPT,
    JobMeta,
    JobProgress,
    JobRecord,
    JobResult,
    JobSpec,
    JobState,
    QueueFullError,
    QueueUnavailableError,
    QueueUsage,
    StepSignals,
    TakenJob,
    TierUsage,
)
from service.queue.redis_scripts import (
    CANCEL,
    DEAD_LETTER,
    FINISH,
    GROUP_CREATE,
    HEARTBEAT,
    POSITION,
    PROGRESS,
    RELEASE,
    REQUEST_CANCEL,
    SIGNALS,
    START,
    SUBMIT,
    TAKE,
)
from service.queue.storage import RedisStorage, raised_inside_redis

logger = logging.getLogger(__name__)

# Waiters re-read their job at least this often, in case a wake-up was lost while Redis restarted.
WAKE_SAFETY_INTERVAL_S = 1.0
# Version of the stream message layout; a message of another version is dead-lettered.
MESSAGE_FORMAT = b"2"
# Dead letters kept (oldest dropped), and the largest field value copied into one (images are not).
DEAD_LETTER_MAX = 200
DEAD_LETTER_FIELD_MAX = 16 * 1024
# Workers silent this long are dropped from the presence set.
FORGET_WORKER_S = 3600
# A job's progress log lives this long after its last event (a late client still replays it).
PROGRESS_EVENTS_TTL_S = 60
# A cost cap of "no limit", as Lua reads it.
UNLIMITED = 1e308


def encode_job(spec: JobSpec) -> tuple[list[bytes | str | int], int]:
    """The stream message fields of a job (images as raw bytes) and its payload size."""
    document, blobs = split_blobs(spec)
    size = payload_size(document, blobs)
    fields: list[bytes | str | int] = ["id", spec.id, "deadline", repr(spec.deadline), "v", MESSAGE_FORMAT]
    fields += ["size", size, "owner", spec.owner, "tier", spec.tier, "class", spec.priority]
    fields += ["cost", repr(spec.cost), "spec", document, "blobs", len(blobs)]
    for index, blob in enumerate(blobs):
        fields += [f"blob:{index}", blob]
    return fields, size


def decode_job(fields: dict[bytes, bytes]) -> JobSpec:
    """Inverse of `encode_job`; raises KeyError, ValueError, TypeError or IndexError on a message
    this version cannot read."""
    version = fields.get(b"v")
    if version != MESSAGE_FORMAT:
        raise ValueError(
            f"message format {version!r}, this worker reads {MESSAGE_FORMAT!r} (written by another "
            "version of the service?)"
        )
    blobs = [fields[b"blob:%d" % index] for index in range(int(fields[b"blobs"]))]
    return join_blobs(JobSpec, fields[b"spec"], blobs)


def encode_progress(progress: JobProgress) -> list[bytes | str | int]:
    """The stream fields of a progress event: its JSON without images, and each image raw."""
    document, blobs = split_blobs(progress)
    fields: list[bytes | str | int] = ["p", document, "blobs", len(blobs)]
    for index, blob in enumerate(blobs):
        fields += [f"blob:{index}", blob]
    return fields


def decode_progress(fields: dict[bytes, bytes]) -> JobProgress:
    blobs = [fields[b"blob:%d" % index] for index in range(int(fields[b"blobs"]))]
    return join_blobs(JobProgress, fields[b"p"], blobs)


def dead_letter_fields(reason: str, message_id: bytes, worker: str, fields: dict[bytes, bytes]) -> list:
    """What a dead letter keeps: the reason and the raw message, large values (images) left out."""
    kept: list[bytes | str] = ["reason", reason, "message", message_id, "worker", worker]
    for name, value in fields.items():
        kept += [b"raw:" + name, value if len(value) <= DEAD_LETTER_FIELD_MAX else f"<{len(value)} bytes>"]
    return kept


class RedisStreamsQueue:
    """The `JobQueue` backed by Redis Streams with a consumer group."""

    def __init__(
        self,
        storage: RedisStorage,
        max_depth: int,
        max_bytes: int,
        retry_after_s: int,
        result_ttl_s: int,
        job_timeout_s: float,
        reclaim_idle_s: float,
        worker_ttl_s: float,
        ack_replicas: int = 0,
        ack_timeout_ms: int = 100,
        policy: QueuePolicy | None = None,
    ) -> None:
        self.storage = storage
        self._client = storage.client
        if ack_replicas and storage.clustered:
            raise ValueError(
                "REDIS_ACK_REPLICAS is not supported with redis+cluster:// (WAIT must run on the "
                "connection of the write, which a cluster pipeline does not guarantee); set it to 0"
            )
        self._ack_replicas = ack_replicas
        self._ack_timeout_ms = ack_timeout_ms
        self._keys = storage.keys
        self._stream = self._keys.stream
        self._max_depth = max_depth
        self._max_bytes = max_bytes
        self._retry_after_s = retry_after_s
        self._result_ttl_s = result_ttl_s
        self._policy = policy or QueuePolicy()
        # A queued job's record must outlive its deadline, plus the time to read its result.
        self._record_ttl_s = int(job_timeout_s) + result_ttl_s + 1
        self._reclaim_idle_ms = int(reclaim_idle_s * 1000)
        self._worker_ttl_s = worker_ttl_s
        self._scripts = {
            name: storage.script(source)
            for name, source in (
                ("group", GROUP_CREATE),
                ("submit", SUBMIT),
                ("take", TAKE),
                ("start", START),
                ("finish", FINISH),
                ("cancel", CANCEL),
                ("release", RELEASE),
                ("heartbeat", HEARTBEAT),
                ("dead_letter", DEAD_LETTER),
                ("request_cancel", REQUEST_CANCEL),
                ("signals", SIGNALS),
                ("progress", PROGRESS),
                ("position", POSITION),
            )
        }
        self._group_ready = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._last_reclaim = 0.0
        # Fencing token of each delivery this process started: its result is stored only while the
        # job is still ours (a worker whose heartbeats failed may have lost it to another).
        self._fences: dict[tuple[str, str], int] = {}
        # Consumer (worker name) of each delivery handed out by `take`.
        self._taken_by: dict[str, str] = {}
        # Deliveries another worker took over: no longer refreshed (nor reported again).
        self._lost: set[tuple[str, str]] = set()

    def _job_key(self, job_id: str) -> str:
        return self._keys.job(job_id)

    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        """The client, with Redis failures turned into QueueUnavailableError."""
        try:
            if not self._group_ready:
                await self._scripts["group"](keys=[self._stream], args=[GROUP], client=self._client)
                self._group_ready = True
            yield self._client
        except ResponseError as error:
            if "NOGROUP" in str(error):
                # Redis came back without its data (no AOF): recreate the group on the next call.
                self._group_ready = False
            raise QueueUnavailableError(f"Redis error: {error}") from error
        except MasterNotFoundError as error:
            # Its text ends with every sentinel client's repr: keep the part that says what failed.
            raise QueueUnavailableError(
                f"Redis is unreachable: {str(error).split(' : ')[0]} (no sentinel of REDIS_URL answered with "
                "a primary: check their addresses, the service name and REDIS_SENTINEL_PASSWORD)"
            ) from error
        except (RedisError, OSError) as error:
            raise QueueUnavailableError(f"Redis is unreachable: {error}") from error
        except (AttributeError, TypeError) as error:
            if not raised_inside_redis(error):
                raise
            raise QueueUnavailableError(f"the Redis connection broke: {error!r}") from error

    # --- API side ------------------------------------------------------------------------------
    async def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> JobRecord:
        meta = spec.meta().model_dump_json()
        fields, size = encode_job(spec)
        cost = spec.cost
        quota = self._policy.quota(spec.tier)
        args = [
            self._max_depth,
            self._max_bytes,
            spec.id,
            meta,
            self._record_ttl_s,
            size,
            spec.owner,
            spec.tier,
            spec.priority,
            repr(spec.weight),
            repr(cost),
            quota.jobs if quota else self._max_depth,
            quota.bytes if quota else self._max_bytes,
            repr(min(quota.cost, UNLIMITED)) if quota else repr(UNLIMITED),
            repr(spec.deadline),
            int(self._policy.deadline_admission),
            idempotency_key or "",
            *fields,
        ]
        keys = [self._stream]
        try:
            async with self._redis() as client:
                if not self._ack_replicas:
                    reply = await self._scripts["submit"](keys=keys, args=args, client=client)
                else:
                    # WAIT counts the writes of its own connection: one pipeline, one connection.
                    async with client.pipeline(transaction=False) as pipe:
                        await self._scripts["submit"](keys=keys, args=args, client=pipe)
                        pipe.execute_command("WAIT", self._ack_replicas, self._ack_timeout_ms)
                        reply, acked = await pipe.execute()
                    if reply[0] == b"new" and int(acked) < self._ack_replicas:
                        metrics.UNREPLICATED_ACCEPTS.inc()
                        logger.warning(
                            "job %s accepted with %s of %d replicas acknowledging it within %d ms: "
                            "a failover now could lose it",
                            spec.id,
                            acked,
                            self._ack_replicas,
                            self._ack_timeout_ms,
                        )
        except QueueUnavailableError as error:
            if isinstance(error.__cause__, OutOfMemoryError):
                raise QueueFullError(
                    "the queue's Redis is at its memory limit", self._retry_after_s
                ) from error
            raise
        outcome, values = reply[0].decode(), [value.decode() for value in reply[1:]]
        if outcome == "full":
            raise QueueFullError(f"the queue holds {values[0]} jobs, its limit", self._retry_after_s)
        if outcome == "bytes":
            raise QueueFullError.for_bytes(int(values[0]), size, self._max_bytes, self._retry_after_s)
        if outcome == "quota":
            jobs, held, inflight = int(values[0]), int(values[1]), float(values[2])
            refusal = quota_refusal(quota, jobs, held, inflight, size, cost, self._retry_after_s)
            assert refusal is not None, "SUBMIT and quota_refusal disagree"
            raise refusal
        if outcome == "deadline":
            ahead, rate, now = (float(value) for value in values)
            refusal = deadline_refusal(ahead, cost, rate, now, spec.deadline)
            assert refusal is not None, "SUBMIT and deadline_refusal disagree"
            raise refusal
        if outcome == "existing":
            existing = await self.get(values[0])
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
        result = None
        if b"rblobs" in fields and fields.get(b"result"):
            blobs = [fields[b"rblob:%d" % index] for index in range(int(fields[b"rblobs"]))]
            result = join_blobs(JobResult, fields[b"result"], blobs)
        elif fields.get(b"result"):  # stored by a worker of the previous version (rolling upgrade)
            result = JobResult.model_validate_json(fields[b"result"])
        return JobRecord.from_meta(
            job_id,
            JobState(fields[b"state"].decode()),
            meta,
            worker=fields.get(b"worker", b"").decode() or None,
            error=fields.get(b"error", b"").decode() or None,
            result=result,
        )

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        give_up = time.monotonic() + max(timeout_s, 0.0)
        while True:
            self._ensure_listener()  # each round: a listener that ended is replaced within a second
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
            if self._listener is not None:
                ended = "was cancelled" if self._listener.cancelled() else repr(self._listener.exception())
                logger.error("the result listener ended (%s); starting a new one", ended)
            self._listener = asyncio.create_task(self._listen(), name="redis-done-listener")

    async def _listen(self) -> None:
        """Wake the waiters of every finished job; survive Redis restarts."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.channel)
                # Anything finished while we were not subscribed is caught by the waiters' re-read.
                self._wake_all()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._wake(message["data"].decode(errors="replace"))
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
            # Requested first: a job that starts before CANCEL runs is still ended by its worker.
            await self._scripts["request_cancel"](keys=[self._job_key(job_id)], client=client)
            await self._scripts["cancel"](
                keys=[self._stream], args=[GROUP, self._result_ttl_s, job_id], client=client
            )
        return await self.get(job_id)

    async def depth(self) -> int:
        async with self._redis() as client:
            return int(await client.xlen(self._stream))

    async def held_bytes(self) -> int:
        """Bytes counted against `max_bytes` (expired results are subtracted at the next submit)."""
        async with self._redis() as client:
            return int(await client.get(self._keys.bytes) or 0)

    async def usage(self, tiers: list[str]) -> QueueUsage:
        async with self._redis() as client:
            counts = await client.hgetall(self._keys.tiers)
            rate = await client.hmget(self._keys.rate, "c", "b")
        count = {name.decode(): int(value) for name, value in counts.items()}
        finished, busy_s = float(rate[0] or 0), float(rate[1] or 0)
        return QueueUsage(
            tiers={
                tier: TierUsage(jobs=count.get(f"{tier}:jobs", 0), bytes=count.get(f"{tier}:bytes", 0))
                for tier in tiers
            },
            seconds_per_cost=busy_s / finished if finished > 0 else None,
        )

    async def ready_workers(self) -> int:
        async with self._redis() as client:
            return int(await client.zcount(self._keys.workers, time.time() - self._worker_ttl_s, "+inf"))

    async def ping(self) -> bool:
        try:
            async with self._redis() as client:
                return bool(await client.ping())
        except QueueUnavailableError:
            return False

    async def events(self, job_id: str, after: str | None, block_s: float) -> list[tuple[str, JobProgress]]:
        async with self._redis() as client:
            replies = await client.xread(
                {self._keys.events(job_id): after or "0-0"},
                count=PROGRESS_EVENTS_KEPT,
                block=max(int(block_s * 1000), 1) if block_s > 0 else None,
            )
        return [
            (event_id.decode(), decode_progress(fields))
            for _stream, entries in replies or []
            for event_id, fields in entries
        ]

    async def position(self, job_id: str) -> int | None:
        async with self._redis() as client:
            ahead = await self._scripts["position"](keys=[self._stream], args=[job_id], client=client)
        return None if int(ahead) < 0 else int(ahead)

    async def watch(self, job_id: str, previews: bool, ttl_s: float) -> None:
        if previews:
            async with self._redis() as client:
                await client.set(self._keys.watch(job_id), b"1", px=max(int(ttl_s * 1000), 1))

    # --- worker side ---------------------------------------------------------------------------
    async def take(self, worker: str, max_jobs: int, block_s: float) -> list[TakenJob]:
        messages = await self._reclaim(worker, max_jobs)
        if len(messages) < max_jobs:
            try:
                messages += await self._take_fair(
                    worker, max_jobs - len(messages), block_s if not messages else 0
                )
            except QueueUnavailableError:
                if not messages:
                    raise  # else keep what was reclaimed; the next call takes new jobs
        taken: list[TakenJob] = []
        for message_id, fields in messages:
            if not fields:  # deleted while pending (cancelled)
                continue
            try:
                taken.append(TakenJob(spec=decode_job(fields), token=message_id.decode()))
                self._taken_by[message_id.decode()] = worker
            except (KeyError, ValueError, TypeError, IndexError) as error:
                await self._dead_letter(worker, message_id, fields, f"{type(error).__name__}: {error}")
        return taken

    async def _take_fair(
        self, worker: str, count: int, block_s: float
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The head of the fair order (TAKE); with nothing there, wait up to `block_s` for an arrival
        (a small stream every submit and release writes to), then try once more."""
        args = [GROUP, worker, count, self._policy.batch_max_wait_s]
        async with self._redis() as client:
            entries, newest = await self._scripts["take"](keys=[self._stream], args=args, client=client)
            if not entries and block_s > 0:
                arrived = await client.xread(
                    {self._keys.arrivals: newest}, count=1, block=max(int(block_s * 1000), 1)
                )
                if arrived:
                    entries, _newest = await self._scripts["take"](
                        keys=[self._stream], args=args, client=client
                    )
        return [(message_id, _pairs(flat)) for message_id, flat in entries]

    async def _reclaim(self, worker: str, max_jobs: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Take over jobs whose worker stopped refreshing them (it died)."""
        now = time.monotonic()
        if now - self._last_reclaim < min(1.0, self._reclaim_idle_ms / 4000):
            return []
        self._last_reclaim = now
        async with self._redis() as client:
            _cursor, messages, _deleted = await client.xautoclaim(
                self._stream, GROUP, worker, self._reclaim_idle_ms, start_id="0-0", count=max_jobs
            )
        for _message_id, fields in messages:
            if fields:
                logger.warning(
                    "reclaimed job %s from a worker that stopped",
                    fields.get(b"id", b"?").decode(errors="replace"),
                )
        return messages

    async def _dead_letter(
        self, worker: str, message_id: bytes, fields: dict[bytes, bytes], reason: str
    ) -> None:
        """Set an unreadable message aside (once, logged and counted) instead of failing on it again
        and again; its job, when it has a record, fails with the reason."""
        job_id = fields.get(b"id", b"").decode(errors="replace")
        message = f"the job's queue message cannot be read by this worker ({reason[:500]})"
        try:
            async with self._redis() as client:
                moved = await self._scripts["dead_letter"](
                    keys=[self._stream],
                    args=[
                        GROUP,
                        message_id,
                        DEAD_LETTER_MAX,
                        message,
                        job_id,
                        self._result_ttl_s,
                        worker,
                        *dead_letter_fields(reason, message_id, worker, fields),
                    ],
                    client=client,
                )
        except QueueUnavailableError as error:
            # It stays pending here and is reclaimed (and dead-lettered) later.
            logger.warning("could not dead-letter message %s yet: %s", message_id.decode(), error)
            return
        if moved:
            metrics.DEAD_LETTERS.inc()
            logger.error(
                "dead-lettered message %s (job %s) to %s: %s",
                message_id.decode(),
                job_id,
                self._keys.dead,
                reason,
            )

    async def start(self, worker: str, job: TakenJob) -> bool:
        async with self._redis() as client:
            fence = int(
                await self._scripts["start"](
                    keys=[self._stream], args=[GROUP, job.token, worker, job.spec.id], client=client
                )
            )
        if fence > 0:
            self._fences[worker, job.token] = fence
            return True
        self._forget(worker, job)
        if fence < 0:
            logger.warning("job %s was taken over by another worker; skipping it", job.spec.id)
        return False

    async def finish(self, job: TakenJob, record: JobRecord) -> None:
        document, blobs = split_blobs(record.result) if record.result is not None else (b"", [])
        result_fields: list[bytes | str | int] = ["rblobs", len(blobs)]
        for index, blob in enumerate(blobs):
            result_fields += [f"rblob:{index}", blob]
        worker = record.worker or self._taken_by.get(job.token, "")
        async with self._redis() as client:
            stored = await self._scripts["finish"](
                keys=[self._stream],
                args=[
                    GROUP,
                    job.token,
                    worker,
                    self._fences.get((worker, job.token), 0),
                    record.state.value,
                    record.error or "",
                    document,
                    self._result_ttl_s,
                    job.spec.id,
                    payload_size(document, blobs),
                    *result_fields,
                ],
                client=client,
            )
        self._forget(worker, job)
        if not stored:
            logger.warning(
                "job %s: result not stored, the job was taken over by another worker or ended", job.spec.id
            )

    async def step_signals(self, job_ids: list[str]) -> StepSignals:
        if not job_ids:
            return StepSignals()
        keys = [self._job_key(job_id) for job_id in job_ids] + [
            self._keys.watch(job_id) for job_id in job_ids
        ]
        async with self._redis() as client:
            cancelled, watched = await self._scripts["signals"](keys=keys, client=client)
        return StepSignals(
            cancelled={job_ids[int(index) - 1] for index in cancelled},
            watched={job_ids[int(index) - 1] for index in watched},
        )

    async def publish_progress(self, job_id: str, progress: JobProgress) -> None:
        async with self._redis() as client:
            await self._scripts["progress"](
                keys=[self._job_key(job_id), self._keys.events(job_id)],
                args=[PROGRESS_EVENTS_KEPT, PROGRESS_EVENTS_TTL_S * 1000, *encode_progress(progress)],
                client=client,
            )

    async def release(self, job: TakenJob) -> None:
        worker = self._taken_by.get(job.token, "")
        async with self._redis() as client:
            await self._scripts["release"](
                keys=[self._stream], args=[GROUP, job.token, worker, job.spec.id], client=client
            )
        self._forget(worker, job)

    def _forget(self, worker: str, job: TakenJob) -> None:
        self._fences.pop((worker, job.token), None)
        self._lost.discard((worker, job.token))
        if self._taken_by.get(job.token) == worker:
            del self._taken_by[job.token]

    async def heartbeat(self, worker: str, ready: bool, in_flight: list[TakenJob]) -> None:
        now = time.time()
        async with self._redis() as client:
            lost = await self._scripts["heartbeat"](
                keys=[self._stream],
                args=[
                    GROUP,
                    worker,
                    now,
                    int(ready),
                    now - FORGET_WORKER_S,
                    *(job.token for job in in_flight if (worker, job.token) not in self._lost),
                ],
                client=client,
            )
        for token in lost:
            self._lost.add((worker, token.decode()))
            logger.warning("delivery %s was taken over by another worker", token.decode())

    async def close(self) -> None:
        if self._listener is not None:
            await cancel_and_wait(self._listener)
        await self.storage.close()


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A message's fields as Lua returns them (a flat list) as XREADGROUP's reply has them."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
