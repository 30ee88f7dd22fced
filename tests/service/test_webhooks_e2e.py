"""Webhooks of the running service: real uvicorn API, real worker, real Redis and a real local
receiver. Signatures checked with the `standardwebhooks` verifier; a receiver down then up and
an API restarted mid-retry still get the webhook once (deduplicated on `webhook-id`)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_processes import Api, WorkerProcess, wait_until
from standardwebhooks import Webhook, WebhookVerificationError
from webhook_receiver import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}
KEYS = ("key-one", "key-two")


@dataclass
class Stack:
    api: Api
    env: dict[str, str]
    log_dir: Path

    def client(self, key: str = KEYS[0]) -> httpx.Client:
        return self.api.client(Authorization=f"Bearer {key}")

    def restart_api(self) -> None:
        self.api.process.kill()
        self.api = Api("service.api", self.env, self.log_dir)


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("webhooks")
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"wh-{uuid.uuid4().hex[:8]}",
        "HEARTBEAT_S": "0.5",
        "API_KEYS": ",".join(KEYS),
        "WEBHOOK_SECRET": "e2e-server-secret-" + "s" * 32,
        "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "WEBHOOK_BACKOFF_S": "0.2",
        "WEBHOOK_BACKOFF_MAX_S": "0.4",
        "WEBHOOK_POLL_S": "0.1",
        "WEBHOOK_MAX_ATTEMPTS": "30",
        "WEBHOOK_CONNECT_TIMEOUT_S": "1",
        "WEBHOOK_TIMEOUT_S": "2",
    }
    worker = WorkerProcess("wh-worker", env, log_dir)
    stack = Stack(Api("service.api", env, log_dir), env, log_dir)
    try:
        stack.api.wait_ready_workers(1)
        yield stack
    finally:
        worker.process.terminate()
        assert worker.stop() == 0, worker.log()[-2000:]
        stack.api.process.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    yield server
    server.stop()


def job_body(cat_b64: str, **webhook) -> dict:
    return {
        "prompt": "a cat in the snow",
        "subjects": [{"image": cat_b64, "target": "cat"}],
        **SMALL,
        **webhook,
    }


def submit(stack: Stack, body: dict, key: str = KEYS[0]) -> str:
    with stack.client(key) as client:
        reply = client.post("/jobs", json=body)
    assert reply.status_code == 202, reply.text
    return reply.json()["id"]


def webhook_status(stack: Stack, job_id: str) -> dict | None:
    with stack.client() as client:
        return client.get(f"/jobs/{job_id}").json().get("webhook")


def secret_of(stack: Stack, key: str) -> str:
    with stack.client(key) as client:
        return client.get("/webhooks/secret").json()["secret"]


def test_completed_job_sends_a_signed_event_with_result_urls(
    stack: Stack, receiver: Receiver, cat_b64
) -> None:
    job_id = submit(stack, job_body(cat_b64, webhook_url=receiver.url))
    quiet_id = submit(stack, job_body(cat_b64, webhook_url=receiver.url, webhook_events=["job.failed"]))
    headers, body = receiver.wait_for(job_id)

    event = Webhook(secret_of(stack, KEYS[0])).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # each API key has its own secret
        Webhook(secret_of(stack, KEYS[1])).verify(body, headers)
    assert headers["webhook-id"] == f"msg_{job_id}" and event["type"] == "job.completed"
    data = event["data"]
    assert (data["id"], data["status"], data["url"]) == (job_id, "done", f"/jobs/{job_id}")
    assert data["images"] == [f"/jobs/{job_id}/images/0"] and data["masks"] is None
    assert b"base64" not in body and len(body) < 1000  # URLs, never image bytes

    with stack.client() as client:
        job = client.get(f"/jobs/{job_id}").json()
        image = client.get(data["images"][0])
        assert image.headers["content-type"] == "image/png"
        assert image.content == base64.b64decode(job["result"]["images"][0])
        assert client.get(f"/jobs/{job_id}/images/1").status_code == 404
    with stack.client(KEYS[1]) as other:
        assert other.get(data["images"][0]).status_code == 404
    wait_until(lambda: webhook_status(stack, job_id)["state"] == "delivered", 10, "the outcome")
    status = webhook_status(stack, job_id)
    assert (status["event"], status["attempts"], status["last_error"]) == ("job.completed", 1, None)

    # The job that wanted only job.failed finished without a webhook.
    with stack.client() as client:
        wait_until(lambda: client.get(f"/jobs/{quiet_id}").json()["status"] == "done", 60, "the job")
    assert webhook_status(stack, quiet_id) is None and receiver.deliveries(quiet_id) == []


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({"webhook_url": "https://10.20.30.40/hook"}, "private, loopback"),
        ({"webhook_url": "https://localhost/hook"}, "resolves to"),
        ({"webhook_url": "https://[fe80::1]/hook"}, "private, loopback"),
        ({"webhook_url": "http://example.com/hook"}, "must be https"),
        ({"webhook_url": "https://example.com/hook", "webhook_events": ["job.done"]}, "webhook_events"),
        ({"webhook_events": ["job.failed"]}, "without webhook_url"),
    ],
)
def test_unsafe_or_invalid_webhooks_are_refused_at_submission(
    stack: Stack, cat_b64, webhook, message
) -> None:
    with stack.client() as client:
        reply = client.post("/jobs", json=job_body(cat_b64, **webhook))
    assert reply.status_code == 422, reply.text
    assert message in reply.json()["error"]["message"]


def test_receiver_down_then_up_gets_the_webhook_once(stack: Stack, cat_b64) -> None:
    receiver = Receiver()  # not listening yet: connections are refused
    job_id = submit(stack, job_body(cat_b64, webhook_url=receiver.url))
    wait_until(lambda: (webhook_status(stack, job_id) or {}).get("attempts", 0) >= 3, 60, "failed attempts")
    status = webhook_status(stack, job_id)
    assert status["state"] == "pending" and "ConnectError" in status["last_error"]
    receiver.start()
    try:
        receiver.wait_for(job_id, 30)
        wait_until(lambda: webhook_status(stack, job_id)["state"] == "delivered", 10, "the outcome")
        assert receiver.distinct() == {f"msg_{job_id}": 1}
        assert len(receiver.requests) == 1
        assert webhook_status(stack, job_id)["attempts"] >= 4
        with stack.client() as client:
            metrics = client.get("/metrics").text
        assert 'realcustom_webhook_deliveries_total{outcome="retried"}' in metrics
        assert 'realcustom_webhook_deliveries_total{outcome="delivered"}' in metrics
    finally:
        receiver.stop()


def test_api_killed_mid_retry_still_delivers(stack: Stack, cat_b64) -> None:
    receiver = Receiver()
    job_id = submit(stack, job_body(cat_b64, webhook_url=receiver.url))
    wait_until(lambda: (webhook_status(stack, job_id) or {}).get("attempts", 0) >= 2, 60, "failed attempts")
    stack.restart_api()  # SIGKILL, then a new process: the delivery is in Redis, not in the API
    receiver.start()
    try:
        receiver.wait_for(job_id, 60)
        wait_until(lambda: webhook_status(stack, job_id)["state"] == "delivered", 10, "the outcome")
        assert receiver.distinct() == {f"msg_{job_id}": 1}
        headers, body = receiver.requests[0]
        assert Webhook(secret_of(stack, KEYS[0])).verify(body, headers)["data"]["status"] == "done"
    finally:
        receiver.stop()


def test_all_in_one_process_sends_webhooks_from_memory(tmp_path: Path, receiver: Receiver, cat_b64) -> None:
    """`make serve` (python -m service, in-process queue): the same webhook, kept in memory."""
    secret = "all-in-one-secret-" + "s" * 32
    env = {"WEBHOOK_SECRET": secret, "WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "WEBHOOK_POLL_S": "0.1"}
    api = Api("service", env, tmp_path)
    try:
        with api.client() as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, 90, "the embedded worker")
            reply = client.post("/jobs", json=job_body(cat_b64, webhook_url=receiver.url))
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["id"]
            headers, body = receiver.wait_for(job_id)
            event = Webhook(client.get("/webhooks/secret").json()["secret"]).verify(body, headers)
            assert event["type"] == "job.completed" and event["data"]["images"] == [
                f"/jobs/{job_id}/images/0"
            ]
            wait_until(
                lambda: client.get(f"/jobs/{job_id}").json()["webhook"]["state"] == "delivered", 10, "outcome"
            )
    finally:
        api.process.stop()


def test_two_api_processes_send_each_webhook_once(stack: Stack, receiver: Receiver, cat_b64) -> None:
    """Both API processes run the delivery loop over the same Redis; leased claims keep them from
    sending one webhook twice."""
    second = Api("service.api", stack.env, stack.log_dir)
    try:
        ids = [submit(stack, job_body(cat_b64, webhook_url=receiver.url, seed=seed)) for seed in range(6)]
        for job_id in ids:
            receiver.wait_for(job_id, 90)
        wait_until(
            lambda: all(webhook_status(stack, job_id)["state"] == "delivered" for job_id in ids),
            10,
            "outcomes",
        )
        assert receiver.distinct() == {f"msg_{job_id}": 1 for job_id in ids}
        assert len(receiver.requests) == len(ids)
    finally:
        second.process.stop()
