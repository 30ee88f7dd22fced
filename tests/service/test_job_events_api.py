"""`GET /jobs/{id}/events` (Server-Sent Events) and the cancellation of running jobs over HTTP: a
real uvicorn API on a real Redis; the test plays the worker through the queue API (take, start,
step_signals, publish_progress, finish), so every event is known exactly."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from service_processes import Api
from test_queue_contract import done_record, make_spec

from service.api.routes.events import final_event
from service.queue import create_queue
from service.queue.protocol import JobProgress, JobQueue, JobState, TakenJob
from service.settings import Settings

pytestmark = [pytest.mark.integration]

KEY, OTHER_KEY = "events-key-a", "events-key-b"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}
MAX_DURATION_S = 4


@dataclass
class Service:
    api: Api
    redis_url: str
    queue_name: str

    def queue(self) -> JobQueue:
        """The test's worker-side view of the API's queue."""
        return create_queue(Settings(redis_url=self.redis_url, queue_name=self.queue_name))


@pytest.fixture(scope="module")
def service(redis_server, tmp_path_factory) -> Iterator[Service]:
    queue_name = f"events-{uuid.uuid4().hex[:8]}"
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": queue_name,
        "API_KEYS": f"{KEY},{OTHER_KEY}",
        "CANCEL_WAIT_S": "1",
        "EVENTS_MAX_STREAMS_PER_CALLER": "2",
        "EVENTS_MAX_DURATION_S": str(MAX_DURATION_S),
    }
    api = Api("service.api", env, tmp_path_factory.mktemp("events"))
    try:
        yield Service(api, redis_server.url, queue_name)
    finally:
        api.process.stop()


@dataclass
class Event:
    name: str
    data: dict
    id: str | None = None


@dataclass
class Stream:
    """An open event stream: its parsed events, one at a time, and its comment lines."""

    lines: AsyncIterator[str]
    comments: list[str] = field(default_factory=list)

    async def next(self, timeout_s: float = 5.0) -> Event | None:
        """The next event, or None when the stream closed."""
        return await asyncio.wait_for(self._next(), timeout_s)

    async def _next(self) -> Event | None:
        fields: dict[str, str] = {}
        async for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "event" in fields:
                return Event(fields["event"], json.loads(fields["data"]), fields.get("id"))
            else:
                fields = {}  # e.g. the `retry:` block
        return None


def client(service: Service, key: str = KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=service.api.url, timeout=10, headers={"Authorization": f"Bearer {key}"})


async def submit(http: httpx.AsyncClient, cat_b64: str) -> str:
    body = {"prompt": "a cat in the snow", "subjects": [{"image": cat_b64, "target": "cat"}], **SMALL}
    response = await http.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def take_started(queue: JobQueue, job_id: str) -> TakenJob:
    """Play a worker: take jobs until `job_id` comes, start it (earlier ones are started too)."""
    for _ in range(10):
        for taken in await queue.take("test-worker", 1, block_s=1.0):
            assert await queue.start("test-worker", taken)
            if taken.spec.id == job_id:
                return taken
    raise AssertionError(f"job {job_id} never came")


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_watched_job_streams_its_position_progress_and_result(service: Service, cat_b64: str) -> None:
    async def scenario() -> None:
        queue = service.queue()
        async with client(service) as http:
            ahead, job_id = await submit(http, cat_b64), await submit(http, cat_b64)
            async with http.stream("GET", f"/jobs/{job_id}/events", params={"previews": "true"}) as reply:
                assert reply.status_code == 200
                assert reply.headers["content-type"].startswith("text/event-stream")
                stream = Stream(reply.aiter_lines())
                first = await stream.next()
                assert (first.name, first.data["position"]) == ("queued", 1)
                await take_started(queue, ahead)
                assert (await stream.next()).data["position"] == 0
                taken = await take_started(queue, job_id)
                # The open stream asked for previews: the worker sees the job watched.
                assert (await queue.step_signals([job_id, ahead])).watched == {job_id}
                for step in (1, 2):
                    await queue.publish_progress(
                        job_id,
                        JobProgress(step=step, steps=2, eta_s=2.0 - step, preview=b"\x89PNG-x", masks=[b"m"]),
                    )
                    event = await stream.next()
                    assert event.name == "progress" and event.id is not None
                    assert event.data["step"] == step and event.data["steps"] == 2
                    assert event.data["eta_s"] == 2.0 - step
                    assert (
                        event.data["preview"]
                        == "data:image/png;base64," + base64.b64encode(b"\x89PNG-x").decode()
                    )
                    assert event.data["masks"] == ["data:image/png;base64," + base64.b64encode(b"m").decode()]
                await queue.finish(taken, done_record(taken.spec, worker="test-worker"))
                done = await stream.next()
                assert done.name == "done" and done.data["status"] == "done"
                assert done.data["images"] == [f"/jobs/{job_id}/images/0"] and done.data["masks"] is None
                assert "timings" in done.data and await stream.next() is None  # closed after the result
            image = await http.get(done.data["images"][0])
            assert image.status_code == 200 and image.content == b"image-bytes"
            # Without previews the same events carry no images; a finished job replays its log.
            async with http.stream("GET", f"/jobs/{job_id}/events") as reply:
                stream = Stream(reply.aiter_lines())
                replayed = [await stream.next() for _ in range(3)]
                assert [event.name for event in replayed] == ["progress", "progress", "done"]
                assert "preview" not in replayed[0].data and "masks" not in replayed[0].data
        await queue.close()

    run(scenario())


def test_reconnection_resumes_after_the_last_event_id(service: Service, cat_b64: str) -> None:
    async def scenario() -> None:
        queue = service.queue()
        async with client(service) as http:
            job_id = await submit(http, cat_b64)
            taken = await take_started(queue, job_id)
            for step in (1, 2, 3):
                await queue.publish_progress(job_id, JobProgress(step=step, steps=4))
            async with http.stream("GET", f"/jobs/{job_id}/events") as reply:
                stream = Stream(reply.aiter_lines())
                ids = [(await stream.next()).id for _ in range(3)]
                assert stream.comments == [] and ids == sorted(ids)
            resumed_with = [("headers", {"Last-Event-ID": ids[0]}), ("params", {"last_event_id": ids[0]})]
            for kind, value in resumed_with:
                async with http.stream("GET", f"/jobs/{job_id}/events", **{kind: value}) as reply:
                    stream = Stream(reply.aiter_lines())
                    events = [await stream.next(), await stream.next()]
                    assert [(event.id, event.data["step"]) for event in events] == [(ids[1], 2), (ids[2], 3)]
            bad = await http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "not-an-id"})
            assert bad.status_code == 422
            async with http.stream(
                "GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": ids[2]}
            ) as reply:
                stream = Stream(reply.aiter_lines())
                pending = asyncio.create_task(stream.next())
                await asyncio.sleep(0.3)
                assert not pending.done()  # nothing new yet: the stream waits
                failed = done_record(taken.spec, worker="test-worker").model_copy(
                    update={"state": JobState.FAILED, "result": None, "error": "RuntimeError: boom"}
                )
                await queue.finish(taken, failed)
                final = await asyncio.wait_for(pending, 3)  # woken by the end, not by a timeout
                assert (final.name, final.data["error"]) == ("failed", "RuntimeError: boom")
        await queue.close()

    run(scenario())


def test_streams_are_owner_checked_limited_and_bounded_in_time(service: Service, cat_b64: str) -> None:
    async def scenario() -> None:
        async with client(service) as http, client(service, OTHER_KEY) as other:
            job_id, others_job = await submit(http, cat_b64), await submit(other, cat_b64)
            stranger = await other.get(f"/jobs/{job_id}/events")
            assert stranger.status_code == 404 and stranger.json()["error"]["code"] == "not_found"
            assert (await http.get("/jobs/no-such-job/events")).status_code == 404
            opened = time.monotonic()
            async with http.stream("GET", f"/jobs/{job_id}/events") as first:
                async with http.stream("GET", f"/jobs/{job_id}/events") as second:
                    assert first.status_code == second.status_code == 200
                    third = await http.get(f"/jobs/{job_id}/events")
                    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_streams"
                    assert "Retry-After" in third.headers
                    async with other.stream("GET", f"/jobs/{others_job}/events") as theirs:
                        assert theirs.status_code == 200  # the limit is per caller
                stream = Stream(first.aiter_lines())
                assert (await stream.next()).data["position"] >= 0
                assert await stream.next(timeout_s=MAX_DURATION_S + 3) is None  # closed at the limit
                assert time.monotonic() - opened >= MAX_DURATION_S - 0.5
                assert any("EVENTS_MAX_DURATION_S" in comment for comment in stream.comments)
            async with http.stream("GET", f"/jobs/{job_id}/events") as again:  # the slots were freed
                assert again.status_code == 200
            assert (await http.delete(f"/jobs/{job_id}")).json()["status"] == "cancelled"
            paths = (await http.get("/openapi.json")).json()["paths"]
            assert "text/event-stream" in paths["/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
            assert "202" in paths["/jobs/{job_id}"]["delete"]["responses"]
            assert (await other.delete(f"/jobs/{others_job}")).json()["status"] == "cancelled"

    run(scenario())


def test_cancelling_running_jobs(service: Service, cat_b64: str) -> None:
    async def scenario() -> None:
        queue = service.queue()
        async with client(service) as http:
            # A worker that reacts: it checks its job's signals at every "step boundary".
            job_id = await submit(http, cat_b64)
            taken = await take_started(queue, job_id)

            async def worker_steps() -> None:
                while job_id not in (await queue.step_signals([job_id])).cancelled:
                    await asyncio.sleep(0.05)
                record = done_record(taken.spec, worker="test-worker").model_copy(
                    update={"state": JobState.CANCELLED, "result": None, "error": "cancelled while running"}
                )
                await queue.finish(taken, record)

            stepping = asyncio.create_task(worker_steps())
            async with http.stream("GET", f"/jobs/{job_id}/events") as reply:
                stream = Stream(reply.aiter_lines())
                deleted = await http.delete(f"/jobs/{job_id}")
                assert deleted.status_code == 200 and deleted.json()["status"] == "cancelled"
                final = await stream.next()
                assert (final.name, final.data["error"]) == ("cancelled", "cancelled while running")
            await stepping
            # A worker that does not confirm within CANCEL_WAIT_S: 202, the job stops later.
            slow_id = await submit(http, cat_b64)
            slow = await take_started(queue, slow_id)
            pending = await http.delete(f"/jobs/{slow_id}")
            assert pending.status_code == 202 and pending.json()["status"] == "running"
            assert "next denoising step" in pending.json()["message"]
            assert (await queue.step_signals([slow_id])).cancelled == {slow_id}
            await queue.finish(
                slow, done_record(slow.spec, worker="test-worker")
            )  # it finished first: done stays done
            late = await http.delete(f"/jobs/{slow_id}")
            assert late.status_code == 409 and late.json()["error"]["code"] == "not_cancellable"
            # A synchronous request whose client leaves cancels its running job the same way.
            body = {"prompt": "a cat in the snow", "subjects": [{"image": cat_b64, "target": "cat"}], **SMALL}
            request = asyncio.create_task(http.post("/customize", json=body))
            [sync_job] = await queue.take("test-worker", 1, block_s=5.0)
            assert await queue.start("test-worker", sync_job)
            request.cancel()  # the client disconnects
            await asyncio.gather(request, return_exceptions=True)
            deadline = time.monotonic() + 5
            while sync_job.spec.id not in (await queue.step_signals([sync_job.spec.id])).cancelled:
                assert time.monotonic() < deadline, "the disconnect did not request the cancellation"
                await asyncio.sleep(0.05)
            await queue.finish(sync_job, done_record(sync_job.spec, worker="test-worker"))
        await queue.close()

    run(scenario())


def test_the_final_event_of_a_job_past_its_deadline_or_gone() -> None:
    spec = make_spec(timeout_s=-1.0)  # queued, and its deadline has passed: no worker will run it
    expired = final_event(spec.record(JobState.QUEUED), spec.id)
    assert expired.startswith("event: expired\n") and "missed its deadline" in expired
    gone = final_event(None, spec.id)
    assert gone.startswith("event: expired\n") and "no longer kept" in gone
