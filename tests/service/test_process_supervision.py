"""A process whose worker or background task died must not look alive, with real processes:

* the all-in-one process (`python -m service`, in-process queue, tiny model) exits 3 when its
  embedded worker abandons a batch past a (tiny) compute deadline, and 1 when its model does not
  load (a weights directory that holds no weights); before, it stayed up with /healthz 200;
* the API (`python -m service.api`, Redis) restarts its webhook delivery loop when corrupt data in
  Redis makes it raise, failing /healthz on the health listener until it is back.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from service_processes import Api, ServiceProcess, free_port, wait_until
from test_service_faults import cat_body

from service.queue.keys import QueueKeys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# About 2 s on the tiny model with one CPU thread; each step far over a 0.1 s deadline.
LONG = {"width": 512, "height": 512, "num_inference_steps": 12, "mask_reused_step": 1}


def test_the_all_in_one_process_exits_3_when_its_worker_passes_its_compute_deadline(
    cat_b64: str, tmp_path: Path
) -> None:
    env = {"REDIS_URL": "", "COMPUTE_DEADLINE_S": "0.1", "COMPUTE_S_PER_IMAGE_STEP": "0"}
    api = Api("service", env, tmp_path)
    try:
        api.wait_ready_workers(1)
        reply = httpx.post(api.url + "/jobs", json=cat_body(cat_b64, **LONG), timeout=30)
        assert reply.status_code == 202, reply.text
        started = time.monotonic()
        answers = []  # /healthz on the health listener until the process is gone
        while api.process.alive() and time.monotonic() - started < 60:
            try:
                answers.append(httpx.get(api.health_url + "/healthz", timeout=2).status_code)
            except httpx.HTTPError:
                answers.append(None)
            time.sleep(0.02)
        assert api.process.process.wait(5) == 3, api.process.log()[-3000:]
        # Once it stopped answering 200, it never did again: failing, then gone.
        first_failure = next(index for index, status in enumerate(answers) if status != 200)
        assert set(answers[first_failure:]) <= {503, None}, answers
        log = api.process.log()
        assert "still computing after its compute deadline of 0.1 s" in log
        assert "embedded-worker raised ComputeDeadlineExceeded" in log
        assert "exiting with status 3 so that it is restarted" in log
        # Out well before the job would have ended (the grace for replies in flight is 3 s).
        assert time.monotonic() - started < 15
    finally:
        api.process.stop()


def test_the_all_in_one_process_exits_1_when_its_model_does_not_load(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model_index.json").write_text("{not json")
    process = ServiceProcess(
        "service",
        {"REDIS_URL": "", "MODEL": str(weights), "PORT": str(free_port()), "HEALTH_PORT": str(free_port())},
        tmp_path / "service.log",
    )
    try:
        assert process.process.wait(120) == 1, process.log()[-3000:]
        log = process.log()
        assert f"the embedded worker could not load model {weights}" in log
        assert "embedded-worker raised" in log and "exiting with status 1" in log
    finally:
        process.stop()


def test_corrupt_webhook_data_kills_the_delivery_loop_which_is_restarted(
    redis_server, tmp_path: Path
) -> None:
    """A delivery whose attempt counter is not a number makes the loop's claim raise ValueError
    (not a Redis error: nothing catches it). The loop ends, /healthz fails (503, saying why) for
    its restart pause, and a fresh loop carries on."""
    queue_name = f"supervise-{uuid.uuid4().hex[:8]}"
    api = Api("service.api", {"REDIS_URL": redis_server.url, "QUEUE_NAME": queue_name}, tmp_path)
    client = redis.Redis.from_url(redis_server.url)
    keys = QueueKeys(queue_name)
    try:
        assert httpx.get(api.health_url + "/healthz", timeout=5).status_code == 200
        client.hset(keys.webhook("poisoned"), mapping={"url": "https://8.8.8.8/", "event": "job.completed"})
        client.hset(keys.webhook("poisoned"), "attempts", "not a number")
        client.zadd(keys.webhooks_due, {"poisoned": 0})
        failing = wait_until(
            lambda: (reply := httpx.get(api.health_url + "/healthz", timeout=5)).status_code == 503 and reply,
            10,
            "/healthz to fail",
            interval_s=0.02,
        )
        assert failing.json()["detail"]["problems"] == [
            "webhook-dispatcher raised ValueError: invalid literal for int() with base 10: b'not a number'; "
            "restarting"
        ]
        assert httpx.get(api.url + "/healthz", timeout=5).status_code == 503  # the API's port says so too
        client.delete(keys.webhook("poisoned"), keys.webhooks_due)
        wait_until(
            lambda: httpx.get(api.health_url + "/healthz", timeout=5).status_code == 200, 10, "/healthz back"
        )
        tasks = httpx.get(api.health_url + "/healthz", timeout=5).json()["detail"]["tasks"]
        assert (
            tasks["webhook-dispatcher"]["state"] == "running" and tasks["webhook-dispatcher"]["restarts"] >= 1
        )
        assert "background task webhook-dispatcher raised ValueError" in api.process.log()
        assert api.process.alive()
    finally:
        client.delete(keys.webhook("poisoned"), keys.webhooks_due)
        client.close()
        api.process.stop()
