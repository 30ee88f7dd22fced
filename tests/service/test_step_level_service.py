"""Step-level batching through the whole service: real Redis, a real API and real worker processes
on the tiny model. Jobs join a running batch mid-flight and give the image they give alone; a
running job cancelled over HTTP leaves at the next step boundary without disturbing its companions;
a worker SIGKILLed with a running batch of mixed jobs loses none of them and runs none twice."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from service_processes import Api, WorkerProcess, wait_until
from test_service_faults import cat_body, job_status, wait_status

from service.queue.keys import QueueKeys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 256 px on the tiny model: a few tens of ms per step and row with one CPU thread.
SIZE = {"width": 256, "height": 256}
LONG = {**SIZE, "num_inference_steps": 100, "mask_reused_step": 30, "seed": 1}
COMPANION = {**SIZE, "num_inference_steps": 30, "mask_reused_step": 3, "guidance_scale": 5.0, "seed": 2}


def image_of(job: dict, index: int = 0) -> np.ndarray:
    data = base64.b64decode(job["result"]["images"][index])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def assert_same_image(got: np.ndarray, alone: np.ndarray) -> None:
    """The documented batching tolerance: one grey level on a small fraction of the pixels."""
    difference = np.abs(got - alone)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (
        difference.max(),
        (difference > 0).mean(),
    )


class EventLog:
    """Reads a job's SSE stream in a thread: (event, id, data) in arrival order."""

    def __init__(self, base_url: str, job_id: str) -> None:
        self.events: list[tuple[str, str | None, dict]] = []
        self._thread = threading.Thread(target=self._read, args=(base_url, job_id), daemon=True)
        self._thread.start()

    def _read(self, base_url: str, job_id: str) -> None:
        event, event_id, data = "message", None, []
        with httpx.stream("GET", f"{base_url}/jobs/{job_id}/events", timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    self.events.append((event, event_id, json.loads("\n".join(data))))
                    event, event_id, data = "message", None, []

    def wait_closed(self, timeout_s: float) -> list[tuple[str, str | None, dict]]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the event stream did not end"
        return self.events

    def steps(self) -> list[int]:
        return [data["step"] for event, _, data in self.events if event == "progress"]


def test_join_mid_flight_and_cancel_mid_flight(redis_server, cat_b64: str, tmp_path: Path) -> None:
    # LONG costs 6.6 megapixel-steps, past the tiny model's default cap of one request (3.9).
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"steps-{uuid.uuid4().hex[:8]}",
        "MAX_BATCH": "4",
        "MAX_REQUEST_COST": "8",
    }
    worker = WorkerProcess("stepper", env, tmp_path)
    api = Api("service.api", env, tmp_path)
    try:
        api.wait_ready_workers(1)
        with api.client() as client:
            long_id = client.post("/jobs", json=cat_body(cat_b64, **LONG)).json()["id"]
            long_events = EventLog(api.url, long_id)
            wait_until(lambda: len(long_events.steps()) >= 3, 60, "the long job's first steps")
            # The companion joins the running batch mid-flight.
            companion_id = client.post("/jobs", json=cat_body(cat_b64, **COMPANION)).json()["id"]
            companion_events = EventLog(api.url, companion_id)
            wait_until(lambda: companion_events.steps(), 30, "the companion's first step")
            assert job_status(client, long_id)["status"] == "running"

            # Cancel the long job while both run: it leaves at the next step boundary.
            seen = long_events.steps()[-1]
            started = time.monotonic()
            cancelled = client.delete(f"/jobs/{long_id}")
            assert cancelled.status_code in (200, 202), cancelled.text
            final = wait_status(client, long_id, {"cancelled", "done", "failed"}, 30)
            cancel_s = time.monotonic() - started
            assert final["status"] == "cancelled", final
            events = long_events.wait_closed(30)
            assert events[-1][0] == "cancelled"
            steps = long_events.steps()
            assert steps == sorted(steps) and seen <= steps[-1] < LONG["num_inference_steps"]
            assert worker.metric("realcustom_cancelled_running_total") == 1
            # The companion goes on, unaffected, and joined while the long job ran.
            joined = wait_status(client, companion_id, {"done", "failed"}, 60)
            assert joined["status"] == "done", joined
            assert companion_events.wait_closed(30)[-1][0] == "done"
            # Progress of every step up to the last boundary it ran past; `done` says the rest.
            assert companion_events.steps()[-1] == COMPANION["num_inference_steps"] - 1

            # Alone (nothing else runs now), the same request gives the same image.
            alone_id = client.post("/jobs", json=cat_body(cat_b64, **COMPANION)).json()["id"]
            alone = wait_status(client, alone_id, {"done", "failed"}, 60)
        assert_same_image(image_of(joined), image_of(alone))
        assert cancel_s < 10, cancel_s
        assert worker.metric("realcustom_joins_per_step_sum") >= 3
    finally:
        worker.stop()
        api.process.stop()
    assert "Traceback" not in worker.log()


def test_sigkill_with_a_running_batch_of_mixed_jobs_loses_none_and_runs_none_twice(
    redis_server, cat_b64: str, tmp_path: Path
) -> None:
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"steps-kill-{uuid.uuid4().hex[:8]}",
        "MAX_BATCH": "4",
        "HEARTBEAT_S": "0.3",
        "RECLAIM_IDLE_S": "1.5",
        "MAX_REQUEST_COST": "8",  # the two-image job costs 6.6 megapixel-steps (default cap 3.9)
    }
    mixed = [
        {**SIZE, "num_inference_steps": 40, "mask_reused_step": 1, "seed": 11},
        {**SIZE, "num_inference_steps": 60, "mask_reused_step": 20, "guidance_scale": 6.0, "seed": 12},
        {**SIZE, "num_inference_steps": 50, "mask_reused_step": 5, "num_images": 2, "seed": 13},
    ]
    victim = WorkerProcess("victim", env, tmp_path)
    api = Api("service.api", env, tmp_path)
    survivor = None
    try:
        api.wait_ready_workers(1)
        with api.client() as client:
            ids = [client.post("/jobs", json=cat_body(cat_b64, **body)).json()["id"] for body in mixed]
            for job_id in ids:
                wait_status(client, job_id, {"running"}, 60)
            # Marked running during a step, they join at its end: one running batch of mixed jobs.
            wait_until(lambda: victim.metric("realcustom_rows_in_flight") == 4, 30, "all rows to join")
            victim.kill()
            survivor = WorkerProcess("survivor", env, tmp_path)
            finals = [wait_status(client, job_id, {"done", "failed"}, 180) for job_id in ids]
        assert [final["status"] for final in finals] == ["done"] * 3, finals
        assert all(final["worker"] == "survivor" for final in finals)
        assert survivor.metric('realcustom_jobs_finished_total{state="done"}') == 3
        store = redis.Redis.from_url(redis_server.url)
        stream = QueueKeys(env["QUEUE_NAME"]).stream
        assert store.xlen(stream) == 0 and store.xpending(stream, "workers")["pending"] == 0
        store.close()
    finally:
        for worker in (victim, survivor):
            if worker is not None and worker.alive():
                worker.stop()
        api.process.stop()
    assert "Traceback" not in survivor.log()
