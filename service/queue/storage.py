"""The one Redis seam of a process: one client (one connection pool) for the queue, the subject
store and the webhook outbox, their keys (keys.py) and their scripts (registered once per source).

A worker's token lookups are blocking calls from its preparation thread: they get a blocking
client of their own, opened on first use.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript, Script
from redis.exceptions import OutOfMemoryError, RedisError

from service.queue.connect import connect_async, connect_sync
from service.queue.keys import QueueKeys
from service.queue.protocol import QueueFullError, QueueUnavailableError
from service.settings import Settings

_REDIS_PACKAGE = Path(redis.__file__).parent


def raised_inside_redis(error: BaseException) -> bool:
    """An error other than RedisError/OSError that the Redis client itself raised: redis-py's
    async connections can fail like this when a connection is torn down (Redis crashing, a
    failover) while another task sends on it, e.g. `AttributeError: 'NoneType' object has no
    attribute 'writelines'`. Only where the innermost frame is in the redis package: the same
    error from our own code stays a bug."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).is_relative_to(_REDIS_PACKAGE)


class RedisStorage:
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self.settings = settings
        self.keys = QueueKeys(settings.queue_name)
        self._passwords = (
            settings.redis_password.get_secret_value() if settings.redis_password else None,
            settings.redis_sentinel_password.get_secret_value() if settings.redis_sentinel_password else None,
        )
        # An explicit password overrides one in the URL; None keeps the URL's.
        self.client = connect_async(settings.redis_url, *self._passwords, health_check_interval=10)
        self._scripts: dict[str, AsyncScript] = {}
        self._sync: redis.Redis | None = None
        self._sync_scripts: dict[str, Script] = {}

    @property
    def clustered(self) -> bool:
        return isinstance(self.client, RedisCluster)

    def script(self, source: str) -> AsyncScript:
        if source not in self._scripts:
            self._scripts[source] = self.client.register_script(source)
        return self._scripts[source]

    @contextlib.contextmanager
    def blocking(self) -> Iterator[redis.Redis]:
        """The blocking client (opened on first use), Redis failures as QueueUnavailableError."""
        if self._sync is None:
            self._sync = connect_sync(self.settings.redis_url, *self._passwords, socket_timeout=5)
        try:
            yield self._sync
        except OutOfMemoryError:
            raise
        except (RedisError, OSError) as error:
            raise QueueUnavailableError(f"Redis is unreachable: {error}") from error

    def blocking_script(self, source: str) -> Script:
        if source not in self._sync_scripts:
            with self.blocking() as client:
                self._sync_scripts[source] = client.register_script(source)
        return self._sync_scripts[source]

    @contextlib.asynccontextmanager
    async def errors(self) -> AsyncIterator[None]:
        """Redis at maxmemory as QueueFullError, other failures as QueueUnavailableError."""
        try:
            yield
        except OutOfMemoryError as error:
            raise QueueFullError(
                "the queue's Redis is at its memory limit", self.settings.queue_full_retry_after_s
            ) from error
        except (RedisError, OSError) as error:
            raise QueueUnavailableError(f"Redis is unreachable: {error}") from error
        except (AttributeError, TypeError) as error:
            if not raised_inside_redis(error):
                raise
            raise QueueUnavailableError(f"the Redis connection broke: {error!r}") from error

    async def close(self) -> None:
        await self.client.aclose()
        if self._sync is not None:
            self._sync.close()
