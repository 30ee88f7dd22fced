"""The step planner's fairness in virtual time: FIFO vs the planner, no model, no noise.

The CPU serving bench (serving_bench.py --scenario two-tenant) times real steps on a shared machine,
where a step's time grows with its rows and other work moves every number. This simulation keeps
what the policies decide and nothing else: one family of 1, 2 and 4 rows, every step one time
unit whatever its rows, one-row jobs of 4, 8 or 16 steps (the bench's mix), Poisson arrivals of a
heavy tenant at `heavy_ratio` x the light tenant's rate, and a worker that holds each tenant's
oldest 2 x rows jobs (what the tenant-fair queue hands it). It reports, per load, each policy's
light-tenant latency percentiles against the light tenant served alone, the heavy tenant's p99
and the steps both took to serve everything (throughput). Deterministic for a seed.

    python benchmarks/planner_sim.py                         # writes benchmarks/results/planner-sim.{json,md}
    python benchmarks/planner_sim.py --levels 0.9 --steps 20000
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.planner import Boundary, FamilyShape, Planner, RunningRows, WaitingJob

ROWS = 4
SHAPE = FamilyShape.of([1, 2, 4], True)
STEP_COUNTS = (4, 8, 16)
HEAVY, LIGHT = "heavy", "light"


@dataclass
class Job:
    key: int
    tenant: str
    steps: int
    arrival: float
    ready_step: int = 0


def arrivals(load: float, horizon: int, heavy_ratio: float, seed: int) -> list[Job]:
    """Both tenants' jobs in arrival order; `load` of what ROWS rows serve per step."""
    rng = random.Random(seed)
    rate = load * ROWS / statistics.mean(STEP_COUNTS)
    jobs = []
    for tenant, share in ((HEAVY, heavy_ratio / (heavy_ratio + 1)), (LIGHT, 1 / (heavy_ratio + 1))):
        at = 0.0
        while (at := at + rng.expovariate(rate * share)) <= horizon:
            jobs.append(Job(0, tenant, rng.choice(STEP_COUNTS), at))
    jobs.sort(key=lambda job: job.arrival)
    for key, job in enumerate(jobs):
        job.key = key
    return jobs


def serve(jobs: list[Job], policy: str, max_wait: int) -> tuple[dict[str, list[float]], int]:
    """Latencies per tenant (steps from arrival to the end of the job's last step), steps taken."""
    planner = Planner(max_wait)
    waiting: list[Job] = []
    running: dict[int, list] = {}  # key -> [steps left, job]
    latency: dict[str, list[float]] = {HEAVY: [], LIGHT: []}
    pending = list(jobs)
    step = 0
    while pending or waiting or running:
        while pending and pending[0].arrival <= step:
            job = pending.pop(0)
            job.ready_step = step
            waiting.append(job)
        if policy == "fifo":
            while waiting and len(running) < ROWS:
                job = waiting.pop(0)
                running[job.key] = [job.steps, job]
        else:
            held: dict[str, list[Job]] = {}
            for job in waiting:  # what a worker holds: each tenant's oldest 2 x rows jobs
                if len(held.setdefault(job.tenant, [])) < 2 * ROWS:
                    held[job.tenant].append(job)
            boundary = Boundary(
                step,
                tuple(
                    RunningRows(key, "f", 1, left, False, job.tenant) for key, (left, job) in running.items()
                ),
                tuple(
                    WaitingJob(job.key, "f", 1, job.steps, job.ready_step, job.tenant)
                    for mine in held.values()
                    for job in mine
                ),
                {"f": SHAPE},
            )
            joined = {join.key for join in planner.plan(boundary).joins}
            for job in [job for job in waiting if job.key in joined]:
                waiting.remove(job)
                running[job.key] = [job.steps, job]
        step += 1
        for key in list(running):
            running[key][0] -= 1
            if running[key][0] == 0:
                job = running.pop(key)[1]
                latency[job.tenant].append(step - job.arrival)
    return latency, step


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict:
    report = {
        "rows": ROWS,
        "step_counts": STEP_COUNTS,
        "heavy_ratio": args.heavy_ratio,
        "horizon_steps": args.steps,
        "max_wait": args.max_wait,
        "seed": args.seed,
        "levels": [],
    }
    for load in (float(level) for level in args.levels.split(",")):
        jobs = arrivals(load, args.steps, args.heavy_ratio, args.seed)
        alone, _ = serve([job for job in jobs if job.tenant == LIGHT], "fifo", args.max_wait)
        alone_p99 = percentile(alone[LIGHT], 0.99)
        row = {"load": load, "light_jobs": len(alone[LIGHT]), "light_alone_p99": alone_p99}
        for policy in ("fifo", "fair"):
            latency, steps = serve(
                [Job(j.key, j.tenant, j.steps, j.arrival) for j in jobs], policy, args.max_wait
            )
            row[policy] = {
                "light_p50": percentile(latency[LIGHT], 0.5),
                "light_p99": percentile(latency[LIGHT], 0.99),
                "light_p99_vs_alone": percentile(latency[LIGHT], 0.99) / alone_p99,
                "heavy_p99": percentile(latency[HEAVY], 0.99),
                "steps_to_serve_all": steps,
            }
        row["fair_throughput_vs_fifo"] = row["fifo"]["steps_to_serve_all"] / row["fair"]["steps_to_serve_all"]
        report["levels"].append(row)
        print(json.dumps(row), flush=True)
    return report


def markdown(report: dict) -> str:
    lines = [
        "# Planner fairness in virtual time (benchmarks/planner_sim.py)",
        "",
        f"{report['rows']} rows, one-row jobs of {report['step_counts']} steps, every step one time "
        f"unit; heavy tenant at {report['heavy_ratio']:g}x the light tenant's rate; "
        f"{report['horizon_steps']} steps of arrivals; max_wait {report['max_wait']}; seed {report['seed']}. "
        "Latencies in steps.",
        "",
        "| load | policy | light p50 | light p99 | light p99 / alone | heavy p99 | throughput vs FIFO |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["levels"]:
        lines.append(f"| {row['load']:.0%} | light alone | | {row['light_alone_p99']:.1f} | 1.00x | | |")
        for policy in ("fifo", "fair"):
            values = row[policy]
            ratio = "1.000" if policy == "fifo" else f"{row['fair_throughput_vs_fifo']:.3f}"
            lines.append(
                f"| {row['load']:.0%} | {policy} | {values['light_p50']:.1f} | {values['light_p99']:.1f} | "
                f"{values['light_p99_vs_alone']:.2f}x | {values['heavy_p99']:.1f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="0.5,0.7,0.9,1.0,1.1,1.3", help="fractions of the rows' capacity")
    parser.add_argument("--steps", type=int, default=6000, help="steps of arrivals per level")
    parser.add_argument("--heavy-ratio", type=float, default=10.0)
    parser.add_argument("--max-wait", type=int, default=64, help="the planner's starvation bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "planner-sim.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "planner-sim.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
