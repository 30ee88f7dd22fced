"""Tenants at the API, as a real uvicorn process on a private Redis (no worker: admission is decided
before a job runs): tiers from API keys, the `priority` field in JSON and multipart, the cost cap of
one request, each key's share of the queue and of the subject budget as 429s that name the limit,
their metrics, and the OpenAPI description."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from PIL import Image
from service_processes import Api

from service.queue.keys import QueueKeys

pytestmark = pytest.mark.integration

FREE, PRO, PLAIN = "free-key-1", "pro-key-1", "plain-key-1"
TIERS = {"free": {"priorities": ["batch"], "queue_share": 0.25}, "pro": {"weight": 4}}


def png(seed: int, side: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def body(**overrides) -> dict:
    return {
        "prompt": "a cat in the snow",
        "subjects": [{"image": base64.b64encode(png(0)).decode(), "target": "cat"}],
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "mask_reused_step": 1,
        **overrides,
    }


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory) -> Iterator[Api]:
    subject_size = 48 * 48 * 3 + 64 + 64 + 64  # image, owner hash, feature key, overhead (Subject.size)
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"tenants-{uuid.uuid4().hex[:8]}",
        "API_KEYS": f"{FREE},{PRO},{PLAIN}",
        "API_KEY_TIERS": json.dumps({FREE: "free", PRO: "pro"}),
        "TIERS": json.dumps(TIERS),
        "QUEUE_MAX_DEPTH": "8",
        "MAX_SIDE": "512",
        "MAX_STEPS": "50",
        "SUBJECT_MAX_BYTES": str(4 * subject_size),
        "SUBJECT_KEY_SHARE": "0.5",
    }
    api = Api("service.api", env, tmp_path_factory.mktemp("tenants"))
    api.queue_name = env["QUEUE_NAME"]
    yield api
    api.process.stop()


def job_class(redis_server, api: Api, job_id: str) -> str:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return client.hget(QueueKeys(api.queue_name).job(job_id), "class").decode()
    finally:
        client.close()


def test_priority_follows_the_key_tier_in_json_and_multipart(api: Api, redis_server) -> None:
    with (
        api.client(authorization=f"Bearer {FREE}") as free,
        api.client(authorization=f"Bearer {PLAIN}") as plain,
    ):
        default = plain.post("/jobs", json=body())
        assert (
            default.status_code == 202 and job_class(redis_server, api, default.json()["id"]) == "interactive"
        )
        batch_only = free.post("/jobs", json=body())  # its tier's default: batch
        assert (
            batch_only.status_code == 202 and job_class(redis_server, api, batch_only.json()["id"]) == "batch"
        )
        refused = free.post("/jobs", json=body(priority="interactive"))
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert (error["code"], error["field"]) == ("priority_not_allowed", "priority")
        assert "batch" in error["message"]
        form = {"prompt": "a cat", "subject_target": "cat", "width": "64", "height": "64",
                "num_inference_steps": "2", "mask_reused_step": "1", "priority": "batch"}  # fmt: skip
        multipart = plain.post("/jobs", data=form, files={"subject_image": ("c.png", png(1), "image/png")})
        assert (
            multipart.status_code == 202 and job_class(redis_server, api, multipart.json()["id"]) == "batch"
        )
        wrong = plain.post("/jobs", json=body(priority="urgent"))
        assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "priority"


def test_one_request_over_the_cost_cap_is_refused_with_what_to_change(api: Api) -> None:
    with api.client(authorization=f"Bearer {PLAIN}") as client:
        # The tiny model's default cap: 120 s / 0.5 s x 128^2 pixels = 3.9 megapixel-steps.
        costly = client.post("/jobs", json=body(width=512, height=512, num_inference_steps=50))
        assert costly.status_code == 422
        error = costly.json()["error"]
        assert error["code"] == "request_too_costly" and "13.11 megapixel-steps" in error["message"]
        assert "at most 3.932" in error["message"]


def test_a_key_at_its_queue_share_gets_429_while_another_key_gets_202(api: Api) -> None:
    with api.client(authorization=f"Bearer {FREE}") as free, api.client(authorization=f"Bearer {PRO}") as pro:
        codes = [free.post("/jobs", json=body()).status_code for _ in range(3)]
        assert codes.count(202) <= 2  # 1/4 of 8 jobs (an earlier test may hold one)
        full = free.post("/jobs", json=body())
        assert full.status_code == 429 and full.headers["retry-after"] == "2"
        error = full.json()["error"]
        assert error["code"] == "key_queue_full" and "share of the queue (2)" in error["message"]
        assert pro.post("/jobs", json=body()).status_code == 202
        metrics = pro.get("/metrics").text
    assert (
        'realcustom_admission_refusals_total{priority="batch",reason="key_queue_full",tier="free"}' in metrics
    )
    assert 'realcustom_queue_tier_jobs{tier="free"} 2.0' in metrics
    assert 'realcustom_queue_tier_jobs{tier="pro"} 1.0' in metrics


def test_subject_uploads_past_the_budget_are_429_with_their_code(api: Api) -> None:
    with (
        api.client(authorization=f"Bearer {PLAIN}") as plain,
        api.client(authorization=f"Bearer {PRO}") as pro,
    ):
        for seed in (10, 11):
            assert (
                plain.post("/subjects", files={"image": ("p.png", png(seed), "image/png")}).status_code == 201
            )
        mine = plain.post("/subjects", files={"image": ("p.png", png(12), "image/png")})
        assert mine.status_code == 429 and mine.headers["retry-after"]
        assert mine.json()["error"]["code"] == "key_subjects_full"
        for seed in (13, 14):  # the other half of the budget is another key's room
            assert (
                pro.post("/subjects", files={"image": ("p.png", png(seed), "image/png")}).status_code == 201
            )
        everyone = pro.post("/subjects", json={"image": base64.b64encode(png(15)).decode()})
        assert everyone.status_code == 429 and everyone.json()["error"]["code"] in {
            "subjects_full",
            "key_subjects_full",
        }
        # The connection stays usable: a refusal is an answer, not a dropped request.
        assert plain.get("/healthz").status_code == 200


def test_openapi_documents_priority_for_both_body_types(api: Api) -> None:
    with api.client() as client:
        schema = client.get("/openapi.json").json()
    jobs = schema["paths"]["/jobs"]["post"]
    multipart = jobs["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert "priority" in schema["components"]["schemas"]["JobRequest"]["properties"]
    assert "priority" in multipart and "batch" in json.dumps(multipart["priority"])
    assert "403" in jobs["responses"] and "key_queue_full" in jobs["responses"]["429"]["description"]


def test_tier_settings_are_checked_at_start() -> None:
    from service.settings import Settings

    with pytest.raises(ValueError, match="TIERS does not define"):
        Settings(api_keys=["a"], api_key_tiers={"a": "gold"})
    with pytest.raises(ValueError, match="not in API_KEYS"):
        Settings(api_keys=["a"], api_key_tiers={"b": "default"})
    with pytest.raises(ValueError, match="metric label"):
        Settings(tiers={"Gold Tier": {}})
    with pytest.raises(ValueError, match="could never run"):
        Settings(max_request_cost=10, key_max_inflight_cost=5)


def test_the_models_endpoint_gives_the_cost_cap(api: Api) -> None:
    with api.client(authorization=f"Bearer {PLAIN}") as client:
        limits = client.get("/v1/models").json()
    assert limits["max_request_cost"] == pytest.approx(120 / 0.5 * 128**2 / 1e6)
