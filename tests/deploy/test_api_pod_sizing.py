"""The API pod's memory limit and /tmp size are derived from the settings (docs/DEPLOYMENT.md, "API
pod sizing"). That derivation holds only if a synchronous request that waits for its job keeps
neither its body in memory nor its uploads spooled in /tmp: checked here on a real API process
(uvicorn, a real Redis, no worker so that every job waits), then the formula on every overlay."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from deploy_checks import KUSTOMIZE_TARGETS, ROOT, config, render
from PIL import Image

from service.settings import Settings

MIB = 2**20
FIRST, WAITING = 4, 10
# Measured (benchmarks: this test's numbers before the fix): a waiting JSON request held 1.4x its
# body; now the API's RSS may grow by at most half a body per waiting request.
MAX_GROWTH_PER_WAITING_BODY = 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _spooled_bytes(pid: int, directory: Path) -> int:
    """Bytes of the files the process holds open in `directory` (spooled uploads, unlinked or not)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(directory)):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return total


@pytest.fixture
def api_without_workers(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path, redis.Redis]]:
    assert shutil.which("redis-server"), "redis-server is not installed (apt install redis)"
    redis_port, api_port, spool = _free_port(), _free_port(), tmp_path / "tmp"
    spool.mkdir()
    server = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    env = os.environ | {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PORT": str(api_port),
        "JOB_TIMEOUT_S": "120",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(spool),
    }
    env.pop("API_KEYS", None)
    api = subprocess.Popen(
        [sys.executable, "-m", "service.api"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
            time.sleep(0.2)
        yield base, api, spool, redis.Redis(port=redis_port)
    finally:
        api.terminate()
        server.terminate()
        api.wait(timeout=30)
        server.wait(timeout=10)


def _jpeg(megapixels: float) -> bytes:
    side = int((megapixels * 1e6) ** 0.5)
    noise = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _queued(client: redis.Redis) -> int:
    return sum(client.xlen(key) for key in client.scan_iter(_type="stream") if client.xinfo_groups(key))


async def _while_waiting(base: str, client: redis.Redis, request, measure) -> list:
    """Sends synchronous requests in batches (FIRST, then WAITING more) and measures once each
    batch's jobs are all queued, the earlier requests still waiting; then lets them all go."""
    measured = []
    async with httpx.AsyncClient(base_url=base, timeout=180) as http:
        tasks = []
        for batch in (FIRST, WAITING):
            tasks += [asyncio.create_task(request(http)) for _ in range(batch)]
            deadline = time.monotonic() + 120
            while _queued(client) < len(tasks):
                assert time.monotonic() < deadline, f"only {_queued(client)} of {len(tasks)} jobs queued"
                assert not any(task.done() for task in tasks), [t.result() for t in tasks if t.done()]
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # the last intakes finish their clean-up
            measured.append(measure())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return measured


@pytest.mark.slow
def test_waiting_requests_hold_neither_their_body_nor_their_uploads(api_without_workers) -> None:
    """Per waiting request: the API's RSS with FIRST + WAITING requests waiting, minus with FIRST
    (both after intakes of the same concurrency), over WAITING."""
    base, api, spool, client = api_without_workers
    jpeg = _jpeg(4.5)
    body = json.dumps(
        {
            "prompt": "a cat in the snow",
            "subjects": [{"image": base64.b64encode(jpeg).decode(), "target": "cat"}],
            "width": 128,
            "height": 128,
            "num_inference_steps": 4,
        }
    ).encode()
    form = {"prompt": "a cat in the snow", "subject_target": "cat", "width": "128", "height": "128"}

    def send_json(http):
        return http.post("/customize", content=body, headers={"content-type": "application/json"})

    def send_form(http):
        return http.post("/customize", data=form, files={"subject_image": ("cat.jpg", jpeg, "image/jpeg")})

    few, many = asyncio.run(_while_waiting(base, client, send_json, lambda: _rss_mib(api.pid)))
    per_request = (many - few) / WAITING
    assert per_request < MAX_GROWTH_PER_WAITING_BODY * len(body) / MIB, (per_request, len(body) / MIB)
    # The clients left: the API cancels their queued jobs.
    deadline = time.monotonic() + 60
    while _queued(client):
        assert time.monotonic() < deadline, "jobs of departed clients were not cancelled"
        time.sleep(0.2)
    spooled = asyncio.run(_while_waiting(base, client, send_form, lambda: _spooled_bytes(api.pid, spool)))
    assert spooled == [0, 0], f"uploads still spooled by waiting requests: {spooled} bytes"


# --- the formula, on the rendered manifests -----------------------------------------------------

# Measured: idle API 130-160 MiB (benchmarks/results/api_memory.md). A JSON body under intake is
# held about 3 times: its bytes, the parsed JSON's base64 strings, their decoded bytes. Each of the
# DECODE_CONCURRENCY decoder processes (service/decoders.py) takes ~25 MiB idle, its shared memory
# (up to MAX_IMAGE_BYTES) and, while decoding, the upload and at most DECODE_MAX_BYTES (checked
# from the header; tests/test_decode_bounds.py measures that plan against the real peak).
IDLE_MIB = 160
DECODER_PROCESS_MIB = 48
JSON_COPIES = 3
TOKENIZER_FILES_MIB = 64


def _quantity_mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(value[:-2]) * units[value[-2:]]


def required(settings: Settings) -> tuple[float, float]:
    """(memory MiB, /tmp MiB) one API pod needs at most with these settings."""
    body_mib = settings.max_body_bytes / MIB
    memory = (
        IDLE_MIB
        + settings.intake_concurrency * JSON_COPIES * body_mib
        + settings.decode_concurrency
        * (DECODER_PROCESS_MIB + (settings.decode_max_bytes + 2 * settings.max_image_bytes) / MIB)
    )
    spool = settings.intake_concurrency * body_mib + TOKENIZER_FILES_MIB
    return memory, spool


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_api_pod_fits_its_settings(target: str) -> None:
    docs = render(target)
    (api,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "realcustom-api"]
    pod = api["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    settings = Settings(**{k.lower(): v for k, v in (config(docs, "api") | env).items()})
    memory, spool = required(settings)
    (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert _quantity_mib(container["resources"]["limits"]["memory"]) >= memory, (target, memory)
    assert _quantity_mib(tmp["emptyDir"]["sizeLimit"]) >= spool, (target, spool)
