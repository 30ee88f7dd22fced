"""`make bench`: the batched eager loop vs the official-style three-call loop, on the CPU, one run.

Absolute CPU times on shared machines are noisy; the ratio, measured interleaved in one process
with one thread, is what this reports. Writes benchmarks/results/cpu-bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import loops, synthetic_request, time_interleaved
from realcustom.loading import load_pipeline


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mask-reused-step", type=int, default=5)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipeline = load_pipeline(args.model)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        request = synthetic_request(pipeline, batch, args.size, args.steps, args.mask_reused_step)
        timings = time_interleaved(loops(pipeline, request), args.runs, torch.device("cpu"))
        ratio = timings["three_call"]["median_s"] / timings["batched"]["median_s"]
        rows.append(
            {"batch": batch, **{f"{k}_median_s": v["median_s"] for k, v in timings.items()}, "ratio": ratio}
        )
        print(
            f"batch {batch}: three-call {timings['three_call']['median_s'] * 1e3:.1f} ms, "
            f"batched {timings['batched']['median_s'] * 1e3:.1f} ms, ratio {ratio:.2f}x"
        )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({cpu_model()}, {os.cpu_count()} CPUs, 1 thread)",
        "torch": torch.__version__,
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "mask_reused_step": args.mask_reused_step,
        "runs": args.runs,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# CPU bench ({result['date']}, {result['machine']}, torch {result['torch']})",
        "",
        f"Model `{args.model}`, {args.size}², {args.steps} steps, mask_reused_step {args.mask_reused_step}, "
        f"median of {args.runs} interleaved runs.",
        "",
        "| batch | three-call (ms) | batched (ms) | three-call / batched |",
        "|---|---|---|---|",
        *[
            f"| {r['batch']} | {r['three_call_median_s'] * 1e3:.1f} | {r['batched_median_s'] * 1e3:.1f} | "
            f"{r['ratio']:.2f}x |"
            for r in rows
        ],
        "",
    ]
    (args.out / "cpu-bench.md").write_text("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
