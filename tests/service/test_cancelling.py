"""A cancelled task ends, even where Python 3.11 loses the cancellation.

On 3.11 `asyncio.wait_for` returns the awaited result when the task is cancelled at the moment
that result arrives; redis-py sends each command under `wait_for`. A stopping worker cancelled its
heartbeat loop once, the cancellation was lost, and the worker never exited (the two-workers fault
test, under load). `service.cancelling` cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import uuid
from pathlib import Path

from service_processes import WorkerProcess, wait_until

from service.cancelling import cancel_and_wait, cancel_in_background
from service.queue.connect import connect_async


async def loop_over_wait_for(operations: list[asyncio.Future[None]]) -> None:
    while True:
        operation = asyncio.get_running_loop().create_future()
        operations.append(operation)
        await asyncio.wait_for(operation, 5)


def test_a_cancellation_lost_by_wait_for_is_repeated_until_the_task_ends() -> None:
    async def scenario() -> tuple[bool, bool]:
        operations: list[asyncio.Future[None]] = []
        task = asyncio.create_task(loop_over_wait_for(operations))
        await asyncio.sleep(0)  # the task waits on its first operation
        operations[0].set_result(None)
        task.cancel()  # in the same moment the operation completes
        await asyncio.sleep(0.01)
        lost = not task.done()
        await asyncio.wait_for(cancel_and_wait(task), 5)
        return lost, task.cancelled()

    lost, cancelled = asyncio.run(scenario())
    if sys.version_info < (3, 12):
        assert lost, "one cancel() should be lost here on Python 3.11 (CPython gh-86296)"
    assert cancelled


def test_cancel_in_background_ends_the_task_without_waiting_for_it() -> None:
    async def scenario() -> bool:
        operations: list[asyncio.Future[None]] = []
        task = asyncio.create_task(loop_over_wait_for(operations))
        await asyncio.sleep(0)
        operations[0].set_result(None)
        cancel_in_background(task)
        assert not task.done()  # returned at once
        await asyncio.wait_for(asyncio.wait([task]), 5)
        return task.cancelled()

    assert asyncio.run(scenario())


def test_loops_over_redis_calls_end_however_the_cancellation_lands(redis_server) -> None:
    async def scenario() -> int:
        client = connect_async(redis_server.url, None, health_check_interval=10)
        script = client.register_script("return redis.call('TIME')")

        async def heartbeats() -> None:
            while True:
                await script(keys=["cancelling-test"], args=[1], client=client)
                await asyncio.sleep(0)

        rng = random.Random(7)
        ended = 0
        try:
            for _ in range(100):
                task = asyncio.create_task(heartbeats())
                await asyncio.sleep(rng.random() * 0.002)
                await asyncio.wait_for(cancel_and_wait(task), 5)
                ended += task.cancelled()
        finally:
            await client.aclose()
        return ended

    assert asyncio.run(scenario()) == 100


def test_workers_heartbeating_without_pause_stop_on_sigterm(redis_server, tmp_path: Path) -> None:
    """Heartbeats back to back: the stop's cancellation nearly always lands in a Redis call."""
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"cancelling-{uuid.uuid4().hex[:8]}",
        "HEARTBEAT_S": "0.0001",
    }
    workers = [WorkerProcess(f"beat-{index}", env, tmp_path) for index in range(4)]
    try:
        for worker in workers:
            ready = f"worker {worker.worker_id} ready"
            wait_until(lambda worker=worker, ready=ready: ready in worker.log(), 120, ready)
        for worker in workers:
            worker.process.send_signal(signal.SIGTERM)
        for worker in workers:
            assert worker.process.wait(20) == 0, worker.log()[-2000:]
            assert f"worker {worker.worker_id} stopped" in worker.log()
    finally:
        for worker in workers:
            if worker.alive():
                worker.stop()
