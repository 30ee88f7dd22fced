"""Cost of REDIS_ACK_REPLICAS=1 (`WAIT 1 <ms>` after each accepted job) on a Sentinel setup on
loopback (a primary, a replica, three sentinels): submit latency with and without the replica's
acknowledgement, interleaved rounds in one run, for small and large payloads.

    .venv/bin/python benchmarks/redis_ack.py [--jobs 200] [--out benchmarks/results/redis_ack]

CPU loopback: only the ratio and the added milliseconds are meaningful, not production times
(a real replica adds its network round trip to every acknowledged submit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "service")]

from redis_topologies import SentinelSetup  # noqa: E402
from test_queue_contract import spec_with_image  # noqa: E402

from service.queue import create_queue  # noqa: E402
from service.settings import Settings  # noqa: E402

PAYLOADS = {"20 KB": 20_000, "2 MB": 2_000_000}


async def submit_times(url: str, ack: int, size: int, jobs: int) -> list[float]:
    config = Settings(
        redis_url=url,
        queue_name=f"ack-{uuid.uuid4().hex[:8]}",
        queue_max_depth=jobs + 1,
        queue_max_bytes=(size + 4096) * (jobs + 1),
        redis_ack_replicas=ack,
        redis_ack_timeout_ms=1000,
    )
    queue = create_queue(config)
    times = []
    try:
        specs = [spec_with_image(size) for _ in range(jobs)]
        await queue.submit(spec_with_image(size))  # connection and script load outside the timing
        for spec in specs:
            started = time.perf_counter()
            await queue.submit(spec)
            times.append(time.perf_counter() - started)
    finally:
        await queue.close()
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="submits per payload, setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "redis_ack")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        setup = SentinelSetup(Path(scratch))
        setup.start()
        try:
            for label, size in PAYLOADS.items():
                jobs = args.jobs if size < 10**6 else max(args.jobs // 8, 10)
                times: dict[int, list[float]] = {0: [], 1: []}
                for _round in range(args.rounds):
                    for ack in (0, 1):  # interleaved, so load changes hit both alike
                        times[ack] += asyncio.run(submit_times(setup.url, ack, size, jobs))
                plain, acked = summary(times[0]), summary(times[1])
                results[label] = {
                    "submits_per_setting": len(times[0]),
                    "no_wait": plain,
                    "wait_1_replica": acked,
                    "median_ratio": round(acked["median_ms"] / plain["median_ms"], 2),
                    "median_added_ms": round(acked["median_ms"] - plain["median_ms"], 3),
                }
        finally:
            setup.stop()
    report = {
        "benchmark": "redis_ack",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": "Sentinel on loopback: primary + 1 replica (no persistence) + 3 sentinels; one client, "
        f"sequential submits; CPU host with {os.cpu_count()} cores, shared",
        "results": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Cost of REDIS_ACK_REPLICAS=1 (WAIT 1 after each accepted job)",
        "",
        f"{report['date']}, `benchmarks/redis_ack.py`, one run. {report['setup']}.",
        "Loopback: read the ratio and the added milliseconds, not absolute times.",
        "",
        "| payload | submits | median no WAIT | median WAIT 1 | ratio | added | p99 no WAIT | p99 WAIT 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in results.items():
        lines.append(
            f"| {label} | {row['submits_per_setting']} | {row['no_wait']['median_ms']} ms | "
            f"{row['wait_1_replica']['median_ms']} ms | {row['median_ratio']}x | "
            f"{row['median_added_ms']} ms | "
            f"{row['no_wait']['p99_ms']} ms | {row['wait_1_replica']['p99_ms']} ms |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
