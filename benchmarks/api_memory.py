"""Memory of the API process while many clients upload large reference photos at once.

Starts `python -m service.api` on a Redis (a private redis-server unless --redis-url is given),
reads its resident memory idle, then has N clients POST /jobs at the same moment, each with one
20 MP photo, while sampling the RSS of the process and of its decoder processes every 10 ms.
Scenarios: a photo-like JPEG as a multipart upload and as base64 JSON, and a PNG (whose decoder
cannot downscale while decoding).
Writes benchmarks/results/api_memory.{json,md}.

    .venv/bin/python benchmarks/api_memory.py [--clients 20] [--megapixels 20]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "dreambench" / "cat.jpg"
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_S = 0.01


@dataclass
class Scenario:
    name: str
    image_format: str  # JPEG or PNG
    body: str  # multipart or json


SCENARIOS = (
    Scenario("jpeg-multipart", "JPEG", "multipart"),
    Scenario("jpeg-json", "JPEG", "json"),
    Scenario("rgba-png-multipart", "PNG", "multipart"),
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def photo(megapixels: float, image_format: str) -> bytes:
    """A 3:2 image of about `megapixels`. JPEG: photo-like (the DreamBench cat enlarged, with sensor
    noise). PNG: the cat on a flat transparent canvas, few bytes for many pixels (a PNG decoder
    cannot downscale while decoding, so this is the costly case)."""
    width = int((megapixels * 1e6 * 3 / 2) ** 0.5)
    height = int(width * 2 / 3)
    cat = Image.open(CAT).convert("RGB")
    buffer = io.BytesIO()
    if image_format == "PNG":
        canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        canvas.paste(cat, (width // 3, height // 3))
        canvas.save(buffer, format="PNG")
        return buffer.getvalue()
    base = np.asarray(cat.resize((width, height), Image.Resampling.BILINEAR))
    noise = np.random.default_rng(0).normal(0, 3, base.shape)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def children(pid: int) -> list[int]:
    """The API's child processes: its reference decoders (service/decoders.py)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def decoders_mib(pid: int) -> list[float]:
    sizes = []
    for child in children(pid):
        with contextlib.suppress(OSError, RuntimeError):  # a decoder being replaced
            sizes.append(rss_mib(child))
    return sizes


class RedisServer:
    """A private redis-server on a free port (no persistence: the benchmark keeps no data)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt install redis-server) or pass --redis-url")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        _wait(lambda: _redis_answers(self.port), 10, "redis-server")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _redis_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")
    return False


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout_s} s")


class ApiProcess:
    def __init__(self, redis_url: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.api"],
            cwd=ROOT,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "REDIS_URL": redis_url,
                "PORT": str(self.port),
                "QUEUE_NAME": f"api-memory-{uuid.uuid4().hex[:8]}",
                "QUEUE_MAX_DEPTH": "1000",
                "LOG_LEVEL": "WARNING",
                **(env or {}),
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            if self.process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"the API exited:\n{self._log.read().decode(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            return False

        _wait(healthy, 60, "the API")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)
        self._log.close()


def _upload(url: str, scenario: Scenario, data: bytes, encoded: str | None) -> int:
    fields = {"prompt": "a cat in the snow", "num_inference_steps": "2", "mask_reused_step": "1"}
    with httpx.Client(base_url=url, timeout=300) as client:
        if scenario.body == "multipart":
            files = [("subject_image", ("cat", data, f"image/{scenario.image_format.lower()}"))]
            reply = client.post("/jobs", data={**fields, "subject_target": "cat"}, files=files)
        else:
            body = {**fields, "subjects": [{"image": encoded, "target": "cat"}]}
            reply = client.post("/jobs", json=body)
    return reply.status_code


def measure(
    redis_url: str, scenario: Scenario, data: bytes, clients: int, env: dict[str, str] | None = None
) -> dict:
    """Idle and peak RSS of a fresh API while `clients` upload `data` at the same moment."""
    api = ApiProcess(redis_url, env)
    try:
        time.sleep(1.0)  # let start-up settle
        idle = rss_mib(api.process.pid)
        decoders_idle = decoders_mib(api.process.pid)
        peak, decoder_peak, total_peak = idle, max(decoders_idle), idle + sum(decoders_idle)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, decoder_peak, total_peak
            while not stop.is_set():
                api_rss, decoders = rss_mib(api.process.pid), decoders_mib(api.process.pid)
                peak = max(peak, api_rss)
                decoder_peak = max(decoder_peak, *decoders)
                total_peak = max(total_peak, api_rss + sum(decoders))
                time.sleep(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        encoded = base64.b64encode(data).decode() if scenario.body == "json" else None
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(lambda _: _upload(api.url, scenario, data, encoded), range(clients)))
        elapsed = time.perf_counter() - started
        time.sleep(0.5)
        stop.set()
        sampler.join()
        return {
            "scenario": scenario.name,
            "clients": clients,
            "image_bytes": len(data),
            "idle_rss_mib": round(idle, 1),
            "peak_rss_mib": round(peak, 1),
            "after_rss_mib": round(rss_mib(api.process.pid), 1),
            "decoders_idle_mib": [round(size, 1) for size in decoders_idle],
            "decoder_peak_mib": round(decoder_peak, 1),
            "total_peak_mib": round(total_peak, 1),
            "seconds": round(elapsed, 2),
            "statuses": {str(code): statuses.count(code) for code in sorted(set(statuses))},
        }
    finally:
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--megapixels", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "api_memory")
    args = parser.parse_args()
    redis_server = None if args.redis_url else RedisServer()
    redis_url = args.redis_url or redis_server.url
    try:
        images = {fmt: photo(args.megapixels, fmt) for fmt in ("JPEG", "PNG")}
        rows = [measure(redis_url, s, images[s.image_format], args.clients) for s in SCENARIOS]
    finally:
        if redis_server is not None:
            redis_server.stop()
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "megapixels": args.megapixels,
        "scenarios": [asdict(s) for s in SCENARIOS],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# API memory under {args.clients} concurrent {args.megapixels:g} MP uploads",
        "",
        f"`benchmarks/api_memory.py` on {report['machine']}; RSS of the `python -m service.api` process "
        "and of its decoder processes (sampled every 10 ms), default settings (INTAKE_CONCURRENCY, "
        "DECODE_CONCURRENCY and their per-key shares: the clients share one address, hence one key).",
        "",
        "| scenario | image bytes | API idle MiB | API peak MiB | API after MiB | decoders idle MiB | "
        "decoder peak MiB | API + decoders peak MiB | seconds | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['scenario']} | {r['image_bytes']} | {r['idle_rss_mib']} | {r['peak_rss_mib']} | "
        f"{r['after_rss_mib']} | {r['decoders_idle_mib']} | {r['decoder_peak_mib']} | "
        f"{r['total_peak_mib']} | {r['seconds']} | {r['statuses']} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
