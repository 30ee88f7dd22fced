"""CFG-free rows in a running batch: what one step costs with and without the unconditional half.

A running batch of B rows (the worker's executor, `engines.step_batching.RunningBatch`, over a
`GraphLoop` with unconditional prefixes captured, as the worker's eager families are) steps, per
configuration, `--runs` MASK_REUSE steps and `--runs` MASK_UPDATE steps:

* `cfg`: every row has guidance 3.5 (the generation pass computes 2B rows);
* `cfg_free`: every row has guidance 0 (the planner's layout runs the unconditional half on no row:
  the generation pass computes B rows);
* `mixed`: half the rows with CFG, first (B + B/2 rows).

The UNet rows each step computed are read from the loop's counters (`rows_generation`,
`rows_guidance`), the time is the median step. The configurations alternate step by step, so drift
on a shared machine hits them alike. Eager, random tiny weights: the ratio of step times is what a
CPU can show (one run, as all of this project's CPU numbers); the floor (benchmarks/floor.py) has
the exact work on SDXL.

    python benchmarks/cfg_free_bench.py                 # tiny at 256², 4 rows, 9 steps of each kind

Writes cfg-free-bench.{json,md} to --out (benchmarks/results by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.graph_loop import EagerCapture, GraphLoop
from engines.planner import FamilyLayout, Placement
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import RowRequest, RunningBatch
from realcustom.job_inputs import prepare_rows
from realcustom.jobs import GenerationJob, SubjectInput
from realcustom.loading import load_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"cfg": 1.0, "cfg_free": 0.0, "mixed": 0.5}  # share of rows with CFG


def requests(pipeline, rows: int, size: int, cfg_share: float, steps: int) -> list[RowRequest]:
    with_cfg = round(rows * cfg_share)
    out = []
    for row in range(rows):
        job = GenerationJob(
            id=f"r{row}",
            prompt="a photo of a dog on a sofa",
            subjects=(SubjectInput(Image.new("RGB", (64, 64), (200, 20, 20)), "dog"),),
            width=size,
            height=size,
            num_inference_steps=steps,
            mask_reused_step=1,
            guidance_scale=3.5 if row < with_cfg else 0.0,
            seed=row,
        )
        prepared = prepare_rows(pipeline, job, subject_slots=1)
        out.append(RowRequest(job.id, prepared.cond, prepared.latents, steps, 1, prepared.key_values))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = load_pipeline("tiny")
    bucket = Bucket(args.rows, args.size, args.size)
    graphs = GraphLoop(pipeline, EagerCapture(), partial_guidance=True, partial_uncond=True)
    graphs.prepare([bucket], [GraphSettings()])
    batches = {}
    for name, share in CONFIGS.items():
        batch = RunningBatch(graphs, [bucket], GraphSettings())
        for request in requests(pipeline, args.rows, args.size, share, steps=2 * args.runs + 2):
            assert batch.join(request)
        batches[name] = batch
    seconds = {(name, kind): [] for name in CONFIGS for kind in ("update", "reuse")}
    rows = {}
    with torch.no_grad():
        for run in range(2 * args.runs + 1):
            for name, batch in batches.items():
                # The guidance pass on every row (MASK_UPDATE), or on none (MASK_REUSE); step 0 updates.
                kind = "reuse" if run % 2 else "update"
                layout = batch.layout()
                placements = tuple(
                    Placement(p.key, p.start, p.rows, kind == "update", p.cfg) for p in layout.rows
                )
                guidance = args.rows if kind == "update" else None
                plan = FamilyLayout(layout.bucket, placements, guidance, layout.uncond)
                batch.apply(plan)
                before = dict(graphs.stats)
                started = time.perf_counter()
                batch.step()
                elapsed = time.perf_counter() - started
                if run:  # the first round warms up
                    seconds[name, kind].append(elapsed)
                rows[name, kind] = {
                    event: graphs.stats[event] - before.get(event, 0)
                    for event in ("rows_guidance", "rows_generation")
                }
    results = []
    for (name, kind), values in seconds.items():
        results.append(
            {
                "config": name,
                "step": kind,
                "rows": args.rows,
                **rows[name, kind],
                "median_ms": 1000 * statistics.median(values),
                "ratio_to_cfg": statistics.median(values) / statistics.median(seconds["cfg", kind]),
            }
        )
    report = {"command": " ".join(sys.argv), "model": "tiny", "size": args.size, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cfg-free-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# CFG-free rows in a running batch (tiny model, CPU, eager)",
        "",
        f"`{report['command']}`: {args.rows} rows at {args.size}², median of {args.runs} steps each",
        "",
        "| rows with CFG | step | guidance rows | generation rows | median ms | vs all CFG |",
        "|---|---|---|---|---|---|",
    ]
    share = {"cfg": "all", "cfg_free": "none", "mixed": "half"}
    for row in results:
        lines.append(
            f"| {share[row['config']]} | {row['step']} | {row['rows_guidance']} | {row['rows_generation']} | "
            f"{row['median_ms']:.0f} | {row['ratio_to_cfg']:.2f} |"
        )
    (args.out / "cfg-free-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
