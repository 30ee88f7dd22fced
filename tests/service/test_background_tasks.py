"""Background tasks of the API process may not die silently (service/background.py), checked on
the all-in-one app served by real uvicorn servers (the API and its health listener, as
`service.api.app.serve` builds them) on a thread of this process, so that a test can reach into
its event loop and kill a task. The fatal hook records instead of ending the test process (the
real exits are in test_process_supervision.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from raw_http import connect, get, read_reply
from service_processes import free_port, wait_until
from test_queue_contract import done_record, make_spec

from service.__main__ import WORKER_TASK, embedded_worker
from service.api.app import create_app, serve_both, servers
from service.background import RESTART_FIRST_S, BackgroundTasks
from service.queue import create_queue
from service.queue.protocol import JobState
from service.settings import Settings
from service.webhooks.dispatcher import DISPATCHER_TASK

pytestmark = pytest.mark.integration


@dataclass
class Served:
    """The all-in-one app on real listeners, on a thread with its own event loop."""

    settings: Settings
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    fatal: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = create_app(self.settings, companion=functools.partial(embedded_worker, self.settings))
        self.app.state.on_fatal = lambda why, status: self.fatal.append((why, status))
        self.api, self.health = servers(self.app, self.settings)
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(serve_both(self.api, self.health),)
        )
        self.thread.start()
        wait_until(lambda: self.status(self.settings.health_port, "/readyz")[0] == 200, 60, "a warm worker")

    def status(self, port: int, path: str) -> tuple[int | None, dict]:
        try:
            with connect(port, 5) as sock:
                sock.sendall(get(path))
                reply = read_reply(sock)
        except OSError:
            return None, {}
        return reply.status, json.loads(reply.body)

    def on_loop(self, coroutine_function) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine_function(), self.loop).result(10)

    def task(self, name: str) -> asyncio.Task | None:
        """The running task of that name; None while there is none (between restarts)."""

        async def find() -> asyncio.Task | None:
            found = [task for task in asyncio.all_tasks() if task.get_name() == name]
            assert len(found) <= 1, found
            return found[0] if found else None

        return self.on_loop(find)

    def cancel(self, name: str) -> None:
        async def cancel() -> None:
            [task] = [task for task in asyncio.all_tasks() if task.get_name() == name]
            task.cancel()

        self.on_loop(cancel)

    @property
    def background(self) -> BackgroundTasks:
        return self.app.state.background

    def stop(self) -> None:
        self.api.should_exit = True
        self.thread.join(60)


@contextlib.contextmanager
def serve_all_in_one(**settings: object) -> Iterator[Served]:
    served = Served(Settings(port=free_port(), health_port=free_port(), redis_url=None, **settings))
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def served() -> Iterator[Served]:
    with serve_all_in_one() as served:
        yield served


def poll_until(served: Served, predicate, timeout_s: float) -> list[tuple[int | None, dict]]:
    """/healthz on both listeners every 20 ms until `predicate(answers so far)`."""
    answers = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answers.append(served.status(served.settings.health_port, "/healthz"))
        answers.append(served.status(served.settings.port, "/healthz"))
        if predicate(answers):
            return answers
        time.sleep(0.02)
    raise TimeoutError(f"no such answers within {timeout_s} s: {answers[-4:]}")


def test_a_cancelled_webhook_loop_fails_liveness_until_it_is_restarted(served: Served) -> None:
    first = served.task(DISPATCHER_TASK)
    served.cancel(DISPATCHER_TASK)
    answers = poll_until(served, lambda seen: any(status == 503 for status, _ in seen), 5)
    failing = next(body for status, body in answers if status == 503)
    assert failing["status"] == "failing"
    assert failing["detail"]["problems"] == [f"{DISPATCHER_TASK} was cancelled; restarting"]
    poll_until(served, lambda seen: seen[-1][0] == seen[-2][0] == 200, RESTART_FIRST_S + 5)
    assert served.task(DISPATCHER_TASK) not in (None, first)  # a fresh loop
    state = served.background.detail()[DISPATCHER_TASK]
    assert state == {"state": "running", "restarts": 1, "last_error": "was cancelled"}
    assert served.fatal == []


def test_a_webhook_loop_that_keeps_failing_is_restarted_ever_more_slowly(served: Served) -> None:
    """Killed again as soon as it is back: the pauses double (0.5 s, 1 s, 2 s)."""
    restarted_at = []
    for _ in range(3):
        before = served.task(DISPATCHER_TASK)
        served.cancel(DISPATCHER_TASK)
        wait_until(
            lambda before=before: served.task(DISPATCHER_TASK) not in (None, before),
            10,
            "the restart",
            interval_s=0.01,
        )
        restarted_at.append(time.monotonic())
    pauses = [later - earlier for earlier, later in itertools.pairwise(restarted_at)]
    assert 0.9 < pauses[0] < 1.9 and 1.9 < pauses[1] < 3.5, pauses
    assert served.background.detail()[DISPATCHER_TASK]["restarts"] == 3


def test_a_dead_embedded_worker_fails_both_probes_and_ends_the_process(served: Served) -> None:
    served.cancel(WORKER_TASK)
    wait_until(lambda: served.fatal, 5, "the fatal hook")
    assert served.fatal == [(f"{WORKER_TASK} was cancelled", 1)]
    # The hook of `serve` would now stop the servers and exit 1; this one only records, so both
    # listeners can be read: both say why.
    for port in (served.settings.port, served.settings.health_port):
        status, body = served.status(port, "/healthz")
        assert status == 503 and body["detail"]["problems"] == [f"{WORKER_TASK} was cancelled"]
    status, body = served.status(served.settings.health_port, "/readyz")
    assert status == 503 and body["status"] == "not_ready" and body["detail"]["queue_reachable"]


def test_a_worker_that_makes_no_progress_fails_liveness_until_it_does(cat_b64: str) -> None:
    """WORKER_STALL_S below the time of one step of a 512 x 512 job on the CPU: between two steps
    the embedded worker shows no progress, and /healthz says so; idle again, it is alive."""
    with serve_all_in_one(worker_stall_s=0.05) as served:
        body = {
            "prompt": "a cat in the snow",
            "subjects": [{"image": cat_b64, "target": "cat"}],
            "width": 512,
            "height": 512,
            "num_inference_steps": 8,
            "mask_reused_step": 1,
        }
        job = httpx.post(f"http://127.0.0.1:{served.settings.port}/jobs", json=body, timeout=30)
        assert job.status_code == 202, job.text
        answers = poll_until(served, lambda seen: any(status == 503 for status, _ in seen), 60)
        stalled = next(body for status, body in answers if status == 503)
        assert any(
            problem.startswith(f"{WORKER_TASK}: no progress for") for problem in stalled["detail"]["problems"]
        )
        job_url = f"http://127.0.0.1:{served.settings.port}/jobs/{job.json()['id']}"
        wait_until(lambda: httpx.get(job_url, timeout=5).json()["status"] == "done", 120, "the job")
        poll_until(served, lambda seen: seen[-1][0] == seen[-2][0] == 200, 10)
        assert served.fatal == []


def test_a_killed_result_listener_is_replaced_while_requests_wait(redis_server) -> None:
    """The Redis queue's listener of finished jobs (it wakes the synchronous requests) is started
    again by its waiters within a second of its end, not only by the next request."""

    def listeners() -> list[asyncio.Task]:
        return [task for task in asyncio.all_tasks() if task.get_name() == "redis-done-listener"]

    async def scenario() -> None:
        queue = create_queue(
            Settings(redis_url=redis_server.url, queue_name=f"listener-{uuid.uuid4().hex[:8]}")
        )
        try:
            spec = make_spec()
            await queue.submit(spec)
            waiter = asyncio.create_task(queue.wait(spec.id, 30))
            await asyncio.sleep(0.3)
            [listener] = listeners()
            listener.cancel()
            await asyncio.sleep(1.5)  # one round of the waiter
            [replacement] = listeners()
            assert replacement is not listener and not replacement.done()
            # Garbage on the channel (not UTF-8) does not end it either.
            await queue._client.publish(queue._channel, b"\xff\xfe")
            await asyncio.sleep(0.3)
            [taken] = await queue.take("w1", 1, block_s=1)
            assert await queue.start("w1", taken)
            await queue.finish(taken, done_record(spec))
            record = await asyncio.wait_for(waiter, 5)
            assert record.state == JobState.DONE
            assert listeners() == [replacement]
        finally:
            await queue.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("helper", ["worker-intake", "worker-heartbeat"])
def test_a_worker_whose_intake_or_heartbeat_ended_ends_too(served: Served, helper: str) -> None:
    """Without its intake the worker would take no job again, without its heartbeat it would keep
    none (and with Redis lose them to reclaim), while looking alive: it ends, and so does the
    all-in-one process."""
    served.cancel(helper)
    wait_until(lambda: served.fatal, 5, "the fatal hook")
    why = f"{WORKER_TASK} raised WorkerTaskEnded: the worker's {helper} task was cancelled"
    assert served.fatal == [(why, 1)]
    assert served.status(served.settings.health_port, "/healthz")[1]["detail"]["problems"] == [why]
