"""Does storing a subject slow down as subjects pile up? Issue 20 measured the old Redis PUT script
(it summed every stored subject with ZRANGE 0 -1) at 1.5 ms with 2,500 subjects and about 250 ms at
140,000, blocking every queue operation meanwhile. The store now keeps running counters.

Fills a private redis-server (and the in-process store) with N small subjects from N/2 owners,
then times `put` of new subjects at each level: median and p99 of 200 puts, one process, loopback.
Writes benchmarks/results/subject-store-scaling.{json,md}. CPU numbers from a shared VM: compare
the levels of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.queue.memory import InProcessQueue
from service.settings import Settings
from service.subjects.resolve import new_subject
from service.subjects.store import MemorySubjectStore, RedisSubjectStore

RESULTS = Path(__file__).resolve().parent / "results"
TIMED_PUTS = 200


def tiny_photo(index: int) -> Image.Image:
    """A distinct 4x4 image (48 bytes of RGB): the count matters here, not the size."""
    pixels = np.frombuffer(index.to_bytes(8, "little") * 6, dtype=np.uint8).reshape(4, 4, 3)
    return Image.fromarray(pixels.copy())


async def timed_puts(store, start: int) -> list[float]:
    seconds = []
    for index in range(start, start + TIMED_PUTS):
        subject = new_subject(tiny_photo(index), f"owner-{index % 1000}", "v1")
        began = time.perf_counter()
        await store.put(subject)
        seconds.append(time.perf_counter() - began)
    return seconds


async def fill(store, start: int, stop: int) -> None:
    for index in range(start, stop):
        await store.put(new_subject(tiny_photo(index), f"owner-{index % (stop // 2 or 1)}", "v1"))


async def measure(store, levels: list[int]) -> list[dict]:
    rows, held = [], 0
    for level in levels:
        await fill(store, held, level)
        held = level
        seconds = await timed_puts(store, 10**9 + level)
        rows.append(
            {
                "subjects": level,
                "put_p50_ms": round(statistics.median(seconds) * 1000, 3),
                "put_p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return server, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1000,10000,50000", help="subjects held, comma-separated")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    # Room for every level: the budget is not what is measured.
    values = {"queue_max_bytes": 2**31, "subject_max_bytes": 2**30, "subject_ttl_s": 3600}
    report: dict = {"levels": levels, "timed_puts": TIMED_PUTS, "machine": platform.platform()}
    with tempfile.TemporaryDirectory() as scratch:
        server, url = start_redis(Path(scratch))
        try:
            settings = Settings(redis_url=url, queue_name=f"scale-{uuid.uuid4().hex[:8]}", **values)

            async def redis_run() -> list[dict]:
                store = RedisSubjectStore(settings)
                try:
                    return await measure(store, levels)
                finally:
                    await store.close()

            report["redis"] = asyncio.run(redis_run())
        finally:
            server.terminate()
            server.wait()

    async def memory_run() -> list[dict]:
        queue = InProcessQueue(64, values["queue_max_bytes"], 1, 60, 5)
        return await measure(MemorySubjectStore(queue, 3600, values["subject_max_bytes"]), levels)

    report["in_process"] = asyncio.run(memory_run())
    report["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "subject-store-scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Subject store: `put` latency against subjects held",
        "",
        f"{report['date']}, {report['machine']}, `python benchmarks/subject_store_scaling.py`; "
        f"{TIMED_PUTS} timed puts per level, one process, Redis on loopback.",
        "",
        "| store | subjects held | put p50 (ms) | put p99 (ms) |",
        "|---|---|---|---|",
    ]
    for name in ("redis", "in_process"):
        for row in report[name]:
            lines.append(f"| {name} | {row['subjects']} | {row['put_p50_ms']} | {row['put_p99_ms']} |")
    (RESULTS / "subject-store-scaling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
