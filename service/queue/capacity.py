"""Does the queue's byte budget fit the Redis it runs on? Checked once when a process starts.

`QUEUE_MAX_BYTES` bounds the job data the queue keeps in Redis (payloads of unfinished jobs and
results until their TTL). Redis needs more than that: its per-value overhead and allocator
rounding (REDIS_OVERHEAD, measured by tests/service/test_queue_memory.py) and a fixed headroom for
keys, connections and buffers. Redis must refuse writes rather than evict: an evicted stream entry
or record is an accepted job lost.
"""

from __future__ import annotations

import logging

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from service.queue.connect import connect_sync
from service.queue.keys import QueueKeys
from service.settings import Settings

# Redis memory per byte of job data held (allocator size classes, listpack/hash overhead).
REDIS_OVERHEAD = 1.25
# Keys, connections, pub/sub and replication buffers beside the job data.
REDIS_HEADROOM_BYTES = 32 * 2**20
MIB = 2**20


class RedisCapacityError(Exception):
    """The settings do not fit the Redis they run on; the message says what to change."""


def required_maxmemory(queue_max_bytes: int) -> int:
    return int(queue_max_bytes * REDIS_OVERHEAD) + REDIS_HEADROOM_BYTES


def read_memory_config(client: redis.Redis) -> tuple[int, str]:
    """Redis' (maxmemory, maxmemory-policy): CONFIG GET, or INFO where CONFIG is disabled."""
    try:
        config = client.config_get("maxmemory*")
        return int(config["maxmemory"]), str(config["maxmemory-policy"])
    except ResponseError:  # managed Redis often renames or forbids CONFIG
        info = client.info("memory")
        return int(info["maxmemory"]), str(info["maxmemory_policy"])


def read_queue_node_memory_config(settings: Settings, redis_url: str) -> tuple[int, str]:
    """`read_memory_config` of the server holding the queue: the primary (Sentinel), or on Redis
    Cluster the primary of the queue's slot (each node has its own maxmemory)."""
    secret = settings.redis_password or None
    sentinel_secret = settings.redis_sentinel_password or None
    client = connect_sync(
        redis_url,
        secret.get_secret_value() if secret else None,
        sentinel_secret.get_secret_value() if sentinel_secret else None,
        socket_timeout=5,
        socket_connect_timeout=5,
    )
    try:
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(QueueKeys(settings.queue_name).stream)
            return read_memory_config(node.redis_connection)
        return read_memory_config(client)
    finally:
        client.close()


def check_redis_capacity(settings: Settings, redis_url: str) -> tuple[int, str]:
    """Raise RedisCapacityError when the queue's settings cannot fit Redis; else (log level, line)."""
    if settings.queue_max_bytes < settings.max_body_bytes:
        raise RedisCapacityError(
            f"QUEUE_MAX_BYTES={settings.queue_max_bytes} is smaller than MAX_BODY_BYTES="
            f"{settings.max_body_bytes}: the largest accepted request would never fit the queue; raise "
            "QUEUE_MAX_BYTES or lower MAX_BODY_BYTES"
        )
    try:
        maxmemory, policy = read_queue_node_memory_config(settings, redis_url)
    except (RedisError, OSError, KeyError) as error:
        return logging.WARNING, f"Redis memory not checked (could not read maxmemory: {error})"
    if policy != "noeviction":
        raise RedisCapacityError(
            f"Redis evicts keys when full (maxmemory-policy {policy}); an evicted queue entry or job "
            "record is an accepted job lost. Set maxmemory-policy noeviction."
        )
    needed = required_maxmemory(settings.queue_max_bytes)
    if maxmemory == 0:
        return logging.WARNING, (
            f"Redis has no maxmemory: it grows until the host runs out of memory. QUEUE_MAX_BYTES="
            f"{settings.queue_max_bytes} needs maxmemory >= {needed} ({needed // MIB} MiB)"
        )
    if maxmemory < needed:
        fits = int((maxmemory - REDIS_HEADROOM_BYTES) / REDIS_OVERHEAD)
        raise RedisCapacityError(
            f"QUEUE_MAX_BYTES={settings.queue_max_bytes} needs Redis maxmemory >= {needed} "
            f"({needed // MIB} MiB: x{REDIS_OVERHEAD} Redis overhead + {REDIS_HEADROOM_BYTES // MIB} MiB "
            f"headroom) but Redis has maxmemory {maxmemory} ({maxmemory // MIB} MiB). Lower QUEUE_MAX_BYTES "
            f"to at most {max(fits, 0)} or raise Redis' maxmemory."
        )
    return (
        logging.INFO,
        f"Redis maxmemory {maxmemory // MIB} MiB fits QUEUE_MAX_BYTES={settings.queue_max_bytes}",
    )


def check_or_exit(settings: Settings, logger: logging.Logger) -> None:
    """Entry points: log the capacity check, or log why the settings do not fit and exit 2."""
    if not settings.redis_url:
        return
    try:
        level, line = check_redis_capacity(settings, settings.redis_url)
    except RedisCapacityError as error:
        logger.error("%s", error)
        raise SystemExit(2) from None
    logger.log(level, "%s", line)
