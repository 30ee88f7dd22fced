"""Service overhead on CPU: end-to-end latency through HTTP + Redis + worker, minus the pipeline's
own time, on the tiny model, at several client concurrencies.

Starts `python -m service.api` and one `python -m service.worker` against a Redis (a private key
prefix, cleaned afterwards), sends DreamBench photos, and writes
benchmarks/service_overhead.{json,md}.

    .venv/bin/python benchmarks/service_overhead.py [--redis-url redis://127.0.0.1:6379/0]

Per request (client side): e2e = reply latency; inference = the job's first denoising step until
its images are decoded; queue_wait = acceptance -> its first step on a worker, of which prepare =
the job's own preparation (text and reference encoding, projector, noise). Reported:
- overhead = e2e - inference (everything that is not the pipeline: HTTP, validation, Redis,
  image decode/encode, preparation, and waiting behind other jobs);
- service_cost = e2e - inference - queue_wait (HTTP, API validation, Redis, result encoding and
  delivery);
- first_step_beyond_prepare = queue_wait - prepare: what acceptance-to-first-step costs beyond the
  job's own encoder time (with one client the worker is idle: the scheduler's own latency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "dreambench"
SUBJECTS = {"cat": "a cat in the snow", "can": "a can on the beach", "backpack": "a backpack in the jungle"}
PARAMS = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}

logger = logging.getLogger("service_overhead")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready")


def bodies() -> list[dict]:
    return [
        {
            "prompt": prompt,
            "subjects": [
                {"image": base64.b64encode((PHOTOS / f"{word}.jpg").read_bytes()).decode(), "target": word}
            ],
            "seed": 0,
            **PARAMS,
        }
        for word, prompt in SUBJECTS.items()
    ]


async def run_level(url: str, concurrency: int, requests: int, payloads: list[dict]) -> dict:
    samples: list[tuple[float, float, float, float]] = []
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in counter:
            started = time.perf_counter()
            reply = await client.post("/customize", json=payloads[index % len(payloads)])
            e2e = time.perf_counter() - started
            reply.raise_for_status()
            timings = reply.json()["timings"]
            samples.append((e2e, timings["inference"], timings["queue_wait"], timings["prepare"]))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    e2e, inference, queue_wait, prepare = (np.array(column) * 1000 for column in zip(*samples, strict=True))

    def percentiles(values: np.ndarray) -> dict[str, float]:
        return {
            "p50": round(float(np.percentile(values, 50)), 1),
            "p99": round(float(np.percentile(values, 99)), 1),
        }

    return {
        "concurrency": concurrency,
        "requests": requests,
        "throughput_rps": round(requests / wall, 1),
        "e2e_ms": percentiles(e2e),
        "inference_ms": percentiles(inference),
        "queue_wait_ms": percentiles(queue_wait),
        "prepare_ms": percentiles(prepare),
        "first_step_beyond_prepare_ms": percentiles(queue_wait - prepare),
        "overhead_ms": percentiles(e2e - inference),
        "service_cost_ms": percentiles(e2e - inference - queue_wait),
        "overhead_share_p50": round(float(np.percentile((e2e - inference) / e2e, 50)), 3),
    }


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        "# Service overhead (CPU, tiny model)",
        "",
        f"Measured {report['date']} on {report['machine']} with `benchmarks/service_overhead.py`: "
        f"one API process, one worker (step-level batching, MAX_BATCH={report['max_batch']}), "
        "Redis Streams, OMP_NUM_THREADS=1, "
        f"{PARAMS['width']}x{PARAMS['height']} px, {PARAMS['num_inference_steps']} steps, DreamBench photos "
        "(767-1282 px JPEGs, decoded by the API and again by the worker). Client, API, worker and Redis "
        "share the "
        f"machine's cores; the 1-minute load average at the end was {report['load_average_1min_at_end']} "
        "(other jobs shared the machine).",
        "",
        "- e2e: client-side latency of `POST /customize`; inference: the job's first step until its "
        "images are decoded.",
        "- queue wait: acceptance until the job's first step (includes prepare: its text and reference "
        "encoding, projector and noise); beyond prepare = queue wait - prepare.",
        "- overhead = e2e - inference (includes waiting behind other jobs); service cost = e2e - inference "
        "- queue_wait (HTTP, validation and decoding in the API, Redis, result encoding and delivery).",
        "",
        "| clients | requests | req/s | e2e p50 / p99 ms | inference p50 / p99 ms | queue wait p50 / p99 ms "
        "| prepare p50 / p99 ms | beyond prepare p50 / p99 ms "
        "| overhead p50 / p99 ms | service cost p50 / p99 ms | overhead share of e2e (p50) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        cells = [
            f"{level[key]['p50']} / {level[key]['p99']}"
            for key in (
                "e2e_ms",
                "inference_ms",
                "queue_wait_ms",
                "prepare_ms",
                "first_step_beyond_prepare_ms",
                "overhead_ms",
                "service_cost_ms",
            )
        ]
        lines.append(
            f"| {level['concurrency']} | {level['requests']} | {level['throughput_rps']} | "
            + " | ".join(cells)
            + f" | {level['overhead_share_p50']:.0%} |"
        )
    lines += [
        "",
        "Reading: with several clients the single CPU worker is saturated, so most of the overhead is "
        "queue wait (jobs waiting for the worker, which more workers or a GPU remove); the service cost "
        "column is what each request pays for the service itself.",
    ]
    gaps = report.get("step_gap_ms", {})
    if gaps:
        described = {"yes": "with jobs joining", "no": "without joins"}
        parts = [
            f"{gap['mean_ms']} ms mean over {gap['steps']} boundaries {described[joined]}"
            for joined, gap in gaps.items()
        ]
        lines += [
            "",
            "Device idle at step boundaries (`realcustom_step_gap_seconds`, all levels together: host time "
            "between two busy steps beyond loading the joining rows): " + "; ".join(parts) + ".",
        ]
    path.write_text("\n".join(lines) + "\n")


def step_gaps(worker_log: Path) -> dict[str, dict[str, float]]:
    """Mean host gap between busy steps (realcustom_step_gap_seconds), with and without joins, from
    the worker's own metrics endpoint (its port is in its log)."""
    match = re.search(r"worker metrics on (http://\S+/metrics)", worker_log.read_text())
    if match is None:
        return {}
    text = httpx.get(match.group(1), timeout=5).text
    values: dict[tuple[str, str], float] = {}
    for name, joined, value in re.findall(
        r'^realcustom_step_gap_seconds_(sum|count)\{joined="(\w+)"\} (\S+)$', text, re.MULTILINE
    ):
        values[name, joined] = float(value)
    return {
        joined: {
            "steps": int(values[("count", joined)]),
            "mean_ms": round(1000 * values[("sum", joined)] / values[("count", joined)], 3),
        }
        for joined in ("yes", "no")
        if values.get(("count", joined))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--levels", default="1,8,32", help="client concurrencies")
    parser.add_argument("--requests-per-client", type=int, default=12)
    parser.add_argument("--min-requests", type=int, default=60)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "service_overhead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "REDIS_URL": args.redis_url,
        "QUEUE_NAME": prefix,
        "PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "LOG_LEVEL": "WARNING",
        "MAX_BATCH": str(args.max_batch),
        "QUEUE_MAX_DEPTH": "1000",
        "WORKER_METRICS_PORT": "0",
    }
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    worker_log = log_dir / f"{prefix}-worker.log"
    processes = [
        start("service.worker", env | {"LOG_LEVEL": "INFO"}, worker_log),
        start("service.api", env, log_dir / f"{prefix}-api.log"),
    ]
    try:
        wait_ready(url)
        payloads = bodies()
        asyncio.run(run_level(url, 4, 16, payloads))  # warm connections and caches
        levels = []
        for concurrency in map(int, args.levels.split(",")):
            requests = max(args.min_requests, concurrency * args.requests_per_client)
            level = asyncio.run(run_level(url, concurrency, requests, payloads))
            logger.info(json.dumps(level))
            levels.append(level)
        gaps = step_gaps(worker_log)
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"CPU only, {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        "model": "tiny",
        "max_batch": args.max_batch,
        "params": PARAMS,
        "levels": levels,
        "step_gap_ms": gaps,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
