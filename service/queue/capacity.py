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
from redis.exceptions import RedisError, ResponseError

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


def check_redis_capacity(settings: Settings, redis_url: str) -> tuple[int, str]:
    """Raise RedisCapacityError when the queue's settings cannot fit Redis; else (log level, line)."""
    if settings.queue_max_bytes < settings.max_body_bytes:
        raise RedisCapacityError(
            f"QUEUE_MAX_BYTES={settings.queue_max_bytes} is smaller than MAX_BODY_BYTES="
            f"{settings.max_body_bytes}: the largest accepted request would never fit the queue; raise "
            "QUEUE_MAX_BYTES or lower MAX_BODY_BYTES"
        )
    credentials = {"password": settings.redis_password.get_secret_value()} if settings.redis_password else {}
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5, **credentials)
    try:
        maxmemory, policy = read_memory_config(client)
    except (RedisError, OSError, KeyError) as error:
        return logging.WARNING, f"Redis memory not checked (could not read maxmemory: {error})"
    finally:
        client.close()
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
