"""Faults with real processes: a worker killed mid-job, Redis restarted with jobs queued, a full
queue, a missed deadline, and a graceful stop with work in flight."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from service_processes import Api, RedisServer, WorkerProcess, wait_until

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


def queue_env(redis_url: str, **settings: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "QUEUE_NAME": f"fault-{uuid.uuid4().hex[:8]}", **settings}


def test_killed_worker_job_completes_on_the_other_and_sigterm_finishes_in_flight_work(
    redis_server, tmp_path: Path, cat_b64: str
) -> None:
    env = queue_env(redis_server.url, HEARTBEAT_S="0.3", RECLAIM_IDLE_S="1.5", MAX_BATCH="1")
    workers = {worker_id: WorkerProcess(worker_id, env, tmp_path) for worker_id in ("kill-a", "kill-b")}
    api = Api("service.api", env, tmp_path)
    try:
        api.wait_ready_workers(2)
        with api.client() as client:
            job_id = client.post("/jobs", json=cat_body(cat_b64, seed=11, **SLOW)).json()["id"]
            victim = wait_status(client, job_id, {"running"}, 30)["worker"]
            workers[victim].kill()  # SIGKILL mid-job: no chance to clean up
            survivor = next(worker for worker_id, worker in workers.items() if worker_id != victim)
            done = wait_status(client, job_id, {"done", "failed"}, 30)
            assert done["status"] == "done" and done["worker"] == survivor.worker_id
            assert "reclaimed job" in survivor.log()

            # Graceful stop: SIGTERM while a job runs and the next one is already taken (prefetched)
            # -> the running job is finished and stored, the taken one returned to the queue.
            job_id = client.post("/jobs", json=cat_body(cat_b64, seed=12, **SLOW)).json()["id"]
            wait_status(client, job_id, {"running"}, 30)
            next_id = client.post("/jobs", json=cat_body(cat_b64, seed=13, **SLOW)).json()["id"]
            stream = redis.Redis.from_url(redis_server.url)
            stream_key = f"{env['QUEUE_NAME']}:stream"
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
    env = queue_env(redis_server.url, QUEUE_MAX_DEPTH="2", JOB_TIMEOUT_S="1.5", QUEUE_FULL_RETRY_AFTER_S="3")
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
