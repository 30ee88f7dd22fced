"""The prepared GPU benchmark: full-size SDXL (1024²) and SD-1.5 (512²) with random weights.

In one process per model: build the architecture, check compiled-vs-eager parity, then time,
interleaved, the official-style three-call eager loop, our eager batched loop and the compiled
CUDA-graph loop, at batch 1 and 4, median and p90 of >= 10 runs with CUDA events. Writes
benchmarks/results/gpu-bench.{json,md} (merged per model, so models can run as separate calls).

    python benchmarks/gpu_bench.py --models sd15,sdxl --batches 1,4 --runs 10
    python benchmarks/gpu_bench.py --models sdxl --compile-backend none   # CUDA graphs, no inductor

Dry run on a CPU (what the tests exercise; no graphs, no compile, numbers meaningless):
    python benchmarks/gpu_bench.py --device cpu --models tiny --size 64 --steps 2 --runs 1 --batches 1
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import loops, parity, synthetic_request, time_interleaved
from engines.compiled import CompiledBackend, EagerCapture
from engines.static_loop import Bucket
from realcustom.loading import load_pipeline

# UNet-only floors per image on one H100 (../shared/docs/performance.md), 25 steps, R = 12.
FLOOR_S = {"sdxl": 0.524, "sd15": 0.062}
DEFAULT_SIZE = {"sdxl": 1024, "sd15": 512, "tiny": 64}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_model(model: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    size = args.size or DEFAULT_SIZE[model]
    started = time.perf_counter()
    pipeline = load_pipeline(model if model == "tiny" else f"{model}-random", device=device, dtype=dtype)
    result: dict = {
        "model": model,
        "size": size,
        "dtype": str(dtype),
        "load_s": time.perf_counter() - started,
    }
    rows = []
    for batch in args.batches:
        request = synthetic_request(pipeline, batch, size, args.steps, args.mask_reused_step)
        on_gpu = device.type == "cuda"
        compiled = CompiledBackend(
            pipeline,
            buckets=[Bucket(batch, size, size)],
            compile_backend=None if args.compile_backend == "none" or not on_gpu else args.compile_backend,
            compile_mode=args.compile_mode,
            capture=None if on_gpu else EagerCapture(),
        )
        started = time.perf_counter()
        compiled.warmup()  # compile + capture the two step kinds of this bucket
        warmup_s = time.perf_counter() - started
        table = loops(pipeline, request, compiled)
        # Parity (also warms every loop once): compiled and three-call against the batched loop.
        reference = table["batched"]()
        checks = {
            "compiled_vs_eager": parity(reference, table["compiled"]()),
            "three_call_vs_eager": parity(reference, table["three_call"]()),
        }
        timings = time_interleaved(table, args.runs, device, warmup=0)
        baseline = timings["three_call"]["median_s"]
        row = {
            "batch": batch,
            "capture_and_compile_s": warmup_s,
            "timings": timings,
            "per_image_s": {name: t["median_s"] / batch for name, t in timings.items()},
            "speedup_vs_three_call": {name: baseline / t["median_s"] for name, t in timings.items()},
            "parity": checks,
            "graph_stats": dict(compiled.stats),
        }
        if model in FLOOR_S:
            row["compiled_per_image_over_floor"] = row["per_image_s"]["compiled"] / FLOOR_S[model]
        rows.append(row)
        print(
            json.dumps(
                {
                    "model": model,
                    "batch": batch,
                    "per_image_s": row["per_image_s"],
                    "speedup": row["speedup_vs_three_call"],
                    "parity": checks,
                }
            ),
            flush=True,
        )
        del compiled, table, request
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    result["rows"] = rows
    del pipeline
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(report: dict) -> str:
    lines = [
        f"# GPU bench: {report['device']}",
        "",
        f"{report['date']}, torch {report['torch']}, CUDA {report['cuda']}, {report['steps']} steps, "
        f"mask_reused_step {report['mask_reused_step']}, median (p90) of {report['runs']} runs, "
        f"compile backend {report['compile_backend']}.",
        "",
        "| model | batch | three-call (s) | batched eager (s) | compiled (s) | compiled speed-up | "
        "compiled per image / floor | latents rel. L2 | mask agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in report["models"].values():
        for row in model["rows"]:
            cell = lambda name, t=row["timings"]: f"{t[name]['median_s']:.3f} ({t[name]['p90_s']:.3f})"  # noqa: E731
            check = row["parity"]["compiled_vs_eager"]
            floor = row.get("compiled_per_image_over_floor")
            lines.append(
                f"| {model['model']} {model['size']}² | {row['batch']} | {cell('three_call')} | "
                f"{cell('batched')} | {cell('compiled')} | "
                f"{row['speedup_vs_three_call']['compiled']:.2f}x | "
                f"{'-' if floor is None else f'{floor:.2f}x'} | {check['latents_rel_l2']:.2e} | "
                f"{check['mask_support_agreement']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--mask-reused-step", type=int, default=12)
    parser.add_argument("--size", type=int, default=None, help="override the model's default size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend, or 'none'")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode (default: inductor's default; 'max-autotune-no-cudagraphs' tunes GEMMs "
        "but compiles for many minutes on SDXL). Never 'reduce-overhead': the CUDA graphs are ours",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="gpu-bench", help="output file stem")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --device cpu for a dry run")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.name}.json"
    report = json.loads(json_path.read_text()) if json_path.is_file() else {"models": {}}
    report.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.node()})",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        steps=args.steps,
        mask_reused_step=args.mask_reused_step,
        runs=args.runs,
        compile_backend=args.compile_backend if args.device.startswith("cuda") else "none (CPU dry run)",
        dry_run=not args.device.startswith("cuda"),
    )
    for model in args.models.split(","):
        report["models"][model] = bench_model(model, args)
        json_path.write_text(json.dumps(report, indent=2) + "\n")  # after each model: partial results survive
    (args.out / f"{args.name}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
