"""/healthz latency of other clients while connections hold half-sent request headers.

Starts `python -m service.api` on a Redis (a private redis-server unless --redis-url is given),
measures /healthz on a new connection each time (connect, send, read the reply: a prober's view)
on PORT and on HEALTH_PORT, quiet and with N connections each holding half a request header;
then counts how many of those connections the server closed after its header timeout. For
comparison, the same app under uvicorn's own h11 protocol with the limits the API used before
(`limit_concurrency` = 1000, no header timeout, no health listener). Writes
benchmarks/results/http_flood.{json,md}.

    .venv/bin/python benchmarks/http_flood.py [--connections 1000] [--probes 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HEADER_TIMEOUT_S = 8.0
HALF_HEADER = b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Slow: "
# The API's app under plain uvicorn, as it was served before service/api/http_protocol.py.
PLAIN_UVICORN = """
import uvicorn
from service.api.app import create_app
from service.settings import load_settings
settings = load_settings()
uvicorn.run(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning",
            limit_concurrency=1000, timeout_keep_alive=5, h11_max_incomplete_event_size=16384)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe(port: int) -> tuple[float, int | None]:
    """Seconds for one GET /healthz on a new connection, and its status (None: no reply)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return time.perf_counter() - started, None
            data += chunk
    return time.perf_counter() - started, int(data.split(b" ", 2)[1])


def probes(port: int, count: int) -> dict:
    results = [probe(port) for _ in range(count)]
    ms = sorted(seconds * 1000 for seconds, _status in results)
    statuses = sorted({status for _seconds, status in results}, key=str)
    return {
        "statuses": statuses,
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "max_ms": round(ms[-1], 2),
    }


def wait_up(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the API exited during start-up")
        with contextlib.suppress(OSError):
            if probe(port)[1] == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("the API did not answer /healthz")


def still_open(flood: list[socket.socket]) -> int:
    count = 0
    for sock in flood:
        sock.settimeout(0.01)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            count += 1
        except OSError:
            pass
    return count


def scenario(name: str, command: list[str], env: dict[str, str], connections: int, count: int) -> dict:
    port, health_port = free_port(), free_port()
    env = {**env, "PORT": str(port), "HEALTH_PORT": str(health_port)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    flood: list[socket.socket] = []
    try:
        wait_up(port, process)
        listeners = {"PORT": port}
        with contextlib.suppress(OSError):
            if probe(health_port)[1] == 200:
                listeners["HEALTH_PORT"] = health_port
        result = {"name": name, "quiet": {key: probes(value, count) for key, value in listeners.items()}}
        started = time.monotonic()
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(HALF_HEADER)
            flood.append(sock)
        time.sleep(1.0)  # every one accepted and read: held by the server, not in its backlog
        result["flooded"] = {key: probes(value, count) for key, value in listeners.items()}
        time.sleep(max(0.0, started + HEADER_TIMEOUT_S + 3.0 - time.monotonic()))
        result["flood_still_open_after_s"] = round(time.monotonic() - started, 1)
        result["flood_still_open"] = still_open(flood)
        return result
    finally:
        for sock in flood:
            sock.close()
        process.terminate()
        process.wait(30)


def redis_url(args: argparse.Namespace, directory: Path) -> tuple[str, subprocess.Popen | None]:
    if args.redis_url:
        return args.redis_url, None
    port = free_port()
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return f"redis://127.0.0.1:{port}/0", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        url, server = redis_url(args, Path(directory))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "LOG_LEVEL": "WARNING",
            "REDIS_URL": url,
            "QUEUE_NAME": f"flood-{uuid.uuid4().hex[:8]}",
            "HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        }
        try:
            runs = [
                scenario(
                    "before: plain uvicorn",
                    [sys.executable, "-c", PLAIN_UVICORN],
                    env,
                    args.connections,
                    args.probes,
                ),
                scenario(
                    "service.api", [sys.executable, "-m", "service.api"], env, args.connections, args.probes
                ),
            ]
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
    report = {
        "connections": args.connections,
        "probes": args.probes,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http_flood.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# /healthz of other clients during a flood of half-sent headers",
        "",
        f"`benchmarks/http_flood.py`: {args.connections} connections each holding half a request header; "
        f"{args.probes} probes per cell, each on a new connection; {os.cpu_count()} CPUs "
        "(a shared machine: compare cells of one run). Header timeout of service.api: "
        f"{HEADER_TIMEOUT_S:g} s.",
        "",
        "| server | listener | quiet p50 / max (ms) | flooded: statuses | flooded p50 / p99 / max (ms) "
        "| flood still open after |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        for listener, flooded in run["flooded"].items():
            quiet = run["quiet"][listener]
            lines.append(
                f"| {run['name']} | {listener} | {quiet['p50_ms']} / {quiet['max_ms']} "
                f"| {flooded['statuses']} | {flooded['p50_ms']} / {flooded['p99_ms']} / {flooded['max_ms']} "
                "| "
                f"{run['flood_still_open']} of {args.connections} at {run['flood_still_open_after_s']} s |"
            )
    (RESULTS / "http_flood.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
