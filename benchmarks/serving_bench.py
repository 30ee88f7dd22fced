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

    python benchmarks/serving_bench.py --size 256 --duration 60   # docs/PERFORMANCE.md's run
    python benchmarks/serving_bench.py --duration 5 --levels 0.5   # quick look
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

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.backends import EagerBackend
from engines.graph_loop import EagerCapture, GraphLoop
from engines.runner import Runner
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import RowRequest, RunningBatch
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


def prepared_requests(pipeline, count: int, size: int, seed: int) -> list[RowRequest]:
    """`count` requests of the mix, conditioning computed once (shared by both policies)."""
    chooser = random.Random(seed)
    runner = Runner(pipeline, EagerBackend(pipeline), pipeline.name)
    photo = SubjectInput(Image.new("RGB", (96, 96), (150, 140, 130)), "dog")
    requests = []
    for index in range(count):
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
    parser.add_argument("--name", default="serving-bench")
    args = parser.parse_args(argv)
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
