"""The running service end to end: real uvicorn API, real Redis, two real worker processes on
the tiny model, concurrent HTTP requests with the DreamBench photos."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_processes import Api, WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}
PROMPTS = {
    "backpack": "a backpack in the jungle",
    "bowl": "a bowl on top of a wooden floor",
    "can": "a can on the beach",
    "cat": "a cat in the snow",
}


@dataclass
class Stack:
    api: Api
    workers: list[WorkerProcess]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("integration")
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"it-{uuid.uuid4().hex[:8]}",
        "HEARTBEAT_S": "0.5",
        "MAX_BATCH": "4",
    }
    workers = [WorkerProcess(f"it-worker-{index}", env, log_dir) for index in (1, 2)]
    api = Api("service.api", env, log_dir)
    try:
        api.wait_ready_workers(2)
        yield Stack(api, workers)
    finally:
        for worker in workers:  # SIGTERM to all first: their shutdowns overlap
            worker.process.terminate()
        for worker in workers:
            assert worker.stop() == 0, worker.log()[-2000:]
        api.process.stop()


def decode(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def request_body(photos_b64: dict[str, str], word: str, **overrides) -> dict:
    return {
        "prompt": PROMPTS[word],
        "subjects": [{"image": photos_b64[word], "target": word}],
        **SMALL,
        **overrides,
    }


def test_concurrent_requests_are_all_answered_by_both_workers(stack: Stack, photos_b64) -> None:
    words = list(PROMPTS) * 4
    bodies = [
        request_body(photos_b64, word, seed=index, return_masks=index % 2 == 0)
        for index, word in enumerate(words)
    ]
    done_before = sum(
        worker.metric('realcustom_jobs_finished_total{state="done"}') for worker in stack.workers
    )

    def send(body: dict) -> httpx.Response:
        with stack.api.client() as client:
            return client.post("/customize", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(send, bodies))

    for body, reply in zip(bodies, replies, strict=True):
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["seed"] == body["seed"]
        [image] = [decode(data) for data in answer["images"]]
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        if body["return_masks"]:
            assert [decode(mask).size for mask in answer["masks"]] == [(64, 64)]
        else:
            assert answer["masks"] is None
        timings = answer["timings"]
        assert 0 <= timings["queue_wait"] <= timings["total"] and 0 < timings["inference"] <= timings["total"]
    per_worker = [worker.metric('realcustom_jobs_finished_total{state="done"}') for worker in stack.workers]
    assert sum(per_worker) - done_before == len(bodies)
    assert all(count > 0 for count in per_worker), per_worker
    # Concurrent jobs shared steps: fewer scheduler steps than the jobs' steps added up.
    steps = sum(worker.metric("realcustom_step_seconds_count") for worker in stack.workers)
    assert steps < len(bodies) * SMALL["num_inference_steps"]


def test_a_seed_reproduces_the_same_image(stack: Stack, photos_b64) -> None:
    """Same seed, same image: bit for bit when run alone (on either worker); batched with other
    jobs, CPU kernels may round a few pixels differently by one level (batch-size dependent
    reductions), nothing more."""
    with stack.api.client() as client:
        first = client.post("/customize", json=request_body(photos_b64, "cat")).json()
        seed = first["seed"]  # chosen by the service and returned
        same = request_body(photos_b64, "cat", seed=seed)
        alone = [client.post("/customize", json=same).json() for _ in range(3)]
    reference = np.asarray(decode(first["images"][0])).astype(int)
    for reply in alone:
        assert reply["seed"] == seed
        assert np.array_equal(np.asarray(decode(reply["images"][0])), reference)

    others = [request_body(photos_b64, word, seed=seed + 1) for word in ("can", "bowl", "backpack")]

    def send(body: dict) -> dict:
        with stack.api.client() as client:
            return client.post("/customize", json=body).json()

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(send, [same, *others, same, *others]))
    for reply in (replies[0], replies[4]):
        difference = np.abs(np.asarray(decode(reply["images"][0])).astype(int) - reference)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.001
    other_job = np.asarray(decode(replies[1]["images"][0])).astype(int)
    assert np.abs(other_job - reference).mean() > 5


def test_async_jobs_idempotency_raw_png_multipart_and_formats(
    stack: Stack, photos_b64, dreambench_dir: Path
) -> None:
    body = request_body(photos_b64, "can", num_images=2, output_format="webp", seed=5)
    with stack.api.client() as client:
        accepted = client.post("/jobs", json=body, headers={"Idempotency-Key": "can-job"})
        assert accepted.status_code == 202
        job_id = accepted.json()["id"]
        repeated = client.post("/jobs", json=body, headers={"Idempotency-Key": "can-job"})
        assert repeated.status_code == 202 and repeated.json()["id"] == job_id

        def finished() -> dict | None:
            status = client.get(f"/jobs/{job_id}").json()
            return status if status["status"] == "done" else None

        status = wait_until(finished, 30, "the job to finish")
        assert status["worker"].startswith("it-worker-")
        images = [decode(data) for data in status["result"]["images"]]
        assert [(image.format, image.size) for image in images] == [("WEBP", (64, 64))] * 2
        assert client.delete(f"/jobs/{job_id}").status_code == 409  # done jobs cannot be cancelled

        raw = client.post(
            "/customize", json=request_body(photos_b64, "cat", seed=1), headers={"Accept": "image/png"}
        )
        assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(raw.content)).size == (64, 64) and raw.headers["x-seed"] == "1"

        multipart = client.post(
            "/customize",
            files=[("subject_image", ("cat.jpg", (dreambench_dir / "cat.jpg").read_bytes(), "image/jpeg"))],
            data={
                "prompt": "a cat in the snow",
                "subject_target": "cat",
                "seed": "1",
                "output_format": "jpeg",
                **{key: str(value) for key, value in SMALL.items()},
            },
        )
        assert multipart.status_code == 200, multipart.text
        assert decode(multipart.json()["images"][0]).format == "JPEG"


def test_readiness_and_metrics(stack: Stack) -> None:
    with stack.api.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["detail"]["ready_workers"] == 2
        text = client.get("/metrics").text
    assert 'realcustom_http_requests_total{method="POST",route="/customize",status="200"}' in text
    assert "realcustom_http_request_seconds_bucket" in text and "realcustom_queue_depth 0.0" in text
    [held] = [line for line in text.splitlines() if line.startswith("realcustom_queue_bytes ")]
    assert float(held.split()[1]) > 0  # the results of the earlier tests are kept (RESULT_TTL_S)
    worker = stack.workers[0]
    assert worker.metric("realcustom_worker_ready") == 1
    for name in (
        "realcustom_inference_seconds_count",
        "realcustom_queue_wait_seconds_count",
        "realcustom_step_seconds_count",
        "realcustom_time_to_first_step_seconds_count",
        "realcustom_prepare_seconds_count",
    ):
        assert worker.metric(name) > 0, name
    assert worker.metric("realcustom_worker_busy") == 0


def test_all_in_one_process_serves_the_tiny_model_without_redis(tmp_path: Path, photos_b64) -> None:
    """`python -m service` (what `make serve` runs): API, in-process queue and worker together."""
    api = Api("service", {"REDIS_URL": "", "WORKER_METRICS_PORT": "0"}, tmp_path)
    try:
        api.wait_ready_workers(1)
        with api.client() as client:
            # The README's example: fewer steps than the default mask_reused_step is fine.
            readme_example = {
                "prompt": "a cat in the snow",
                "width": 128,
                "height": 128,
                "num_inference_steps": 4,
                "subjects": [{"image": photos_b64["cat"], "target": "cat"}],
                "return_masks": True,
            }
            reply = client.post("/customize", json=readme_example)
            assert reply.status_code == 200, reply.text
            assert decode(reply.json()["images"][0]).size == (128, 128)
            job_id = client.post("/jobs", json=request_body(photos_b64, "can")).json()["id"]
            wait_until(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "done", 30, "the async job")
            assert "realcustom_inference_seconds_count" in client.get("/metrics").text
    finally:
        api.process.stop()  # SIGTERM: uvicorn shuts down gracefully, then re-raises the signal
    log = api.process.log()
    assert "serving the TINY random-weight model" in log and "queue: in-process" in log
    assert "Application shutdown complete" in log and "stopped" in log
