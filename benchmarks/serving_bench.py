"""Request-level vs step-level batching under open-loop Poisson arrivals, one process, on the CPU.

Both policies serve the same arrivals (seeded) with the same step function on the same bucket
(`GraphLoop` with `EagerCapture`: the step CUDA graphs capture, run eagerly):

* request-level (the worker before step-level batching): when idle, take the oldest waiting
  request and every waiting request with the same loop settings (step count, mask-reuse step) up
  to the bucket's rows, run their loop to the end in the smallest bucket that holds them (1..rows
  are prepared), repeat;
* step-level (`engines.step_batching.RunningBatch`): at every step boundary finished rows leave and
  waiting requests join free rows, whatever their step count and mask-reuse step.

The mix: step counts 4, 8, 16 and mask-reuse steps 1, 2, 3 (independent, uniform), one subject.
Conditioning (text, reference encoding, projector) is prepared before the run for both policies,
so the comparison isolates the batching policy. Capacity = the bucket's rows / (mean steps × time
of one full-bucket step), measured first; each load level is a fraction of it. Reported per policy
and level: throughput, latency p50/p99, queue wait p99 (arrival to first step), time to first
step p50. Writes benchmarks/results/serving-bench.{json,md}. Times are CPU times of a toy model on
a shared machine: compare the two policies within one run, not across runs.

Scenario `two-tenant` (--scenario two-tenant): two tenants share the step-level batch, a heavy one
at --heavy-ratio (10) x the light one's rate, each level a share of capacity in all; the same
seeded arrivals are served FIFO (arrival order) and fair (the step planner, engines/planner.py:
weighted fair queuing by cost, `RunningBatch.apply` as executor), and the light tenant's arrivals
alone (twice: stepping the smallest bucket that holds its rows, and every step at the full bucket's
cost, which is what a GPU step costs whatever its rows). Reported per level: each tenant's latency
p50/p99, the light tenant's p99 over its p99 alone, throughput, Jain's index of served cost (cost
served within the arrival window over each tenant's max-min fair share), and a PNG of latency
against load. Writes benchmarks/results/serving-bench-tenants.{json,md,png}.

    python benchmarks/serving_bench.py --size 256 --duration 60   # docs/PERFORMANCE.md's run
    python benchmarks/serving_bench.py --duration 5 --levels 0.5   # quick look
    python benchmarks/serving_bench.py --scenario two-tenant --duration 20 --levels 0.5,0.7,0.9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from engines.backends import EagerBackend
from engines.graph_loop import EagerCapture, GraphLoop
from engines.planner import Boundary, Planner, RunningRows, WaitingJob
from engines.runner import Runner
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import RowRequest, RunningBatch
from realcustom.cost import generation_cost
from realcustom.denoise import LoopSettings
from realcustom.job_inputs import job_conditioning
from realcustom.jobs import GenerationJob, SubjectInput
from realcustom.loading import load_pipeline
from realcustom.step import Conditioning

STEP_COUNTS = (4, 8, 16)
MASK_REUSE_STEPS = (1, 2, 3)
PROMPTS = ("a photo of a dog on the beach", "a dog in the snow", "a dog on a sofa")


@dataclass
class Arrival:
    at: float  # seconds after the start
    request: RowRequest
    first_step: float | None = None
    finished: float | None = None
    tenant: str = ""
    cost: float = 0.0  # realcustom.cost.generation_cost of the request


@dataclass
class Timeline:
    arrivals: list[Arrival]
    waiting: list[Arrival] = field(default_factory=list)
    next_index: int = 0

    def admit(self, now: float) -> None:
        while self.next_index < len(self.arrivals) and self.arrivals[self.next_index].at <= now:
            self.waiting.append(self.arrivals[self.next_index])
            self.next_index += 1

    @property
    def done(self) -> bool:
        return self.next_index == len(self.arrivals) and not self.waiting

    def idle_until_next(self, start: float) -> None:
        if not self.waiting and self.next_index < len(self.arrivals):
            time.sleep(max(0.0, self.arrivals[self.next_index].at - (time.perf_counter() - start)))


def prepared_requests(pipeline, count: int, size: int, seed: int, first: int = 0) -> list[RowRequest]:
    """`count` requests of the mix, conditioning computed once (shared by both policies)."""
    chooser = random.Random(seed)
    runner = Runner(pipeline, EagerBackend(pipeline), pipeline.name)
    photo = SubjectInput(Image.new("RGB", (96, 96), (150, 140, 130)), "dog")
    requests = []
    for index in range(first, first + count):
        steps, reuse = chooser.choice(STEP_COUNTS), chooser.choice(MASK_REUSE_STEPS)
        job = GenerationJob(
            id=str(index),
            prompt=chooser.choice(PROMPTS),
            subjects=(photo,),
            width=size,
            height=size,
            num_inference_steps=steps,
            mask_reused_step=reuse,
            seed=index,
        )
        cond = job_conditioning(runner.pipeline, [job])
        latents = pipeline.prepare_latents([job.seed], [1], size, size)
        requests.append(RowRequest(index, cond, latents, steps, reuse))
    return requests


def poisson_times(rate: float, duration: float, seed: int) -> list[float]:
    chooser, now, times = random.Random(seed), 0.0, []
    while True:
        now += chooser.expovariate(rate)
        if now > duration:
            return times
        times.append(now)


def concatenate(requests: list[RowRequest]) -> tuple[Conditioning, torch.Tensor]:
    first = requests[0].cond
    fields = {
        name: None if getattr(first, name) is None else torch.cat([getattr(r.cond, name) for r in requests])
        for name in vars(first)
    }
    return Conditioning(**fields), torch.cat([r.latents for r in requests])


def serve_request_level(graphs: GraphLoop, timeline: Timeline, rows: int) -> None:
    start = time.perf_counter()
    while not timeline.done:
        timeline.admit(time.perf_counter() - start)
        if not timeline.waiting:
            timeline.idle_until_next(start)
            continue
        head = timeline.waiting[0].request
        key = (head.num_steps, head.mask_reused_step)
        batch = [a for a in timeline.waiting if (a.request.num_steps, a.request.mask_reused_step) == key][
            :rows
        ]
        for arrival in batch:
            timeline.waiting.remove(arrival)
            arrival.first_step = time.perf_counter() - start
        cond, latents = concatenate([a.request for a in batch])
        graphs.denoise(cond, latents, LoopSettings(key[0], "dpm", ("max_norm",), key[1]))
        finished = time.perf_counter() - start
        for arrival in batch:
            arrival.finished = finished


def serve_step_level(batch: RunningBatch, timeline: Timeline) -> None:
    start = time.perf_counter()
    running: dict[object, Arrival] = {}
    while not (timeline.done and not running):
        timeline.admit(time.perf_counter() - start)
        while timeline.waiting and batch.join(timeline.waiting[0].request):
            arrival = timeline.waiting.pop(0)
            arrival.first_step = time.perf_counter() - start
            running[arrival.request.key] = arrival
        if not running:
            timeline.idle_until_next(start)
            continue
        for done in batch.step():
            running.pop(done.key).finished = time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(arrivals: list[Arrival], duration: float) -> dict:
    latency = [a.finished - a.at for a in arrivals]
    wait = [a.first_step - a.at for a in arrivals]
    makespan = max(a.finished for a in arrivals)
    return {
        "requests": len(arrivals),
        "throughput_rps": len(arrivals) / max(makespan, duration),
        "latency_p50_s": percentile(latency, 0.5),
        "latency_p99_s": percentile(latency, 0.99),
        "queue_wait_p99_s": percentile(wait, 0.99),
        "time_to_first_step_p50_s": percentile(wait, 0.5),
    }


def measure_step_time(batch: RunningBatch, requests: list[RowRequest], repeats: int = 6) -> float:
    """Seconds per step with every row busy."""
    for request in requests[: batch.capacity]:
        batch.join(RowRequest(("capacity", request.key), request.cond, request.latents, repeats + 2, 2))
    batch.step()  # warm
    started = time.perf_counter()
    for _ in range(repeats):
        batch.step()
    elapsed = (time.perf_counter() - started) / repeats
    for key in list(batch.active):
        batch.cancel(key)
    return elapsed


# ---- two tenants: FIFO vs fair step planning --------------------------------------------------------

HEAVY, LIGHT = "heavy", "light"


def serve_fair(batch: RunningBatch, timeline: Timeline, planner: Planner) -> None:
    """Step-level batching where the planner (engines/planner.py) decides every boundary: which
    waiting requests join (weighted fair queuing by cost across tenants) and the layout the
    executor (`RunningBatch.apply`) carries out. The worker's path, without the queue."""
    start = time.perf_counter()
    running: dict[object, Arrival] = {}
    ready_at: dict[object, int] = {}
    hold = 2 * batch.capacity
    step = 0
    while not (timeline.done and not running):
        timeline.admit(time.perf_counter() - start)
        for arrival in timeline.waiting:
            ready_at.setdefault(arrival.request.key, step)
        rows = tuple(
            RunningRows(key, "family", count, left, updating, running[key].tenant)
            for key, count, left, updating, _cfg in batch.rows()
        )
        # What a worker holds: each tenant's oldest `hold` requests (the queue's tenant-fair take
        # hands it those; a worker holds 2 x its rows), not the whole backlog.
        heads: dict[str, list[Arrival]] = {}
        for a in timeline.waiting:
            if len(heads.setdefault(a.tenant, [])) < hold:
                heads[a.tenant].append(a)
        waiting = tuple(
            WaitingJob(a.request.key, "family", a.request.rows, a.cost, ready_at[a.request.key], a.tenant)
            for mine in heads.values()
            for a in mine
        )
        plan = planner.plan(Boundary(step, rows, waiting, {"family": batch.shape}))
        joining = {}
        for join in plan.joins:
            arrival = next(a for a in timeline.waiting if a.request.key == join.key)
            timeline.waiting.remove(arrival)
            arrival.first_step = time.perf_counter() - start
            running[join.key] = arrival
            joining[join.key] = arrival.request
        if "family" in plan.layouts:
            batch.apply(plan.layouts["family"], joining)
        if not running:
            timeline.idle_until_next(start)
            continue
        for done in batch.step():
            running.pop(done.key).finished = time.perf_counter() - start
        step += 1


def tenant_arrivals(pipeline, args, load: float, capacity: float, seed: int, tenants=(HEAVY, LIGHT)):
    """Poisson arrivals of both tenants (heavy at `heavy_ratio` x the light rate, `load` of the
    capacity in all), merged in time; the same list (seeded) for every policy."""
    light_rate = load * capacity / (args.heavy_ratio + 1)
    arrivals = []
    for offset, (tenant, rate) in enumerate(((HEAVY, light_rate * args.heavy_ratio), (LIGHT, light_rate))):
        times = poisson_times(rate, args.duration, seed + 10 * offset)
        first = 100_000 * (offset + 1)
        requests = prepared_requests(pipeline, len(times), args.size, seed + 1000 + offset, first=first)
        for at, request in zip(times, requests, strict=True):
            job = SimpleNamespace(
                width=args.size,
                height=args.size,
                num_inference_steps=request.num_steps,
                num_images=1,
                guidance_scale=float(request.cond.guidance_scale[0]),
            )
            arrivals.append(Arrival(at, request, tenant=tenant, cost=generation_cost(job, 1)))
    return sorted((a for a in arrivals if a.tenant in tenants), key=lambda a: a.at)


def fresh(arrivals: list[Arrival]) -> list[Arrival]:
    return [Arrival(a.at, a.request, tenant=a.tenant, cost=a.cost) for a in arrivals]


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one takes everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 1.0


def fair_shares(demand: dict[str, float], supply: float) -> dict[str, float]:
    """Max-min fair shares of `supply` for these demands (equal weights)."""
    shares, left, open_ = {}, supply, sorted(demand, key=demand.get)
    while open_:
        even = left / len(open_)
        tenant = open_[0]
        if demand[tenant] <= even:
            shares[tenant] = demand[tenant]
            left -= demand[tenant]
            open_.pop(0)
        else:
            for tenant in open_:
                shares[tenant] = even
            break
    return shares


def tenant_summary(arrivals: list[Arrival], duration: float, capacity_cost: float) -> dict:
    """Per tenant: latency percentiles and the cost served within the arrival window; all: throughput
    and Jain's index of served cost over each tenant's max-min fair share of what was served."""
    row = {"throughput_rps": len(arrivals) / max(max(a.finished for a in arrivals), duration)}
    served = {}
    demand = {}
    for tenant in (HEAVY, LIGHT):
        mine = [a for a in arrivals if a.tenant == tenant]
        if not mine:
            continue
        latency = [a.finished - a.at for a in mine]
        served[tenant] = sum(a.cost for a in mine if a.finished <= duration)
        demand[tenant] = sum(a.cost for a in mine)
        row[tenant] = {
            "requests": len(mine),
            "latency_p50_s": percentile(latency, 0.5),
            "latency_p99_s": percentile(latency, 0.99),
            "served_cost": served[tenant],
        }
    if len(served) > 1:
        shares = fair_shares(demand, min(capacity_cost, sum(served.values())))
        row["jain_served_cost"] = jain([served[t] / shares[t] for t in served])
    return row


def two_tenants(args, pipeline, batch: RunningBatch, capacity: float, step_s: float) -> dict:
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"CPU ({platform.node()}), torch {torch.__version__}, 1 thread",
        "load_average_at_start": os.getloadavg()[0],
        "model": args.model,
        "size": args.size,
        "rows": args.rows,
        "heavy_ratio": args.heavy_ratio,
        "mix": {"steps": STEP_COUNTS, "mask_reused_step": MASK_REUSE_STEPS},
        "step_s": step_s,
        "capacity_rps": capacity,
        "duration_s": args.duration,
        "levels": [],
    }
    # What the batch can serve in the arrival window, in cost units (megapixel-steps).
    full = RunningBatch(batch.graphs, batch.buckets[-1:], batch.settings)
    supply = capacity * args.duration * args.size * args.size / 1e6 * statistics.mean(STEP_COUNTS)
    for index, load in enumerate(float(x) for x in args.levels.split(",")):
        seed = args.seed + index
        arrivals = tenant_arrivals(pipeline, args, load, capacity, seed)
        row = {"load": load, "rate_rps": load * capacity}
        alone = Timeline(fresh([a for a in arrivals if a.tenant == LIGHT]))
        serve_step_level(batch, alone)
        # The light tenant alone again, every step at the full bucket's cost: on the CPU a step's
        # time grows with its rows, on a GPU it hardly does; this baseline takes that out.
        padded = Timeline(fresh([a for a in arrivals if a.tenant == LIGHT]))
        serve_step_level(full, padded)
        row["light_alone_full_bucket"] = tenant_summary(padded.arrivals, args.duration, supply)
        row["light_alone"] = tenant_summary(alone.arrivals, args.duration, supply)
        for policy in ("fifo", "fair"):
            timeline = Timeline(fresh(arrivals))
            if policy == "fifo":
                serve_step_level(batch, timeline)
            else:
                serve_fair(batch, timeline, Planner(max_wait=args.max_wait))
            row[policy] = tenant_summary(timeline.arrivals, args.duration, supply)
            print(f"load {load:.0%} {policy}: {json.dumps(row[policy])}", flush=True)
        alone_p99 = row["light_alone"][LIGHT]["latency_p99_s"]
        full_p99 = row["light_alone_full_bucket"][LIGHT]["latency_p99_s"]
        for policy in ("fifo", "fair"):
            row[policy]["light_p99_vs_alone"] = row[policy][LIGHT]["latency_p99_s"] / alone_p99
            row[policy]["light_p99_vs_alone_full_bucket"] = row[policy][LIGHT]["latency_p99_s"] / full_p99
        row["fair_throughput_vs_fifo"] = row["fair"]["throughput_rps"] / row["fifo"]["throughput_rps"]
        print(
            f"load {load:.0%}: light p99 vs alone (vs alone at full-bucket cost): "
            f"fifo {row['fifo']['light_p99_vs_alone']:.2f}x "
            f"({row['fifo']['light_p99_vs_alone_full_bucket']:.2f}x), "
            f"fair {row['fair']['light_p99_vs_alone']:.2f}x "
            f"({row['fair']['light_p99_vs_alone_full_bucket']:.2f}x); throughput fair/fifo "
            f"{row['fair_throughput_vs_fifo']:.3f}",
            flush=True,
        )
        report["levels"].append(row)
        write_tenants(report, args.out, args.name)
    report["load_average_at_end"] = os.getloadavg()[0]
    write_tenants(report, args.out, args.name)
    return report


def write_tenants(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Serving bench, two tenants: FIFO vs fair step planning ({report['date']})",
        "",
        f"{report['machine']}; load average {report['load_average_at_start']:.1f} at the start "
        f"(2 cores shared with other work); model {report['model']} {report['size']}², "
        f"bucket of {report['rows']} rows; steps {report['mix']['steps']}; heavy tenant at "
        f"{report['heavy_ratio']:g}x the light tenant's rate; "
        f"full-bucket step {report['step_s'] * 1e3:.1f} ms, "
        f"capacity {report['capacity_rps']:.2f} req/s; {report['duration_s']:.0f} s of Poisson arrivals "
        "per level, the same arrivals for both policies.",
        "",
        "| load | policy | light p50 (s) | light p99 (s) | light p99 / alone | light p99 / alone at "
        "full-bucket cost | heavy p99 (s) | throughput (req/s) | Jain (served cost) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["levels"]:
        alone = row["light_alone"][LIGHT]
        lines.append(
            f"| {row['load']:.0%} | light alone | {alone['latency_p50_s']:.2f} | "
            f"{alone['latency_p99_s']:.2f} | 1.00x | | | | |"
        )
        padded = row["light_alone_full_bucket"][LIGHT]
        lines.append(
            f"| {row['load']:.0%} | light alone, full-bucket steps | {padded['latency_p50_s']:.2f} | "
            f"{padded['latency_p99_s']:.2f} | | 1.00x | | | |"
        )
        for policy in ("fifo", "fair"):
            r = row[policy]
            lines.append(
                f"| {row['load']:.0%} | {policy} | {r[LIGHT]['latency_p50_s']:.2f} | "
                f"{r[LIGHT]['latency_p99_s']:.2f} | {r['light_p99_vs_alone']:.2f}x | "
                f"{r['light_p99_vs_alone_full_bucket']:.2f}x | "
                f"{r[HEAVY]['latency_p99_s']:.2f} | {r['throughput_rps']:.3f} | {r['jain_served_cost']:.3f} |"
            )
        ratio = row["fair_throughput_vs_fifo"]
        lines.append(f"| {row['load']:.0%} | fair / fifo throughput | | | | | | {ratio:.3f} | |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot_tenants(report, out / f"{name}.png")


def plot_tenants(report: dict, path: Path) -> None:
    """Latency p50 (dashed) and p99 (solid) against load, per policy and tenant (PIL)."""
    from PIL import ImageDraw

    width, height, margin = 760, 480, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    levels = report["levels"]
    series = {}
    for policy, colour in (("fifo", (200, 60, 40)), ("fair", (40, 110, 200))):
        for tenant, shade in ((LIGHT, 0), (HEAVY, 90)):
            tint = tuple(min(255, c + shade) for c in colour)
            for q, dashed in (("latency_p99_s", False), ("latency_p50_s", True)):
                series[(policy, tenant, q)] = (
                    [(row["load"], row[policy][tenant][q]) for row in levels],
                    tint,
                    dashed,
                )
    alone = [(row["load"], row["light_alone"][LIGHT]["latency_p99_s"]) for row in levels]
    series[("alone", LIGHT, "latency_p99_s")] = (alone, (60, 160, 60), False)
    loads = [row["load"] for row in levels]
    x_low, x_high = min(loads) - 0.05, max(loads) + 0.05
    y_high = max(y for points, _, _ in series.values() for _, y in points) * 1.1

    def xy(load: float, seconds: float) -> tuple[float, float]:
        return (
            margin + (load - x_low) / (x_high - x_low) * (width - 2 * margin),
            height - margin - seconds / y_high * (height - 2 * margin),
        )

    draw.line([xy(x_low, 0), xy(x_high, 0)], fill="black")
    draw.line([xy(x_low, 0), xy(x_low, y_high)], fill="black")
    for load in loads:
        x, y = xy(load, 0)
        draw.text((x - 10, y + 6), f"{load:.0%}", fill="black")
    for tick in range(5):
        seconds = y_high * tick / 4
        x, y = xy(x_low, seconds)
        draw.text((5, y - 6), f"{seconds:.1f}s", fill="black")
    draw.text((width / 2 - 40, height - 25), "load (share of capacity)", fill="black")
    draw.text((margin, 10), "latency vs load: p99 solid, p50 dashed", fill="black")
    legend_y = 28
    for (policy, tenant, q), (points, colour, dashed) in series.items():
        pixels = [xy(*point) for point in points]
        for a, b in itertools.pairwise(pixels):
            if dashed:
                for k in range(10):
                    if k % 2 == 0:
                        t0, t1 = k / 10, (k + 1) / 10
                        draw.line(
                            [
                                (a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                                (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1),
                            ],
                            fill=colour,
                            width=2,
                        )
            else:
                draw.line([a, b], fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if q == "latency_p99_s":
            draw.line([(width - 190, legend_y + 6), (width - 165, legend_y + 6)], fill=colour, width=3)
            draw.text((width - 160, legend_y), f"{policy} {tenant}", fill="black")
            legend_y += 16
    image.save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=4, help="the bucket's rows (largest batch)")
    parser.add_argument("--levels", default="0.5,0.8,0.95", help="fractions of the measured capacity")
    parser.add_argument(
        "--duration", type=float, default=40.0, help="seconds of arrivals per level and policy"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="result file names (default: per scenario)")
    parser.add_argument(
        "--scenario",
        choices=("batching", "two-tenant"),
        default="batching",
        help="batching: request- vs step-level; two-tenant: FIFO vs fair step planning",
    )
    parser.add_argument("--heavy-ratio", type=float, default=10.0, help="two-tenant: heavy rate / light rate")
    parser.add_argument("--max-wait", type=int, default=64, help="two-tenant: the planner's starvation bound")
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = "serving-bench" if args.scenario == "batching" else "serving-bench-tenants"
    torch.set_num_threads(1)
    pipeline = load_pipeline(args.model)
    settings = GraphSettings()
    # Step-level batching runs the guidance pass on the rows still updating masks only (a
    # request-level batch has all its rows in one phase).
    graphs = GraphLoop(pipeline, EagerCapture(), partial_guidance=True)
    # Both policies step the smallest bucket that holds their rows (as the compiled backend does).
    family = [Bucket(rows, args.size, args.size) for rows in range(1, args.rows + 1)]
    graphs.prepare(family, [settings])
    batch = RunningBatch(graphs, family, settings)

    probe = prepared_requests(pipeline, args.rows, args.size, args.seed)
    step_s = measure_step_time(batch, probe)
    mean_steps = statistics.mean(STEP_COUNTS)
    capacity = args.rows / (mean_steps * step_s)
    print(f"full-bucket step {step_s * 1e3:.1f} ms -> capacity {capacity:.2f} requests/s", flush=True)
    if args.scenario == "two-tenant":
        return two_tenants(args, pipeline, batch, capacity, step_s)

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"CPU ({platform.node()}), torch {torch.__version__}, 1 thread",
        "model": args.model,
        "size": args.size,
        "rows": args.rows,
        "mix": {"steps": STEP_COUNTS, "mask_reused_step": MASK_REUSE_STEPS},
        "step_s": step_s,
        "capacity_rps": capacity,
        "duration_s": args.duration,
        "levels": [],
    }
    for index, level in enumerate(float(x) for x in args.levels.split(",")):
        times = poisson_times(level * capacity, args.duration, args.seed + index)
        requests = prepared_requests(pipeline, len(times), args.size, args.seed + 100 + index)
        row = {"load": level, "rate_rps": level * capacity}
        for policy in ("request_level", "step_level"):
            timeline = Timeline([Arrival(t, r) for t, r in zip(times, requests, strict=True)])
            if policy == "request_level":
                serve_request_level(graphs, timeline, args.rows)
            else:
                serve_step_level(batch, timeline)
            row[policy] = summary(timeline.arrivals, args.duration)
            print(f"load {level:.0%} {policy}: {json.dumps(row[policy])}", flush=True)
        row["p99_latency_ratio"] = row["request_level"]["latency_p99_s"] / row["step_level"]["latency_p99_s"]
        report["levels"].append(row)
        write(report, args.out, args.name)
    return report


def write(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Serving bench: request-level vs step-level batching ({report['date']})",
        "",
        f"{report['machine']}; model {report['model']} {report['size']}², bucket of {report['rows']} rows; "
        f"steps {report['mix']['steps']}, mask_reused_step {report['mix']['mask_reused_step']}; "
        f"full-bucket step {report['step_s'] * 1e3:.1f} ms, capacity {report['capacity_rps']:.2f} req/s; "
        f"{report['duration_s']:.0f} s of Poisson arrivals per level and policy.",
        "",
        "| load | policy | requests | throughput (req/s) | latency p50 (s) | latency p99 (s) | "
        "queue wait p99 (s) | first step p50 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["levels"]:
        for policy in ("request_level", "step_level"):
            r = row[policy]
            label = policy.replace("_", "-")
            lines.append(
                f"| {row['load']:.0%} | {label} | {r['requests']} | {r['throughput_rps']:.2f} | "
                f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['queue_wait_p99_s']:.2f} | "
                f"{r['time_to_first_step_p50_s']:.2f} |"
            )
        lines.append(f"| {row['load']:.0%} | p99 latency ratio | | | | {row['p99_latency_ratio']:.2f}x | | |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
