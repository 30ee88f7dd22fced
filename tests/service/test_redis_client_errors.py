"""A Redis client that breaks mid-send is the queue being unavailable, never a crash of its caller.

redis-py's async connection sends on `self._writer`; when another task tears the connection down
(Redis crashing, a failover) in the middle, the send fails with an AttributeError from inside the
client. The fault script once lost a worker this way: its heartbeat task died of it. The same error
raised by our own code must stay a bug.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import Connection

from service.queue import create_queue
from service.queue.protocol import QueueUnavailableError
from service.queue.storage import RedisStorage, raised_inside_redis
from service.settings import Settings


async def send_on_a_torn_down_connection() -> None:
    connection = Connection()  # never connected: its writer is None, as after a disconnect
    await connection._send_packed_command([b"PING\r\n"])


def test_an_error_raised_inside_the_client_is_told_from_ours() -> None:
    with pytest.raises(AttributeError) as inside:
        asyncio.run(send_on_a_torn_down_connection())
    assert raised_inside_redis(inside.value)
    with pytest.raises(AttributeError) as ours:
        None.writelines  # noqa: B018 (the same error, raised here)
    assert not raised_inside_redis(ours.value)


def test_storage_and_queue_report_a_broken_client_as_unavailable(redis_server) -> None:
    settings = Settings(redis_url=redis_server.url, queue_name="client-errors")

    async def scenario() -> None:
        storage = RedisStorage(settings)
        queue = create_queue(settings)
        try:
            with pytest.raises(QueueUnavailableError, match="the Redis connection broke"):
                async with storage.errors():
                    await send_on_a_torn_down_connection()
            with pytest.raises(QueueUnavailableError, match="the Redis connection broke"):
                async with queue._redis():
                    await send_on_a_torn_down_connection()
            with pytest.raises(AttributeError):  # our own bug is not hidden
                async with queue._redis():
                    None.writelines  # noqa: B018
        finally:
            await queue.close()
            await storage.close()

    asyncio.run(scenario())
