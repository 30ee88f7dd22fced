"""Fault run: Redis (AOF, its own port), the API and two workers on one host; SIGKILL a worker
mid-batch, then SIGKILL Redis with jobs queued and restart it; count the accepted jobs that were
lost. Prints one JSON summary line and exits 0 only when no accepted job was lost.

    .venv/bin/python tests/service/fault_script.py [--photo PATH] [--logs DIR]

Run in CI by tests/service/test_fault_script.py.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
from service_processes import REPO_ROOT, Api, RedisServer, WorkerProcess, wait_until

from service.queue.keys import QueueKeys

PHOTO = REPO_ROOT.parent / "shared" / "fixtures" / "dreambench" / "cat.jpg"
# About a second per job on the tiny model with one CPU thread: long enough to kill a worker mid-batch.
SLOW = {"width": 256, "height": 256, "num_inference_steps": 16, "mask_reused_step": 1}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}
TERMINAL = {"done", "failed", "cancelled", "expired"}


def submit(client: httpx.Client, photo_b64: str, seed: int, params: dict) -> str | None:
    """The job id when the API accepted the job (202), None when it refused it (503 while Redis is down)."""
    body = {"prompt": "a cat in the snow", "subjects": [{"image": photo_b64, "target": "cat"}], "seed": seed}
    reply = client.post("/jobs", json=body | params)
    if reply.status_code == 202:
        return reply.json()["id"]
    if reply.status_code in (429, 503):
        return None
    raise RuntimeError(f"unexpected reply {reply.status_code}: {reply.text[:500]}")


def states(client: httpx.Client, job_ids: list[str]) -> dict[str, str]:
    found = {}
    for job_id in job_ids:
        reply = client.get(f"/jobs/{job_id}")
        found[job_id] = reply.json()["status"] if reply.status_code == 200 else f"http {reply.status_code}"
    return found


def run(photo: Path, log_dir: Path) -> dict:
    started = time.monotonic()
    photo_b64 = base64.b64encode(photo.read_bytes()).decode()
    server = RedisServer(log_dir / "redis")
    server.directory.mkdir(exist_ok=True)
    server.start()
    env = {
        "REDIS_URL": server.url,
        "QUEUE_NAME": f"fault-{uuid.uuid4().hex[:8]}",
        "HEARTBEAT_S": "0.3",
        "RECLAIM_IDLE_S": "1.5",
        "MAX_BATCH": "2",
        "BATCH_WINDOW_MS": "200",
        "JOB_TIMEOUT_S": "300",
    }
    workers = [WorkerProcess(f"fault-{index}", env, log_dir) for index in (1, 2)]
    api = Api("service.api", env, log_dir)
    accepted: list[str] = []
    summary: dict = {}
    try:
        api.wait_ready_workers(2, timeout_s=120)
        with api.client() as client:
            accepted += [job_id for seed in range(4) if (job_id := submit(client, photo_b64, seed, SLOW))]
            running = wait_until(
                lambda: next((s for s in states(client, accepted).items() if s[1] == "running"), None),
                60,
                "a running job",
                interval_s=0.05,
            )
            victim_id = client.get(f"/jobs/{running[0]}").json()["worker"]
            victim = next(worker for worker in workers if worker.worker_id == victim_id)
            victim.kill()  # mid-batch
            summary["worker_killed_mid_batch"] = victim_id

            accepted += [
                job_id for seed in range(4, 12) if (job_id := submit(client, photo_b64, seed, SMALL))
            ]
            store = redis.Redis.from_url(server.url)
            stream = QueueKeys(env["QUEUE_NAME"]).stream
            summary["queued_at_redis_crash"] = (
                store.xlen(stream) - store.xpending(stream, "workers")["pending"]
            )
            store.close()
            server.kill()  # SIGKILL with jobs queued: only what the AOF holds survives
            refused = [submit(client, photo_b64, 99, SMALL) for _ in range(3)]
            summary["refused_while_redis_down"] = sum(job_id is None for job_id in refused)
            accepted += [job_id for job_id in refused if job_id]
            server.start()

            final = wait_until(
                lambda: (
                    (found := states(client, accepted))
                    and all(s in TERMINAL for s in found.values())
                    and found
                ),
                120,
                "every accepted job to finish",
                interval_s=0.2,
            )
    except TimeoutError as error:
        with httpx.Client(base_url=api.url, timeout=10) as client:
            final = states(client, accepted)
        summary["timeout"] = str(error).splitlines()[0]
    finally:
        for worker in workers:
            if worker.alive():
                worker.stop()
        api.process.stop()
        server.stop()
    summary |= {
        "accepted": len(accepted),
        "done": sum(state == "done" for state in final.values()),
        "lost": sorted(job_id for job_id, state in final.items() if state not in TERMINAL),
        "not_done": {job_id: state for job_id, state in final.items() if state != "done"},
        "seconds": round(time.monotonic() - started, 1),
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=PHOTO, help="reference photo of a cat")
    parser.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = args.logs or Path(scratch)
        log_dir.mkdir(parents=True, exist_ok=True)
        summary = run(args.photo, log_dir)
    print(json.dumps(summary))
    sys.exit(0 if not summary["lost"] and not summary["not_done"] and summary["accepted"] else 1)


if __name__ == "__main__":
    main()
