"""Compute deadline and progress-based liveness of a worker, with real processes (Redis, the API,
workers on the tiny model). A step that outlasts its compute deadline is treated as hung: here a
real step made slower than a deliberately tiny deadline, which the worker cannot tell from a hang."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from service_processes import Api, WorkerProcess, wait_until
from test_service_faults import cat_body, job_status, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# About 2 s on the tiny model with one CPU thread (steps of one row, a UNet pass every ~0.05 s).
LONG = {"width": 512, "height": 512, "num_inference_steps": 12, "mask_reused_step": 1}


def test_a_batch_past_its_compute_deadline_is_released_and_completed_by_another_worker(
    redis_server, cat_b64: str, tmp_path: Path
) -> None:
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"deadline-{uuid.uuid4().hex[:8]}",
        "HEARTBEAT_S": "0.3",
    }
    hung = WorkerProcess(
        "hung", env | {"COMPUTE_DEADLINE_S": "0.1", "COMPUTE_S_PER_IMAGE_STEP": "0"}, tmp_path
    )
    api = Api("service.api", env, tmp_path)
    rescuer = None
    try:
        api.wait_ready_workers(1)
        with api.client() as client:
            reply = client.post("/jobs", json=cat_body(cat_b64, **LONG))
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["id"]
            wait_status(client, job_id, {"running"}, 60)
            started = time.monotonic()
            assert hung.process.wait(60) == 3, hung.log()[-3000:]
            exited_after_s = time.monotonic() - started
            assert "released them to other workers" in hung.log()
            # Released, not lost: queued again for whoever comes next.
            assert job_status(client, job_id)["status"] == "queued"
            rescuer = WorkerProcess("rescuer", env, tmp_path)
            done = wait_status(client, job_id, {"done", "failed"}, 120)
        assert done["status"] == "done" and done["worker"] == "rescuer", done
        # Abandoned at its first step's 0.1 s deadline, well before the job would have ended (the
        # same job took the rescuer this long to compute, on the same machine).
        assert exited_after_s < done["result"]["timings"]["inference"], (
            exited_after_s,
            done["result"]["timings"],
        )
        assert "compute deadline of 0.1 s" in hung.log()
    finally:
        for worker in (hung, rescuer):
            if worker is not None and worker.alive():
                worker.stop()
        api.process.stop()


def test_liveness_reports_no_progress_between_steps_and_recovers_when_the_batch_ends(
    redis_server, cat_b64: str, tmp_path: Path
) -> None:
    """WORKER_STALL_S below the time of one UNet pass: /healthz answers 503 between two steps of a
    batch and 200 again once the worker is idle; the step counter moves during the batch."""
    env = {"REDIS_URL": redis_server.url, "QUEUE_NAME": f"stall-{uuid.uuid4().hex[:8]}", "HEARTBEAT_S": "0.3"}
    worker = WorkerProcess("stalling", env | {"WORKER_STALL_S": "0.05"}, tmp_path)
    api = Api("service.api", env, tmp_path)
    try:
        api.wait_ready_workers(1)
        health = worker.metrics_url.replace("/metrics", "/healthz")
        assert httpx.get(health, timeout=5).status_code == 200
        steps_before = worker.metric("realcustom_worker_steps_total")
        with api.client() as client:
            job_id = client.post("/jobs", json=cat_body(cat_b64, **LONG)).json()["id"]
            wait_status(client, job_id, {"running"}, 60)
            stalled = wait_until(
                lambda: (reply := httpx.get(health, timeout=5)).status_code == 503 and reply.json(),
                60,
                "a 503 between two steps",
                interval_s=0.02,
            )
            assert stalled["busy"] and stalled["seconds_since_progress"] > 0.05
            assert wait_status(client, job_id, {"done", "failed"}, 120)["status"] == "done"
        wait_until(lambda: httpx.get(health, timeout=5).status_code == 200, 10, "liveness back to 200")
        # 4 steps, one or two UNet passes each.
        assert worker.metric("realcustom_worker_steps_total") - steps_before >= 4
    finally:
        if worker.alive():
            worker.stop()
        api.process.stop()
