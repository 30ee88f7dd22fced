"""Tenants sharing the running service: real uvicorn API, real Redis, a real worker on the tiny model
(one row at a time, so the order in which the queue hands out jobs is what decides). A heavy key at
its queue share leaves room for a light key, whose job finishes while the heavy backlog waits; an
interactive job overtakes queued batch jobs; a key whose webhook receiver never answers does not
delay another key's webhooks."""

from __future__ import annotations

import base64
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_processes import Api, WorkerProcess, wait_until
from webhook_receiver import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# About half a second of the tiny model on one CPU core: slow enough for backlogs to form.
SLOW = {"width": 256, "height": 256, "num_inference_steps": 12, "mask_reused_step": 1}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}
KEYS = ("heavy-key", "light-key", "batch-key", "hook-a-key", "hook-b-key")


class SilentReceiver:
    """Accepts connections and never answers: a webhook receiver that hangs every attempt."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/hook"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self._socket.close()
        for connection in self.held:
            connection.close()


def job_body(photo_b64: str, seed: int, settings: dict, **extra) -> dict:
    return {
        "prompt": "a cat in the snow",
        "subjects": [{"image": photo_b64, "target": "cat"}],
        "seed": seed,
        **settings,
        **extra,
    }


@pytest.fixture(scope="module")
def photo_b64(dreambench_dir: Path) -> str:
    return base64.b64encode((dreambench_dir / "cat.jpg").read_bytes()).decode()


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory) -> Iterator[Api]:
    log_dir = tmp_path_factory.mktemp("tenants")
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"isolation-{uuid.uuid4().hex[:8]}",
        "HEARTBEAT_S": "0.5",
        "API_KEYS": ",".join(KEYS),
        "MAX_BATCH": "1",
        "QUEUE_MAX_DEPTH": "16",  # a key's share: 8 unfinished jobs
        "JOB_TIMEOUT_S": "300",
        "WEBHOOK_SECRET": "tenant-server-secret-" + "s" * 32,
        "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "WEBHOOK_POLL_S": "0.1",
        "WEBHOOK_CONCURRENCY": "2",
        "WEBHOOK_CONCURRENCY_PER_KEY": "1",
        "WEBHOOK_CONNECT_TIMEOUT_S": "2",
        "WEBHOOK_TIMEOUT_S": "30",
    }
    worker = WorkerProcess("tenants-worker", env, log_dir)
    api = Api("service.api", env, log_dir)
    try:
        api.wait_ready_workers(1)
        yield api
    finally:
        api.process.stop()
        worker.stop()


def client(api: Api, key: str) -> httpx.Client:
    return api.client(Authorization=f"Bearer {key}")


def states(http: httpx.Client, job_ids: list[str]) -> dict[str, str]:
    return {job_id: http.get(f"/jobs/{job_id}").json()["status"] for job_id in job_ids}


def wait_done(http: httpx.Client, job_id: str, timeout_s: float = 120) -> float:
    """Waits for the job to be done; returns when that was seen (monotonic)."""
    wait_until(lambda: states(http, [job_id])[job_id] == "done", timeout_s, f"job {job_id}", interval_s=0.05)
    return time.monotonic()


def test_a_light_key_gets_202_and_finishes_while_a_heavy_key_floods(api: Api, photo_b64: str) -> None:
    with client(api, "heavy-key") as heavy, client(api, "light-key") as light:
        flood: list[str] = []
        for seed in range(20):
            reply = heavy.post("/jobs", json=job_body(photo_b64, seed, SLOW))
            if reply.status_code != 202:
                break
            flood.append(reply.json()["id"])
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "key_queue_full"
        assert len(flood) == 8  # its share of the 16-job queue
        mine = light.post("/jobs", json=job_body(photo_b64, 99, SLOW))
        assert mine.status_code == 202  # the heavy key's share leaves room
        wait_done(light, mine.json()["id"])
        heavy_states = states(heavy, flood)
    # FIFO would run all eight heavy jobs first; the fair take puts the light job beside the
    # backlog's head (the worker holds two jobs: the one running and the next).
    done = sum(state == "done" for state in heavy_states.values())
    assert done <= 3, heavy_states
    with client(api, "heavy-key") as heavy:  # let the flood drain before the next test
        for job_id in flood:
            wait_done(heavy, job_id)


def test_an_interactive_job_overtakes_queued_batch_jobs(api: Api, photo_b64: str) -> None:
    with client(api, "batch-key") as batcher, client(api, "light-key") as light:
        batch = [
            batcher.post("/jobs", json=job_body(photo_b64, seed, SLOW, priority="batch")).json()["id"]
            for seed in range(6)
        ]
        urgent = light.post("/jobs", json=job_body(photo_b64, 7, SLOW, priority="interactive")).json()["id"]
        wait_done(light, urgent)
        batch_states = states(batcher, batch)
        assert sum(state == "done" for state in batch_states.values()) <= 3, batch_states
        for job_id in batch:
            wait_done(batcher, job_id)


def test_a_receiver_that_never_answers_delays_only_its_own_keys_webhooks(api: Api, photo_b64: str) -> None:
    silent, receiver = SilentReceiver(), Receiver()
    receiver.start()
    try:
        with client(api, "hook-a-key") as key_a, client(api, "hook-b-key") as key_b:
            for seed in range(4):  # all finish first: their webhooks are due before B's
                reply = key_a.post("/jobs", json=job_body(photo_b64, seed, SMALL, webhook_url=silent.url))
                assert reply.status_code == 202
            job_b = key_b.post("/jobs", json=job_body(photo_b64, 9, SMALL, webhook_url=receiver.url)).json()[
                "id"
            ]
            finished = wait_done(key_b, job_b)
            receiver.wait_for(job_b, timeout_s=20)
            delay_s = time.monotonic() - finished
        # Key A's four deliveries each hang for WEBHOOK_TIMEOUT_S (30 s); with two slots and no
        # per-key cap B's would wait for them. A holds one slot (WEBHOOK_CONCURRENCY_PER_KEY=1).
        assert delay_s < 5.0, delay_s
        assert len(silent.held) == 1  # only one of A's attempts in flight
    finally:
        receiver.stop()
        silent.close()
