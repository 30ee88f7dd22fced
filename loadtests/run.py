"""Run one k6 scenario against the real service on loopback, then stop it.

Starts redis-server (AOF on, in a temporary directory, on a free port), the API
(`python -m service.api`) and N workers (`python -m service.worker`, tiny model on CPU), waits
until every worker reports ready, runs `k6 run loadtests/<scenario>.js`, checks that no accepted
job was lost, writes `<out>/<name>.json` and `<out>/<name>.md`, and stops everything. Exits 0
only when k6's thresholds pass and no job was lost. Everything binds to 127.0.0.1.

    python loadtests/run.py --scenario steady --rate 2 --duration 60s
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOADTESTS = ROOT / "loadtests"
FIXTURES = ROOT / "examples" / "dreambench"
SCENARIOS = ("smoke", "steady", "spike", "soak", "async")
QUEUE_PREFIX = "{realcustom}"  # the queue's keys sit under the hash tag of QUEUE_NAME (service/queue/keys.py)
TERMINAL_STATES = {"done", "failed", "cancelled", "expired"}

logger = logging.getLogger("loadtest")


@dataclass
class Outcome:
    """What the run measured; `passed` = thresholds held and no job was lost."""

    k6_exit_code: int
    lost_jobs: list[str]
    jobs_by_state: dict[str, int]
    summary: dict
    # CPU seconds over the k6 run: the machine's in all, and the service's + k6's. Other work on
    # the machine competes for the same cores; the difference shows how much.
    cpu_machine_s: float
    cpu_ours_s: float

    @property
    def passed(self) -> bool:
        return self.k6_exit_code == 0 and not self.lost_jobs


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, from /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], log_path: Path, stack: ExitStack) -> subprocess.Popen:
    """Start a process in its own session, logging to `log_path`; stopped when `stack` closes."""
    log = stack.enter_context(log_path.open("wb"))
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )
    stack.callback(stop, process)
    return process


def stop(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (workers finish their batch, the API drains), then SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(base_url: str, workers: int, processes: list[subprocess.Popen], timeout_s: float) -> None:
    """Until /readyz counts `workers` ready workers; fail early if a process died."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(process.args)} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:
                last = response.read().decode()
                if json.loads(last)["detail"]["ready_workers"] >= workers:
                    return
        except urllib.error.HTTPError as error:
            last = error.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = str(error)
        time.sleep(0.5)
    raise TimeoutError(f"service not ready after {timeout_s:.0f} s: {last}")


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), "--raw", *args], check=True, capture_output=True, text=True
    ).stdout


def audit_jobs(redis_port: int, settle_s: float) -> tuple[dict[str, int], list[str]]:
    """Every job Redis knows of, by state; `lost` = accepted but not finished after `settle_s`."""
    deadline = time.monotonic() + settle_s
    while True:
        states: dict[str, int] = {}
        unfinished = []
        keys = [key for key in redis_cli(redis_port, "--scan", "--pattern", f"{QUEUE_PREFIX}:job:*").split()]
        for key in keys:
            state = redis_cli(redis_port, "HGET", key, "state").strip()
            states[state] = states.get(state, 0) + 1
            if state not in TERMINAL_STATES:
                unfinished.append(key.removeprefix(f"{QUEUE_PREFIX}:job:"))
        if not unfinished or time.monotonic() > deadline:
            return states, unfinished
        time.sleep(1)


def metric(summary: dict, name: str, field: str, default: float = 0) -> float:
    return summary.get("metrics", {}).get(name, {}).get("values", {}).get(field, default)


def report(args: argparse.Namespace, outcome: Outcome, wall_s: float) -> dict:
    """The run's numbers, flat, for the JSON and Markdown summaries."""
    summary = outcome.summary
    # Latency of an answered request; for the job API, from submission to the fetched image.
    ok = "job_seconds" if args.scenario == "async" else "http_req_duration{name:customize,status:200}"
    # k6's own clock: covers every scenario's stages and the wait for the last answers.
    run_s = summary.get("state", {}).get("testRunDurationMs", 0) / 1000
    accepted = int(metric(summary, "accepted_jobs", "count"))
    return {
        "scenario": args.scenario,
        # Smoke runs closed-loop (2 virtual users), not at a rate.
        "target_rate_per_s": None if args.scenario == "smoke" else args.rate,
        # The spike's shape is fixed in spike.js: 20 s base, 5 s ramp, 20 s at 5x, 5 s down, 30 s base.
        "duration": "80s" if args.scenario == "spike" else args.duration,
        "workers": args.workers,
        "queue_max_depth": args.queue_max_depth,
        "request": {"width": args.size, "height": args.size, "steps": args.steps},
        "machine": {
            "cpus": os.cpu_count(),
            "host": "127.0.0.1 (loopback)",
            "cpu_s_during_k6": {
                "machine": round(outcome.cpu_machine_s, 1),
                "service_and_k6": round(outcome.cpu_ours_s, 1),
                "other_processes": round(outcome.cpu_machine_s - outcome.cpu_ours_s, 1),
            },
            # What one answered request costs the service + k6, whatever else ran beside it.
            "cpu_s_per_200": round(outcome.cpu_ours_s / accepted, 3) if accepted else None,
        },
        "requests": int(metric(summary, "http_reqs", "count")),
        "ok_200": accepted,
        "rejected_429": int(metric(summary, "rejected_429", "passes")),
        "server_errors_5xx": int(metric(summary, "server_errors", "passes")),
        "transport_errors": int(metric(summary, "transport_errors", "passes")),
        "dropped_iterations": int(metric(summary, "dropped_iterations", "count")),
        "bad_images": int(metric(summary, "bad_images", "count")),
        "k6_run_s": round(run_s, 1),
        "throughput_ok_per_s": round(accepted / run_s, 3) if run_s else None,
        "latency_ok_ms": {
            stat: round(metric(summary, ok, key, float("nan")), 1)
            for stat, key in (("p50", "med"), ("p95", "p(95)"), ("p99", "p(99)"), ("max", "max"))
        },
        "inference_s_p50": round(metric(summary, "inference_seconds", "med", float("nan")), 3),
        "jobs_in_redis_by_state": outcome.jobs_by_state,
        "lost_jobs": outcome.lost_jobs,
        "k6_thresholds_passed": outcome.k6_exit_code == 0,
        "passed": outcome.passed,
        "wall_s": round(wall_s, 1),
    }


def markdown(row: dict) -> str:
    """A short Markdown table of one run."""
    latency = row["latency_ok_ms"]
    columns = [
        ("scenario", row["scenario"]),
        ("rate/s", row["target_rate_per_s"] or "-"),
        ("duration", row["duration"]),
        ("requests", row["requests"]),
        ("200", row["ok_200"]),
        ("200/s", row["throughput_ok_per_s"]),
        ("429", row["rejected_429"]),
        ("5xx", row["server_errors_5xx"]),
        ("transport errors", row["transport_errors"]),
        ("dropped iterations", row["dropped_iterations"]),
        ("bad images", row["bad_images"]),
        ("lost jobs", len(row["lost_jobs"])),
        ("p50 ms", latency["p50"]),
        ("p95 ms", latency["p95"]),
        ("p99 ms", latency["p99"]),
        ("passed", "yes" if row["passed"] else "NO"),
    ]
    request = row["request"]
    cpu = row["machine"]["cpu_s_during_k6"]
    return (
        "| " + " | ".join(name for name, _ in columns) + " |\n"
        "|" + "---|" * len(columns) + "\n"
        "| " + " | ".join(str(value) for _, value in columns) + " |\n\n"
        f"{row['workers']} workers, tiny model, {request['width']}x{request['height']}, "
        f"{request['steps']} steps, queue depth {row['queue_max_depth']}, {row['machine']['cpus']} CPUs, "
        f"loopback. Latencies are of the 200 answers. Jobs in Redis after the run, by state: "
        f"{row['jobs_in_redis_by_state']}. CPU during the k6 run ({row['k6_run_s']} s): service + k6 "
        f"{cpu['service_and_k6']} s, other processes on the machine {cpu['other_processes']} s.\n"
    )


def run(args: argparse.Namespace) -> Outcome:
    """Start Redis, workers and the API, run k6, audit the jobs, stop everything."""
    k6 = Path(sys.executable).parent / "k6"
    redis_port, api_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{api_port}"
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loadtest-")))
        logs = Path(args.logs) if args.logs else workdir
        logs.mkdir(parents=True, exist_ok=True)
        redis = start(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(redis_port),
                "--dir",
                str(workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            dict(os.environ),
            logs / "redis.log",
            stack,
        )
        for _ in range(50):
            if (
                subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True).returncode
                == 0
            ):
                break
            time.sleep(0.1)
        env = {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MODEL": "tiny",
            "BACKEND": "eager",
            "DEVICE": "cpu",
            "HOST": "127.0.0.1",
            "PORT": str(api_port),
            "QUEUE_MAX_DEPTH": str(args.queue_max_depth),
            "API_KEYS": "",
            "RATE_LIMIT_PER_MINUTE": "0",
            "LOG_LEVEL": "WARNING",
            # One thread per process: 2 workers, the API and k6 share the machine's cores.
            "OMP_NUM_THREADS": "1",
        }
        processes = [redis]
        for index in range(args.workers):
            worker_env = {**env, "WORKER_ID": f"loadtest-{index}", "WORKER_METRICS_PORT": "0"}
            processes.append(
                start(
                    [sys.executable, "-m", "service.worker"], worker_env, logs / f"worker-{index}.log", stack
                )
            )
        processes.append(start([sys.executable, "-m", "service.api"], env, logs / "api.log", stack))
        wait_ready(base_url, args.workers, processes, args.ready_timeout)
        logger.info("service ready on %s with %d workers; running %s", base_url, args.workers, args.scenario)

        summary_path = workdir / "k6-summary.json"
        k6_env = {
            **os.environ,
            "BASE_URL": base_url,
            "FIXTURES_DIR": str(args.fixtures),
            "SUMMARY_JSON": str(summary_path),
            "RATE": str(args.rate),
            "DURATION": args.duration,
            "WIDTH": str(args.size),
            "HEIGHT": str(args.size),
            "STEPS": str(args.steps),
            "ALLOW_429": "1" if args.allow_429 else "0",
            # Allocating VUs mid-run is slow on a busy machine and shows up as dropped iterations.
            "VUS": str(args.vus),
            "MAX_VUS": str(2 * args.vus),
            "K6_NO_USAGE_REPORT": "true",
        }
        machine_before = machine_cpu_s()
        ours_before = sum(process_cpu_s(process.pid) for process in processes)
        k6_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            k6_run = subprocess.run(
                [str(k6), "run", "--quiet", str(LOADTESTS / f"{args.scenario}.js")],
                env=k6_env,
                cwd=LOADTESTS,
                timeout=args.k6_timeout,
            )
            k6_exit_code = k6_run.returncode
        except subprocess.TimeoutExpired:
            logger.error("k6 ran past %s s and was stopped", args.k6_timeout)
            k6_exit_code = 124
        k6_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        k6_cpu_s = (k6_after.ru_utime + k6_after.ru_stime) - (k6_before.ru_utime + k6_before.ru_stime)
        cpu_ours_s = sum(process_cpu_s(process.pid) for process in processes) - ours_before + k6_cpu_s
        cpu_machine_s = machine_cpu_s() - machine_before
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        states, lost = audit_jobs(redis_port, settle_s=args.settle)
    return Outcome(k6_exit_code, lost, states, summary, cpu_machine_s, cpu_ours_s)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=SCENARIOS, default="smoke")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="arrival rate, requests/s (steady, spike, soak)"
    )
    parser.add_argument("--duration", default="20s", help="k6 duration of the scenario's main phase")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue-max-depth", type=int, default=16, help="QUEUE_MAX_DEPTH of the service")
    parser.add_argument("--size", type=int, default=128, help="width and height of each request")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps of each request")
    parser.add_argument(
        "--vus", type=int, default=32, help="k6 virtual users allocated up front (twice that at most)"
    )
    parser.add_argument("--allow-429", action="store_true", help="overload run: 429 is an expected answer")
    parser.add_argument("--name", help="file name of the summaries (default: scenario and rate)")
    parser.add_argument(
        "--out", default=str(ROOT / "outputs" / "loadtests"), help="directory of the summaries (git-ignored)"
    )
    parser.add_argument("--logs", help="keep the service logs here (default: discarded)")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--k6-timeout", type=float, default=3600.0, help="hard stop of the k6 run, seconds")
    parser.add_argument("--settle", type=float, default=30.0, help="how long unfinished jobs may take to end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.scenario == "spike":
        args.allow_429 = True

    started = time.monotonic()
    outcome = run(args)
    row = report(args, outcome, time.monotonic() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or (args.scenario if args.scenario == "smoke" else f"{args.scenario}-{args.rate:g}rps")
    (out / f"{name}.json").write_text(json.dumps({"result": row, "k6_summary": outcome.summary}, indent=2))
    (out / f"{name}.md").write_text(markdown(row))
    print(markdown(row))
    if outcome.lost_jobs:
        logger.error("%d accepted jobs never finished: %s", len(outcome.lost_jobs), outcome.lost_jobs[:10])
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
