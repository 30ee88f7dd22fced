"""Fault run: Redis, the API and two workers on one host; SIGKILL a worker mid-batch, then make
Redis fail with jobs queued and running; count the accepted jobs that were lost. Prints one JSON
summary line and exits 0 only when no accepted job was lost. Redis topologies (`--topology`):

- `single`: one redis-server (AOF, fsync always), SIGKILLed and restarted;
- `sentinel`: primary + replica + three sentinels, the primary SIGKILLed and not restarted (the
  sentinels promote the replica; acceptance waits for the replica, REDIS_ACK_REPLICAS=1);
- `cluster`: three masters (AOF), the master of the queue's slot SIGKILLed and restarted.

    .venv/bin/python tests/service/fault_script.py [--topology single] [--photo PATH] [--logs DIR]

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
from redis_topologies import ClusterSetup, SentinelSetup
from service_processes import REPO_ROOT, Api, RedisServer, WorkerProcess, wait_until

from service.queue.connect import connect_sync
from service.queue.keys import QueueKeys

PHOTO = REPO_ROOT / "examples" / "dreambench" / "cat.jpg"
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


class Topology:
    """The Redis of the run, and what "Redis fails" means for it."""

    def __init__(self, kind: str, directory: Path, queue_name: str) -> None:
        self.kind = kind
        self.stream = QueueKeys(queue_name).stream
        directory.mkdir(exist_ok=True)
        if kind == "single":
            self.setup = RedisServer(directory)
        elif kind == "sentinel":
            self.setup = SentinelSetup(directory)
        else:
            self.setup = ClusterSetup(directory, aof=True)
        self.setup.start()
        self.url = self.setup.url
        self._crashed_port = 0

    def env(self) -> dict[str, str]:
        return {"REDIS_ACK_REPLICAS": "1", "REDIS_ACK_TIMEOUT_MS": "2000"} if self.kind == "sentinel" else {}

    def backlog(self) -> tuple[int, int]:
        """(queued, delivered) jobs: stream entries no worker holds yet, and those workers hold (running or
        prefetched)."""
        store = connect_sync(self.url, None)
        try:
            pending = store.xpending(self.stream, "workers")["pending"]
            return store.xlen(self.stream) - pending, pending
        finally:
            store.close()

    def crash(self) -> None:
        if self.kind == "single":
            self.setup.kill()  # SIGKILL: only what the AOF holds survives
        elif self.kind == "sentinel":
            self.setup.kill_primary()  # returns once the replica is the primary
        else:
            self._crashed_port = self.setup.port_of(self.stream)
            self.setup.kill(self._crashed_port)

    def recover(self) -> None:
        if self.kind == "single":
            self.setup.start()
        elif self.kind == "cluster":
            self.setup.restart(self._crashed_port)
            self.setup.wait_ok()

    def stop(self) -> None:
        self.setup.stop()


def run(photo: Path, log_dir: Path, kind: str = "single") -> dict:
    started = time.monotonic()
    photo_b64 = base64.b64encode(photo.read_bytes()).decode()
    queue_name = f"fault-{uuid.uuid4().hex[:8]}"
    topology = Topology(kind, log_dir / "redis", queue_name)
    env = {
        **topology.env(),
        "REDIS_URL": topology.url,
        "QUEUE_NAME": queue_name,
        "HEARTBEAT_S": "0.3",
        "RECLAIM_IDLE_S": "1.5",
        "MAX_BATCH": "2",
        "JOB_TIMEOUT_S": "300",
    }
    workers = [WorkerProcess(f"fault-{index}", env, log_dir) for index in (1, 2)]
    api = Api("service.api", env, log_dir)
    accepted: list[str] = []
    summary: dict = {"topology": kind}
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
            summary["queued_at_redis_crash"], summary["delivered_at_redis_crash"] = topology.backlog()
            topology.crash()
            refused = [submit(client, photo_b64, 99, SMALL) for _ in range(3)]
            summary["refused_while_redis_down"] = sum(job_id is None for job_id in refused)
            accepted += [job_id for job_id in refused if job_id]
            topology.recover()

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
        topology.stop()
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
    parser.add_argument("--topology", choices=("single", "sentinel", "cluster"), default="single")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = args.logs or Path(scratch)
        log_dir.mkdir(parents=True, exist_ok=True)
        summary = run(args.photo, log_dir, args.topology)
    print(json.dumps(summary))
    sys.exit(0 if not summary["lost"] and not summary["not_done"] and summary["accepted"] else 1)


if __name__ == "__main__":
    main()
