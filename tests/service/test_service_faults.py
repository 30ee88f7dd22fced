"""Faults with real processes: two workers on one host and one killed mid-batch, poison messages,
a Redis error at a job's start, Redis restarted with jobs queued, settings that do not fit Redis, a
full queue, a missed deadline, and a graceful stop with work in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from service_processes import Api, RedisServer, ServiceProcess, WorkerProcess, free_port, wait_until
from test_queue_contract import SUBJECT, make_spec

from service.queue import create_queue
from service.queue.keys import QueueKeys
from service.queue.protocol import JobSpec, SubjectSpec
from service.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}
# About 1 s on the tiny model with one CPU thread: long enough to act on while it runs.
SLOW = {"width": 256, "height": 256, "num_inference_steps": 24, "mask_reused_step": 1, "num_images": 2}


def cat_body(cat_b64: str, **params) -> dict:
    return {"prompt": "a cat in the snow", "subjects": [{"image": cat_b64, "target": "cat"}], **params}


def job_status(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()


def wait_status(client: httpx.Client, job_id: str, wanted: set[str], timeout_s: float) -> dict:
    return wait_until(
        lambda: (status := job_status(client, job_id))["status"] in wanted and status,
        timeout_s,
        f"job {wanted}",
    )


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis this test may kill and restart (AOF on, fsync always)."""
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


def submit_directly(env: dict[str, str], spec: JobSpec) -> None:
    """Accept a job through the queue itself, bypassing the API's checks."""

    async def submit() -> None:
        queue = create_queue(Settings(redis_url=env["REDIS_URL"], queue_name=env["QUEUE_NAME"]))
        await queue.submit(spec)
        await queue.close()

    asyncio.run(submit())


def listening_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): unlike `free_port`'s, no outgoing
    connection of another process can take it between this check and a worker's bind."""
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port between 20000 and 32767")


def queue_env(redis_url: str, **settings: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "QUEUE_NAME": f"fault-{uuid.uuid4().hex[:8]}", **settings}


def test_two_workers_on_one_host_a_killed_one_s_batch_completes_on_the_other_and_sigterm_drains(
    redis_server, tmp_path: Path, cat_b64: str
) -> None:
    env = queue_env(redis_server.url, HEARTBEAT_S="0.3", RECLAIM_IDLE_S="1.5", MAX_BATCH="2")
    shared_port = listening_port()  # both ask for the same metrics port, as two workers of one image do
    workers = {
        worker_id: WorkerProcess(worker_id, env, tmp_path, metrics_port=shared_port)
        for worker_id in ("kill-a", "kill-b")
    }
    api = Api("service.api", env, tmp_path)
    try:
        api.wait_ready_workers(2)
        assert sum("is taken" in worker.log() for worker in workers.values()) == 1
        urls = {worker.metrics_url for worker in workers.values()}
        assert len(urls) == 2 and all(url.startswith("http://127.0.0.1:") for url in urls)
        assert all(worker.metric("realcustom_worker_ready") == 1 for worker in workers.values())
        with api.client() as client:
            job_ids = [
                client.post("/jobs", json=cat_body(cat_b64, seed=seed, **SLOW)).json()["id"]
                for seed in (11, 12)
            ]
            victim = wait_status(client, job_ids[0], {"running"}, 30)["worker"]
            in_flight = [job_id for job_id in job_ids if job_status(client, job_id)["worker"] == victim]
            workers[victim].kill()  # SIGKILL mid-batch: no chance to clean up
            survivor = next(worker for worker_id, worker in workers.items() if worker_id != victim)
            for job_id in job_ids:
                done = wait_status(client, job_id, {"done", "failed"}, 60)
                assert done["status"] == "done"
                if job_id in in_flight:
                    assert done["worker"] == survivor.worker_id
            assert "reclaimed job" in survivor.log()

            # Graceful stop: SIGTERM while a job fills the running batch (2 images, MAX_BATCH=2) and
            # the next one is already taken and prepared, waiting for rows -> the running job is
            # finished and stored, the taken one returned to the queue.
            job_id = client.post("/jobs", json=cat_body(cat_b64, seed=13, **SLOW)).json()["id"]
            wait_status(client, job_id, {"running"}, 30)
            next_id = client.post("/jobs", json=cat_body(cat_b64, seed=14, **SLOW)).json()["id"]
            stream = redis.Redis.from_url(redis_server.url)
            stream_key = QueueKeys(env["QUEUE_NAME"]).stream
            wait_until(lambda: stream.xpending(stream_key, "workers")["pending"] == 2, 10, "the prefetch")
            survivor.process.send_signal(signal.SIGTERM)
            assert survivor.process.wait(30) == 0
            assert job_status(client, job_id)["status"] == "done"
            assert job_status(client, next_id)["status"] == "queued"
            assert stream.xpending(stream_key, "workers")["pending"] == 0 and stream.xlen(stream_key) == 1
            assert f"returned job {next_id}" in survivor.log() and "stopped" in survivor.log()
            stream.close()
    finally:
        for worker in workers.values():
            if worker.alive():
                worker.stop()
        api.process.stop()
    assert all("Traceback" not in worker.log() for worker in workers.values())


def test_poison_messages_are_dead_lettered_and_the_worker_stays_alive_and_ready(
    redis_server, tmp_path: Path, cat_b64: str
) -> None:
    env = queue_env(redis_server.url, HEARTBEAT_S="0.3")
    worker = WorkerProcess("poison", env, tmp_path)
    api = Api("service.api", env, tmp_path)
    store = redis.Redis.from_url(redis_server.url)
    prefix = env["QUEUE_NAME"]
    try:
        api.wait_ready_workers(1)
        # What an older version of the service left in the stream (base64 images inside the JSON
        # spec, no format field), with its record; and a message that is not a job at all.
        old_id = "0123456789abcdef0123456789abcdef"
        old_spec = {"id": old_id, "prompt": "a cat", "subjects": [{"image": cat_b64, "target": "cat"}]}
        message = store.xadd(
            QueueKeys(prefix).stream, {"id": old_id, "deadline": "9e9", "spec": json.dumps(old_spec)}
        )
        meta = {"seed": 1, "output_format": "png", "enqueued_at": time.time(), "deadline": 9e9}
        store.hset(
            QueueKeys(prefix).job(old_id),
            mapping={"state": "queued", "meta": json.dumps(meta), "msg": message},
        )
        store.xadd(QueueKeys(prefix).stream, {"garbage": b"\xff\xfe"})
        # A readable job whose reference cannot become an image (12 bytes for 64x64 pixels): it
        # fails with the reason, it is not dead-lettered.
        broken = make_spec().model_copy(
            update={"subjects": [SubjectSpec.model_validate(SUBJECT | {"width": 64, "height": 64})]}
        )
        submit_directly(env, broken)
        with api.client() as client:
            reply = client.post("/customize", json=cat_body(cat_b64, **SMALL))
            assert reply.status_code == 200, reply.text
            wait_until(lambda: worker.metric("realcustom_queue_dead_letters_total") == 2, 30, "dead letters")
            failed = store.hgetall(QueueKeys(prefix).job(old_id))
            assert failed[b"state"] == b"failed" and b"another version" in failed[b"error"]
            unprepared = wait_until(
                lambda: (
                    (record := store.hgetall(QueueKeys(prefix).job(broken.id)))[b"state"] != b"queued"
                    and record
                ),
                30,
                "the broken job to end",
            )
            assert unprepared[b"state"] == b"failed" and b"could not be prepared" in unprepared[b"error"]
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["detail"]["ready_workers"] == 1
        assert (
            worker.alive()
            and store.xlen(QueueKeys(prefix).dead) == 2
            and store.xlen(QueueKeys(prefix).stream) == 0
        )
    finally:
        store.close()
        worker.stop()
        api.process.stop()
    assert "Traceback" not in worker.log() and worker.log().count("dead-lettered message") == 2


def test_a_redis_error_when_a_job_starts_does_not_strand_it(
    redis_server, tmp_path: Path, cat_b64: str
) -> None:
    env = queue_env(redis_server.url, HEARTBEAT_S="0.3", RECLAIM_IDLE_S="60")
    api = Api("service.api", env, tmp_path)
    store = redis.Redis.from_url(redis_server.url)
    worker = None
    try:
        with api.client() as client:
            job_id = client.post("/jobs", json=cat_body(cat_b64, **SMALL)).json()["id"]
            # While the record is unreadable, every `start` of this job fails with a Redis error.
            key = QueueKeys(env["QUEUE_NAME"]).job(job_id)
            record, ttl = store.hgetall(key), store.ttl(key)
            store.delete(key)
            store.set(key, "not a hash")
            worker = WorkerProcess("transient", env, tmp_path)
            wait_until(lambda: "queue unavailable" in worker.log(), 90, "a failed start")
            store.delete(key)
            store.hset(key, mapping=record)
            store.expire(key, ttl)
            # Reclaiming (60 s) cannot be what saves it: the worker retries the start itself.
            assert wait_status(client, job_id, {"done", "failed"}, 20)["status"] == "done"
    finally:
        store.close()
        if worker is not None:
            worker.stop()
        api.process.stop()


@pytest.mark.parametrize("module", ["service.worker", "service.api"])
def test_settings_that_do_not_fit_redis_maxmemory_stop_the_process_with_a_clear_message(
    module: str, tmp_path: Path
) -> None:
    small = RedisServer(tmp_path / "redis", extra_args=("--maxmemory", "64mb"))
    small.directory.mkdir()
    small.start()
    try:
        process = ServiceProcess(module, queue_env(small.url, PORT=str(free_port())), tmp_path / "out.log")
        assert process.process.wait(60) == 2
        process.stop()
    finally:
        small.stop()
    log = process.log()
    assert "QUEUE_MAX_BYTES=268435456 needs Redis maxmemory" in log and "Traceback" not in log


def test_redis_restart_between_enqueue_and_consume_loses_nothing(
    own_redis: RedisServer, tmp_path: Path, cat_b64: str
) -> None:
    env = queue_env(own_redis.url, HEARTBEAT_S="0.3")
    api = Api("service.api", env, tmp_path)
    worker = None
    try:
        with api.client() as client:
            job_ids = [
                client.post("/jobs", json=cat_body(cat_b64, seed=seed, **SMALL)).json()["id"]
                for seed in range(3)
            ]
            own_redis.kill()  # SIGKILL: only what AOF already holds survives
            down = client.post("/jobs", json=cat_body(cat_b64, **SMALL))
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
            own_redis.start()
            worker = WorkerProcess("after-restart", env, tmp_path)
            for job_id in job_ids:
                assert wait_status(client, job_id, {"done", "failed", "expired"}, 60)["status"] == "done"
            # The API's result channel came back too: a synchronous request is answered.
            assert client.post("/customize", json=cat_body(cat_b64, **SMALL)).status_code == 200
    finally:
        if worker is not None:
            worker.stop()
        api.process.stop()
    assert "Traceback" not in api.process.log()


def test_full_queue_gets_429_and_missed_deadline_gets_504_and_is_never_computed(
    redis_server, tmp_path: Path, cat_b64: str
) -> None:
    # One key may fill this queue (QUEUE_KEY_SHARE=1): its global depth bound is what is tested.
    env = queue_env(
        redis_server.url,
        QUEUE_MAX_DEPTH="2",
        QUEUE_KEY_SHARE="1",
        JOB_TIMEOUT_S="1.5",
        QUEUE_FULL_RETRY_AFTER_S="3",
    )
    api = Api("service.api", env, tmp_path)  # no worker yet
    worker = None
    try:
        with api.client() as client:
            late = client.post("/customize", json=cat_body(cat_b64, **SMALL))
            assert late.status_code == 504 and "deadline" in late.json()["error"]["message"]
            late_id = late.headers["x-job-id"]
            queued_id = client.post("/jobs", json=cat_body(cat_b64, **SMALL)).json()["id"]
            full = client.post("/jobs", json=cat_body(cat_b64, **SMALL))
            assert full.status_code == 429 and full.headers["retry-after"] == "3"
            assert full.json()["error"]["code"] == "queue_full"

            worker = WorkerProcess("deadline", env, tmp_path)
            wait_until(lambda: worker.alive() and "ready" in worker.log(), 60, "the worker to start")
            wait_until(
                lambda: worker.metric('realcustom_jobs_finished_total{state="expired"}') == 2, 30, "drops"
            )
            for job_id in (late_id, queued_id):
                status = job_status(client, job_id)
                assert status["status"] == "expired" and status["result"] is None
            assert worker.metric("realcustom_inference_seconds_count") == 0  # skipped, not computed
            assert client.post("/jobs", json=cat_body(cat_b64, **SMALL)).status_code == 202  # room again
    finally:
        if worker is not None:
            worker.stop()
        api.process.stop()


def test_redis_at_maxmemory_gives_429_with_retry_after_and_recovers_once_freed(
    tmp_path: Path, cat_b64: str
) -> None:
    small = RedisServer(tmp_path / "redis", extra_args=("--maxmemory", "64mb"))
    small.directory.mkdir()
    small.start()
    # Two of these 4.9 MB jobs pass one key's default half of the 16 MiB: one key may take it all here.
    env = queue_env(
        small.url, QUEUE_MAX_BYTES=str(16 * 2**20), MAX_BODY_BYTES=str(8 * 2**20), QUEUE_KEY_SHARE="1"
    )
    api = Api("service.api", env, tmp_path)
    store = redis.Redis.from_url(small.url)
    try:
        with api.client() as client:
            assert client.post("/jobs", json=cat_body(cat_b64, **SMALL)).status_code == 202
            for index in range(2048):  # someone else's data fills Redis
                try:
                    store.set(f"filler:{index}", b"x" * 64 * 1024)
                except redis.exceptions.OutOfMemoryError:
                    break
            store.config_set("maxmemory", store.info("memory")["used_memory"] - 2**20)  # well past it
            full = client.post("/jobs", json=cat_body(cat_b64, **SMALL))
            assert full.status_code == 429 and full.headers["retry-after"] == "2"
            assert "memory limit" in full.json()["error"]["message"]
            store.delete(*store.keys("filler:*"))
            store.config_set("maxmemory", "64mb")
            again = client.post("/jobs", json=cat_body(cat_b64, **SMALL))
            assert again.status_code == 202, again.text
    finally:
        store.close()
        api.process.stop()
        small.stop()


def test_api_is_ready_while_redis_answers_even_with_no_worker_and_queues_jobs_for_the_next(
    own_redis: RedisServer, tmp_path: Path, cat_b64: str
) -> None:
    """Readiness means "this process can serve": no worker ready keeps the API in its Service and
    jobs wait in the queue; only an unreachable Redis takes it out."""
    env = queue_env(own_redis.url, HEARTBEAT_S="0.3")
    api = Api("service.api", env, tmp_path)
    worker = None
    try:
        with api.client() as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["detail"] | {"native_size": None} == {
                "queue_reachable": True,
                "ready_workers": 0,
                "native_size": None,
            }
            accepted = client.post("/jobs", json=cat_body(cat_b64, **SMALL))
            assert accepted.status_code == 202, accepted.text
            own_redis.kill()
            down = client.get("/readyz")
            assert down.status_code == 503 and down.json()["detail"]["queue_reachable"] is False
            own_redis.start()
            wait_until(lambda: client.get("/readyz").status_code == 200, 30, "ready again")
            worker = WorkerProcess("late", env, tmp_path)
            done = wait_status(client, accepted.json()["id"], {"done", "failed", "expired"}, 90)
            assert done["status"] == "done"
    finally:
        if worker is not None:
            worker.stop()
        api.process.stop()
