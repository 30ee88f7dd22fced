"""The edge end to end on the all-in-one process (`python -m service`: uvicorn, in-process queue,
tiny model on the CPU): non-square sizes to real images of that size, the model's native size when
none is given, content negotiation, the negative prompt, a client that leaves a synchronous call,
and the 504 of a job that is already running."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from service_processes import Api, wait_until

pytestmark = pytest.mark.integration

DEADLINE_S = 3
# About 10 s on the tiny model on one CPU core: three times DEADLINE_S (the quick requests of this
# module take a fraction of a second).
SLOW = {"width": 512, "height": 512, "num_inference_steps": 40, "mask_reused_step": 4}


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Api]:
    api = Api(
        "service",
        # SLOW costs 10.5 megapixel-steps, past the tiny model's default cap of one request (3.9).
        {
            "REDIS_URL": "",
            "WORKER_METRICS_PORT": "0",
            "JOB_TIMEOUT_S": str(DEADLINE_S),
            "MAX_REQUEST_COST": "12",
        },
        tmp_path_factory.mktemp("edge-e2e"),
    )
    api.wait_ready_workers(1)
    yield api
    api.process.stop()


def request(photos_b64: dict[str, str], **overrides) -> dict:
    return {
        "prompt": "a cat in the snow",
        "subjects": [{"image": photos_b64["cat"], "target": "cat"}],
        "num_inference_steps": 2,
        "mask_reused_step": 1,
        **overrides,
    }


def image(data: bytes | str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))


def test_non_square_sizes_make_images_of_that_size(service: Api, photos_b64) -> None:
    with service.client() as client:
        wide = client.post("/customize", json=request(photos_b64, width=128, height=64, return_masks=True))
        assert wide.status_code == 200, wide.text
        assert image(wide.json()["images"][0]).size == (128, 64)
        assert image(wide.json()["masks"][0]).size == (128, 64)
        tall = client.post(
            "/customize",
            data={"prompt": "a cat in the snow", "subject_target": "cat", "width": "64", "height": "96"},
            files=[("subject_image", ("cat.jpg", base64.b64decode(photos_b64["cat"]), "image/jpeg"))],
            headers={"accept": "image/png"},
        )
        assert tall.status_code == 200 and tall.headers["content-type"] == "image/png"
        assert image(tall.content).size == (64, 96)


def test_the_native_size_is_the_default(service: Api, photos_b64) -> None:
    with service.client() as client:
        reply = client.post("/customize", json=request(photos_b64))
        assert reply.status_code == 200, reply.text
        assert image(reply.json()["images"][0]).size == (128, 128)
        assert client.get("/v1/models").json()["native_size"] == 128


def test_accept_chooses_the_reply(service: Api, photos_b64) -> None:
    with service.client() as client:
        jpeg = client.post("/customize", json=request(photos_b64, seed=3), headers={"accept": "image/jpeg"})
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        assert image(jpeg.content).format == "JPEG"
        webp = client.post(
            "/customize", json=request(photos_b64, output_format="webp"), headers={"accept": "image/*"}
        )
        assert webp.headers["content-type"] == "image/webp" and image(webp.content).format == "WEBP"
        masks = client.post(
            "/customize", json=request(photos_b64, return_masks=True), headers={"accept": "image/png"}
        )
        assert masks.status_code == 406 and "masks" in masks.json()["error"]["message"]
        html = client.post("/customize", json=request(photos_b64), headers={"accept": "text/html"})
        assert html.status_code == 406 and "application/json" in html.json()["error"]["message"]
        negative = client.post("/customize", json=request(photos_b64, negative_prompt="blurry, low quality"))
        assert negative.status_code == 200, negative.text


def test_a_client_that_leaves_gets_its_queued_job_cancelled(service: Api, photos_b64) -> None:
    # The busy job fills every row (MAX_BATCH=4) of the running batch its size selects, so a job
    # of that size waits in the queue until rows free up.
    busy_body = {
        "width": 256,
        "height": 256,
        "num_inference_steps": 40,
        "mask_reused_step": 4,
        "num_images": 4,
    }
    with service.client() as client:
        busy = client.post("/jobs", json=request(photos_b64, **busy_body)).json()["id"]
        wait_until(lambda: client.get(f"/jobs/{busy}").json()["status"] == "running", 10, "the slow job")
        waiting = request(photos_b64, seed=11, width=256, height=256)
        key = {"Idempotency-Key": "leaves-early"}
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=service.url, timeout=1.0) as impatient:
            impatient.post("/customize", json=waiting, headers=key)
        # The same key and body name the job the departed client created.
        job = client.post("/jobs", json=waiting, headers=key).json()
        assert job.get("status") == "cancelled", job
        wait_until(lambda: client.get(f"/jobs/{busy}").json()["status"] == "done", 60, "the slow job")
    assert "client left before job" in service.process.log()


def test_a_running_job_past_its_deadline_finishes_and_is_fetched_by_id(service: Api, photos_b64) -> None:
    with service.client() as client:
        reply = client.post("/customize", json=request(photos_b64, **SLOW))
        assert reply.status_code == 504, reply.text
        message = reply.json()["error"]["message"]
        job_id = reply.headers["x-job-id"]
        assert "it is running and will finish" in message and f"GET /jobs/{job_id}" in message
        assert "will not be computed" not in message
        wait_until(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "done", 60, "the job to finish")
        result = client.get(f"/jobs/{job_id}").json()["result"]
        assert image(result["images"][0]).size == (512, 512)


def test_a_repeated_request_answers_with_the_stored_job(service: Api, photos_b64) -> None:
    """Same Idempotency-Key and body: the job accepted first, its image labelled with its format."""
    first_body = request(photos_b64, output_format="webp", seed=5)
    key = {"Idempotency-Key": "stored-format"}
    with service.client() as client:
        job_id = client.post("/jobs", json=first_body, headers=key).json()["id"]
        again = client.post("/customize", json=first_body, headers={**key, "accept": "image/*"})
        assert again.status_code == 200 and again.headers["x-job-id"] == job_id
        assert again.headers["content-type"] == "image/webp" and image(again.content).format == "WEBP"
