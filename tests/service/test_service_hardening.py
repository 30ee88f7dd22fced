"""Issue 11 at the edge, against a real `python -m service.api` (uvicorn) on a private Redis: every
limit at its exact value, a huge bad body while /healthz stays fast, bombs with bounded memory,
ownership, Idempotency-Key mismatches, metrics labels and auth, 500s with an error id, the start-up
guard for open deployments, and local docs assets."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from service_processes import Api, ServiceProcess, free_port, wait_until
from test_hostile_uploads import decoder_pids
from test_service_edge import MAX_IMAGE, b64, body, encode, small_png, start_api

from realcustom.phrases import count_prompt_tokens
from realcustom.tokenizer import load_clip_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory) -> Api:
    queue_name = f"hardening-{uuid.uuid4().hex[:8]}"
    api = start_api(redis_server.url, tmp_path_factory.mktemp("hardening"), {"QUEUE_NAME": queue_name})
    api.queue_name = queue_name  # type: ignore[attr-defined]
    api.redis_url = redis_server.url  # type: ignore[attr-defined]
    yield api
    api.process.stop()


def rss_kib(pid: int, field: str) -> int:
    line = next(
        line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field)
    )
    return int(line.split()[1])


def prompt_of(tokens: int) -> str:
    prompt = "cat " + " ".join(["dog"] * (tokens - 1))
    assert count_prompt_tokens(load_clip_tokenizer(), prompt) == tokens
    return prompt


def image_of_exactly(size: int) -> bytes:
    """A valid PNG padded after its end chunk (decoders stop at IEND) to exactly `size` bytes."""
    data = small_png()
    return data + b"\0" * (size - len(data))


def test_every_limit_at_its_exact_value(api: Api) -> None:
    """`>` vs `>=` on every limit (the API runs with MAX_SIDE=512, MAX_STEPS=50, 4 subjects, 4
    images, MAX_IMAGE_BYTES=400000), and non-square sizes both ways."""
    subject = {"image": b64(small_png()), "target": "cat"}
    accepted = {
        "max side, non-square": body(width=512, height=64),
        "max side, other way": body(width=64, height=512),
        "max steps, mask reused at the last step": body(num_inference_steps=50, mask_reused_step=50),
        "mask_reused_step == steps": body(num_inference_steps=10, mask_reused_step=10),
        "max subjects": body(subjects=[subject] * 4),
        "max images": body(num_images=4),
        "75 prompt tokens": body(prompt=prompt_of(75)),
        "image of exactly the byte limit": body(b64(image_of_exactly(MAX_IMAGE))),
    }
    rejected = {
        "past max side": (body(width=544), 422, "between 64 and 512"),
        "zero width is not the default size": (body(width=0), 422, "positive multiple of 32"),
        "past max steps": (body(num_inference_steps=51, mask_reused_step=1), 422, "at most 50"),
        "mask_reused_step 0 (the pipeline rejects it)": (body(mask_reused_step=0), 422, "at least 1"),
        "past max subjects": (body(subjects=[subject] * 5), 422, "at most 4 subjects"),
        "past max images": (body(num_images=5), 422, "at most 4"),
        "76 prompt tokens": (body(prompt=prompt_of(76)), 422, "at most 75"),
        "image one byte past the limit": (body(b64(image_of_exactly(MAX_IMAGE + 1))), 413, "limit is 400000"),
    }
    failures = []
    with api.client() as client:
        for name, payload in accepted.items():
            reply = client.post("/jobs", json=payload)
            if reply.status_code != 202:
                failures.append(f"{name}: {reply.status_code} {reply.text[:200]}")
            else:
                client.delete(reply.headers["location"])
        for name, (payload, status, message) in rejected.items():
            reply = client.post("/jobs", json=payload)
            if reply.status_code != status or message not in reply.json()["error"]["message"]:
                failures.append(f"{name}: {reply.status_code} {reply.text[:200]}")
    assert not failures, "\n".join(failures)


def test_a_huge_bad_body_keeps_healthz_fast_and_the_reply_small(api: Api) -> None:
    """9.6 MB with 400k bad subjects (it once stalled /healthz 11 s and produced a 49 MB 422)."""
    bad = json.dumps({"prompt": "a cat", "subjects": [{"imag": "", "targt": ""}] * 400_000}).encode()
    assert len(bad) > 9_000_000
    latencies: list[float] = []
    done = threading.Event()
    reply: dict[str, httpx.Response] = {}

    def send() -> None:
        with httpx.Client(base_url=api.url, timeout=120) as client:
            reply["bad"] = client.post("/jobs", content=bad, headers={"content-type": "application/json"})
        done.set()

    with httpx.Client(base_url=api.url, timeout=10) as probe:
        probe.get("/healthz")  # connection open before the clock starts
        sender = threading.Thread(target=send)
        sender.start()
        while not done.is_set():
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.005)
        sender.join()
    assert reply["bad"].status_code == 413, reply["bad"].text[:300]
    assert len(reply["bad"].content) < 1000
    assert latencies and max(latencies) < 0.1, f"slowest /healthz {max(latencies) * 1000:.0f} ms"

    # Bodies small enough to parse still report a bounded number of problems.
    many = body(**{f"unknown_{index}": index for index in range(200)})
    with api.client() as client:
        reply_many = client.post("/jobs", json=many)
        assert reply_many.status_code == 422 and "and 195 more problems" in reply_many.text
        assert len(reply_many.content) < 2000
        deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        nested = client.post("/jobs", content=deep, headers={"content-type": "application/json"})
        assert nested.status_code == 400 and "nested too deeply" in nested.text
    assert "Traceback" not in api.process.log()


def test_bombs_are_decoded_with_bounded_memory(api: Api) -> None:
    """A 25 MP transparent PNG of a few hundred KB (it once took the API to +916 MiB) is accepted,
    decoded in a decoder process growing by about its decoded size while the API itself barely
    grows; a 40 MP palette PNG is refused from its header."""
    rgba_bomb = encode(Image.new("RGBA", (5000, 5000), (255, 0, 0, 0)))
    palette = Image.new("P", (6320, 6320), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette_bomb = encode(palette)
    assert len(rgba_bomb) < 1_000_000 and len(palette_bomb) < 1_000_000
    pids = [api.process.pid, *decoder_pids(api.process.pid)]
    before = {}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before[pid] = rss_kib(pid, "VmRSS")
    with api.client() as client:
        accepted = client.post("/jobs", json=body(b64(rgba_bomb)))
        assert accepted.status_code == 202, accepted.text
        refused = client.post("/jobs", json=body(b64(palette_bomb)))
        assert refused.status_code == 422 and "more than the 25000000 allowed" in refused.text
    growth_mib = {pid: (rss_kib(pid, "VmHWM") - before[pid]) / 1024 for pid in pids}
    api_growth, decoder_growth = growth_mib.pop(api.process.pid), max(growth_mib.values())
    assert api_growth < 60, f"the API grew by {api_growth:.0f} MiB"
    assert 80 < decoder_growth < 100 + 60, f"the decoder grew by {decoder_growth:.0f} MiB"


def test_jobs_belong_to_their_key_and_idempotency_keys_to_their_body(redis_server, tmp_path: Path) -> None:
    api = start_api(redis_server.url, tmp_path, {"API_KEYS": "key-one,key-two"})
    one = {"Authorization": "Bearer key-one"}
    two = {"Authorization": "Bearer key-two"}
    try:
        with api.client() as client:
            created = client.post("/jobs", json=body(), headers=one)
            assert created.status_code == 202
            job = created.headers["location"]
            assert job == created.json()["url"] == f"/jobs/{created.json()['id']}"
            assert client.get(job, headers=two).status_code == 404
            assert client.delete(job, headers=two).status_code == 404
            assert client.get(job, headers=one).json()["status"] == "queued"
            assert client.delete(job, headers=one).json()["status"] == "cancelled"

            keyed = {**one, "Idempotency-Key": "order-7"}
            first = client.post("/jobs", json=body(seed=1), headers=keyed)
            again = client.post("/jobs", json=body(seed=1), headers=keyed)
            assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
            for changed in (body(seed=2), body(prompt="a cat on the moon"), body(width=128, height=128)):
                mismatch = client.post("/jobs", json=changed, headers=keyed)
                assert mismatch.status_code == 422, mismatch.text
                error = mismatch.json()["error"]
                assert error["code"] == "idempotency_key_reused" and first.json()["id"] in error["message"]
            # The same key from another key's caller is another job (scopes do not mix).
            other = client.post("/jobs", json=body(seed=2), headers={**two, "Idempotency-Key": "order-7"})
            assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    finally:
        api.process.stop()


def test_metrics_need_a_key_and_have_bounded_labels(redis_server, tmp_path: Path) -> None:
    api = start_api(redis_server.url, tmp_path, {"API_KEYS": "key-one"})
    key = {"Authorization": "Bearer key-one"}
    try:
        with api.client() as client:
            assert client.get("/metrics").status_code == 401
            assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
            # Non-ASCII token (compare_digest once raised TypeError -> 500).
            non_ascii = client.get("/metrics", headers={"Authorization": "Bearer clé".encode("latin-1")})
            assert non_ascii.status_code == 401
            for method in ("BREW", "PROPFIND", "X-RANDOM-1234"):
                assert client.request(method, "/healthz").status_code == 405
            streamed = client.post(
                "/jobs",
                content=iter([b"x" * 1_000_000] * 4),
                headers={**key, "content-type": "application/json"},
            )
            assert streamed.status_code == 413
            text = client.get("/metrics", headers=key).text
        methods = {
            line.split('method="')[1].split('"')[0] for line in text.splitlines() if 'method="' in line
        }
        assert "other" in methods and not methods - {"GET", "POST", "DELETE", "HEAD", "other"}
        assert 'route="/jobs",status="413"' in text
        assert 'status="500"' not in text
    finally:
        api.process.stop()


def test_internal_errors_reply_with_an_id_never_the_exception_text(api: Api) -> None:
    """A corrupt job record in Redis (say, written by a foreign version) makes GET fail inside."""
    with api.client() as http:
        job_id = http.post("/jobs", json=body()).json()["id"]
        store = redis.Redis.from_url(api.redis_url)
        (key,) = [key for key in store.scan_iter(match=f"*{api.queue_name}*:job:{job_id}")]
        store.hset(key, "meta", "{not json")
        store.close()
        reply = http.get(f"/jobs/{job_id}")
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert (
        error["code"] == "internal_error" and "not json" not in reply.text and "Expecting" not in reply.text
    )
    error_id = error["message"].split()[2].rstrip(";")
    wait_until(lambda: error_id in api.process.log(), 5, "the error id in the log")


def test_a_deployment_that_requires_keys_refuses_to_start_without_them(tmp_path: Path, redis_server) -> None:
    process = ServiceProcess(
        "service.api",
        {"REDIS_URL": redis_server.url, "REQUIRE_API_KEYS": "true", "PORT": str(free_port())},
        tmp_path / "api.log",
    )
    assert process.process.wait(60) == 2
    assert "REQUIRE_API_KEYS is set but API_KEYS is empty" in process.log()
    process.stop()


def test_docs_load_no_third_party_asset(api: Api) -> None:
    with api.client() as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
        assert "http://" not in page.text and "https://" not in page.text
        script = client.get("/docs/assets/swagger-ui-bundle.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert client.get("/docs/assets/swagger-ui.css").status_code == 200


def test_the_default_size_is_the_models_native_size(api: Api) -> None:
    with api.client() as client:
        models = client.get("/v1/models").json()
        assert models["model"] == "tiny" and models["native_size"] == 128
        assert client.get("/readyz").json()["detail"]["native_size"] == 128
        payload = body()
        del payload["width"], payload["height"]
        assert client.post("/jobs", json=payload).status_code == 202


def test_a_body_that_never_arrives_times_out_and_frees_its_slot(redis_server, tmp_path: Path) -> None:
    """A client that announces a body and stalls gets 408 after BODY_TIMEOUT_S; with one intake slot,
    the next request is served after it."""
    api = start_api(redis_server.url, tmp_path, {"BODY_TIMEOUT_S": "1", "INTAKE_CONCURRENCY": "1"})
    try:
        with socket.create_connection(("127.0.0.1", api.port), timeout=30) as stalled:
            stalled.sendall(
                b"POST /jobs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            with api.client() as client:
                queued_behind = client.post("/jobs", json=body())  # waits for the slot
                assert queued_behind.status_code == 202, queued_behind.text
            reply = stalled.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply
    finally:
        api.process.stop()
