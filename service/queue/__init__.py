"""Job queue: one protocol (`protocol.py`), an in-process and a Redis Streams backend."""

from service.queue.memory import InProcessQueue
from service.queue.policy import QueuePolicy
from service.queue.protocol import JobQueue
from service.queue.redis_streams import RedisStreamsQueue
from service.queue.storage import RedisStorage
from service.settings import Settings

# Workers count as ready while their last heartbeat is younger than this many periods.
WORKER_TTL_HEARTBEATS = 3


def create_queue(settings: Settings) -> JobQueue:
    """Redis Streams when `REDIS_URL` is set, otherwise the in-process queue."""
    worker_ttl_s = settings.heartbeat_s * WORKER_TTL_HEARTBEATS
    if settings.redis_url:
        return RedisStreamsQueue(
            RedisStorage(settings),
            max_depth=settings.queue_max_depth,
            max_bytes=settings.queue_max_bytes,
            retry_after_s=settings.queue_full_retry_after_s,
            result_ttl_s=settings.result_ttl_s,
            job_timeout_s=settings.job_timeout_s,
            reclaim_idle_s=settings.reclaim_idle_s,
            worker_ttl_s=worker_ttl_s,
            ack_replicas=settings.redis_ack_replicas,
            ack_timeout_ms=settings.redis_ack_timeout_ms,
            policy=QueuePolicy.from_settings(settings),
        )
    return InProcessQueue(
        max_depth=settings.queue_max_depth,
        max_bytes=settings.queue_max_bytes,
        retry_after_s=settings.queue_full_retry_after_s,
        result_ttl_s=settings.result_ttl_s,
        worker_ttl_s=worker_ttl_s,
        policy=QueuePolicy.from_settings(settings),
    )
