"""The GPU benchmark, sized for a device window: one model per call, every row written as it comes.

For one model (full-size SD-1.5 512² or SDXL 1024² with random weights, bf16, batch 1 by
default), in one process: the official-style three-call loop (benchmarks/baseline_loop.py), our
eager batched loop (realcustom.denoise) and the compiled backend (by default CUDA graphs over
eager kernels, `--compile-backend none`; `inductor` is opt-in: its compile takes minutes). Rows,
in the order they are measured:

  load       seconds to build the model (random weights drawn on the GPU), parameters, memory held
  first_run  one run of each loop: seconds (cold), peak GPU memory (reset before each loop, every
             model resident), parity with the batched loop (latents relative L2, mask agreement)
  capture    seconds to compile and capture the compiled backend's two step kinds
  timing     median (p50) / p90 seconds per loop over interleaved runs, ms per step, ratio to the
             three-call loop; rewritten after every round, so a cut run keeps the rounds it finished
  summary    ratios, and the goal figures of issue 10 where the model has them
  step_kind  ms of a MASK_UPDATE and of a MASK_REUSE step: for the compiled loop from a second
             timing with every step a mask update; for the eager loops from the UNet calls below
  unet_call  eager UNet calls alone: guidance (B), generation with image tokens and the projector
             (B, as the three-call loop calls it), generation with precomputed K/V (2B, batched)

`<out>/<name>.json` (default benchmarks/results/gpu-bench.json) is rewritten after every row and
keeps the rows of earlier calls; `<name>.md` is its tables. tools/device_check.sh runs this once per
model (docs/ENGINES.md, "Device kit").

    python benchmarks/gpu_bench.py --model sd15
    python benchmarks/gpu_bench.py --model sdxl --runs 3
    python benchmarks/gpu_bench.py --model sd15 --compile-backend inductor --loops batched,compiled

Dry run on a CPU (what the tests run; no graphs, numbers meaningless):
    python benchmarks/gpu_bench.py --device cpu --model tiny --size 64 --steps 2 --mask-reused-step 1 --runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Request, loops, parity, summarize, synthetic_request, time_once
from engines.compiled import CompiledBackend
from engines.graph_loop import EagerCapture, inductor_records_graphs
from engines.static_loop import Bucket
from realcustom.denoise import LoopResult
from realcustom.loading import load_pipeline
from realcustom.pipeline import RealCustomPipeline

logger = logging.getLogger("gpu_bench")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOOPS = ("three_call", "batched", "compiled")
# Issue 10's goal figures (H100/H200, bf16, batch 1, 25 steps): p50 seconds, speed-up over the
# three-call loop, peak GPU bytes with every model resident.
GOALS = {
    "sd15": {"median_s": 0.110, "speedup_vs_three_call": 3.0},
    "sdxl": {"median_s": 1.0, "peak_gpu_bytes": 16e9},
}


class Rows:
    """The results file: every row of every call, rewritten whole (atomically) after each row."""

    def __init__(self, out: Path, name: str, context: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = out / f"{name}.json", out / f"{name}.md"
        self.context = context
        self.rows: list[dict] = []
        if self.json_path.is_file():
            self.rows = json.loads(self.json_path.read_text())["rows"]

    def put(self, kind: str, key: str | None = None, **values) -> dict:
        """Append a row, or update this call's row of the same kind and key."""
        for row in self.rows:
            if row["call"] == self.context["call"] and row["row"] == kind and row.get("key") == key:
                row.update(values)
                break
        else:
            row = {**self.context, "row": kind, **({"key": key} if key else {}), **values}
            self.rows.append(row)
        self._write(self.json_path, json.dumps({"rows": self.rows}, indent=2) + "\n")
        self._write(self.md_path, markdown(self.rows))
        return row

    @staticmethod
    def _write(path: Path, text: str) -> None:
        scratch = path.with_suffix(path.suffix + ".tmp")
        scratch.write_text(text)
        os.replace(scratch, path)  # a reader (or a kill) never sees half a file


class PhaseLog:
    """Logs each phase as it starts and ends. A stage cut by SIGINT says where it was: in a phase,
    or between two (writing rows), named by the phase that ended last."""

    def __init__(self) -> None:
        self._last = "start-up"
        self._ended_at = time.perf_counter()
        self._reported = False

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        logger.info("phase %s: start", name)
        began = time.perf_counter()
        try:
            yield
        except BaseException as error:
            self._reported = True
            logger.warning("phase %s: stopped after %.1f s (%r)", name, time.perf_counter() - began, error)
            raise
        finally:
            self._last, self._ended_at = name, time.perf_counter()
        logger.info("phase %s: done in %.1f s", name, self._ended_at - began)

    def stopped(self, error: BaseException) -> None:
        """Log a stop that no phase logged (it came between phases)."""
        if not self._reported:
            since = time.perf_counter() - self._ended_at
            logger.warning("phase after %s: stopped after %.1f s (%r)", self._last, since, error)


phase = PhaseLog()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(model: str, device: torch.device, dtype: torch.dtype) -> tuple[RealCustomPipeline, str]:
    """Full-size models get random weights; off the CPU they are drawn on the device itself, not
    drawn by the CPU and copied (SDXL's whole pipeline has 4.6 B parameters)."""
    name = model if model.startswith("tiny") else f"{model}-random"
    if device.type == "cpu":
        return load_pipeline(name, device=device, dtype=dtype), "cpu"
    try:
        with device:  # factory calls (parameter initialisation) allocate on the device
            return load_pipeline(name, device=device, dtype=dtype), device.type
    except (RuntimeError, NotImplementedError) as error:
        print(f"drawing the weights on {device} failed ({error}); drawing them on the CPU", flush=True)
        return load_pipeline(name, device=device, dtype=dtype), f"cpu (on {device}: {error})"


def measured_run(fn: Callable[[], LoopResult], device: torch.device) -> tuple[LoopResult, dict]:
    """One cold run: its result, seconds and peak GPU memory since a reset just before it."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return result, {"seconds": seconds, "peak_gpu_bytes": peak}


def timing_values(samples: list[float], steps: int, three_call: list[float] | None) -> dict:
    values = summarize(samples)
    values["ms_per_step"] = 1000 * values["median_s"] / steps
    if three_call:
        values["speedup_vs_three_call"] = statistics.median(three_call) / values["median_s"]
    return values


def unet_calls(pipeline: RealCustomPipeline, request: Request, masks: torch.Tensor) -> dict[str, Callable]:
    """The eager UNet calls the loops are made of, on the request's inputs at a mid timestep."""
    unet, cond = pipeline.unet, request.cond
    batch = cond.batch_size
    x = request.latents.to(pipeline.dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=x.device)
    gate = masks.to(pipeline.dtype)
    doubled = [None if v is None else torch.cat([v, v]) for v in (cond.pooled, cond.time_ids)]
    text = torch.cat([cond.prompt_embeds, cond.negative_prompt_embeds])
    with torch.no_grad():
        image_kv = unet.image_key_values(torch.cat([cond.image_tokens, cond.negative_image_tokens]))

    def guidance():
        return unet.guidance(x, t, cond.prompt_embeds, cond.pooled, cond.time_ids, cond.target_tokens)

    def generation_tokens():  # the three-call loop's conditional call: projector inside
        return unet.generation(
            x, t, cond.prompt_embeds, cond.pooled, cond.time_ids, request.cond_tokens(), gate
        )

    def generation_kv():  # the batched loop's call: cond + uncond, K/V computed once per request
        return unet.generation(
            torch.cat([x, x]),
            torch.cat([t, t]),
            text,
            *doubled,
            masks=torch.cat([gate, gate]),
            image_key_values=image_kv,
        )

    return {
        "guidance_b": guidance,
        "generation_tokens_b": generation_tokens,
        "generation_kv_2b": generation_kv,
    }


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    selected = [name for name in LOOPS if name in args.loops]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    context = {
        "call": f"{started} {args.model} {args.compile_backend} pid {os.getpid()}",
        "date": started,
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.node()})",
        "dry_run": not on_gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "mask_reused_step": args.mask_reused_step,
        "dtype": str(dtype).removeprefix("torch."),
        "compile_backend": args.compile_backend,
        "compile_mode": args.compile_mode,
    }
    rows = Rows(args.out, args.name, context)

    began = time.perf_counter()
    with phase(f"model build ({args.model}, {context['dtype']}, {device})"):
        pipeline, drawn_on = load(args.model, device, dtype)
        synchronize(device)
    size = args.size or pipeline.default_size
    context["size"] = size
    rows.put(
        "load",
        seconds=time.perf_counter() - began,
        weights_drawn_on=drawn_on,
        parameters=sum(p.numel() for p in pipeline.parameters()),
        gpu_bytes_allocated=torch.cuda.memory_allocated() if on_gpu else None,
    )

    request = synthetic_request(pipeline, args.batch, size, args.steps, args.mask_reused_step)
    table = loops(pipeline, request)
    # Eager loops first, before the graphs' memory pool exists: each peak is the loop's own.
    results: dict[str, LoopResult] = {}
    for name in ("batched", *(n for n in selected if n == "three_call")):  # batched: the parity base
        with phase(f"first run ({name})"):
            results[name], measured = measured_run(table[name], device)
        rows.put(
            "first_run", key=name, loop=name, **measured, parity=parity(results["batched"], results[name])
        )

    if "compiled" in selected:
        compiled = CompiledBackend(
            pipeline,
            buckets=[Bucket(args.batch, size, size)],
            compile_backend=None if args.compile_backend == "none" else args.compile_backend,
            compile_mode=args.compile_mode,
            capture=None if on_gpu else EagerCapture(),
        )
        try:
            with phase(f"compile + capture ({args.compile_backend})"):
                _, measured = measured_run(compiled.warmup, device)
            rows.put("capture", capture="cuda_graph" if on_gpu else "eager (CPU dry run)", **measured)
            table = loops(pipeline, request, compiled)
            with phase("first run (compiled)"):
                results["compiled"], measured = measured_run(table["compiled"], device)
        except Exception as error:  # never run on a GPU before: record it, still time the eager loops
            traceback.print_exc()
            rows.put("capture", error=f"{type(error).__name__}: {error}")
            selected.remove("compiled")
        else:
            rows.put(
                "first_run",
                key="compiled",
                loop="compiled",
                **measured,
                parity=parity(results["batched"], results["compiled"]),
                graph_stats=dict(compiled.stats),
            )

    # Interleaved rounds (drift hits every loop alike); the timing rows follow each round.
    samples: dict[str, list[float]] = {name: [] for name in selected}
    for round_ in range(args.runs):
        with phase(f"timing round {round_ + 1}/{args.runs} ({', '.join(selected)})"):
            for name in selected:
                samples[name].append(time_once(table[name], device))
        for name in selected:
            values = timing_values(samples[name], args.steps, samples.get("three_call"))
            rows.put("timing", key=name, loop=name, **values)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    rows.put("summary", **summary(args, medians, rows.rows, context["call"]))

    if "compiled" in selected:
        with phase("step kinds (compiled)"):
            kinds = compiled_step_kinds(args, pipeline, compiled, request, medians["compiled"], device)
        rows.put("step_kind", key="compiled", loop="compiled", **kinds)
    calls = unet_calls(pipeline, request, results["batched"].masks[0])
    call_ms = {}
    for name, fn in calls.items():
        with phase(f"UNet call {name}"), torch.no_grad():
            fn()  # warm (cuDNN/cuBLAS choices)
            call_ms[name] = 1000 * statistics.median(time_once(fn, device) for _ in range(args.unet_repeats))
        rows.put("unet_call", key=name, unet_call=name, median_ms=call_ms[name], repeats=args.unet_repeats)
    eager_kinds = {
        "three_call": (
            call_ms["guidance_b"] + 2 * call_ms["generation_tokens_b"],
            2 * call_ms["generation_tokens_b"],
        ),
        "batched": (call_ms["guidance_b"] + call_ms["generation_kv_2b"], call_ms["generation_kv_2b"]),
    }
    for name in (n for n in selected if n in eager_kinds):
        update, reuse = eager_kinds[name]
        rows.put(
            "step_kind", key=name, loop=name, mask_update_ms=update, mask_reuse_ms=reuse, source="UNet calls"
        )
    return [row for row in rows.rows if row["call"] == context["call"]]


def compiled_step_kinds(
    args: argparse.Namespace,
    pipeline: RealCustomPipeline,
    compiled: CompiledBackend,
    request: Request,
    median_s: float,
    device: torch.device,
) -> dict:
    """A MASK_UPDATE step: a loop with every step a mask update, over its steps; a MASK_REUSE step:
    what is left of the timing p50. mask_reused_step is data, not part of the graph key, so the
    same two graphs serve both loops (graph_misses_added says so)."""
    every_update = dataclasses.replace(request.settings, mask_reused_step=args.steps)
    misses = compiled.stats["graph_misses"]
    seconds = [
        time_once(lambda: compiled.denoise(pipeline, request.cond, request.latents, every_update), device)
        for _ in range(args.runs)
    ]
    update_s = statistics.median(seconds) / args.steps
    updates = min(max(args.mask_reused_step, 1), args.steps)  # step 0 always computes a mask
    reuse_s = (median_s - updates * update_s) / (args.steps - updates) if updates < args.steps else None
    return {
        "mask_update_ms": 1000 * update_s,
        "mask_reuse_ms": None if reuse_s is None else 1000 * reuse_s,
        "source": "compiled loop with every step a mask update, and the timing p50",
        "graph_misses_added": compiled.stats["graph_misses"] - misses,
    }


def summary(args, medians: dict[str, float], rows: list[dict], call: str) -> dict:
    ratios = {
        f"{slow}_over_{fast}": medians[slow] / medians[fast]
        for slow, fast in (("three_call", "batched"), ("three_call", "compiled"), ("batched", "compiled"))
        if slow in medians and fast in medians
    }
    peaks = {
        row["loop"]: row["peak_gpu_bytes"]
        for row in rows
        if row["call"] == call and row["row"] == "first_run"
    }
    values = {"median_s": medians, "ratios": ratios, "peak_gpu_bytes": peaks}
    ours = "compiled" if "compiled" in medians else "batched"  # the project's fastest loop timed
    measured = {
        "median_s": medians.get(ours),
        "speedup_vs_three_call": ratios.get(f"three_call_over_{ours}"),
        "peak_gpu_bytes": peaks.get(ours),
    }
    if args.device.startswith("cuda") and args.model in GOALS:
        values["goals"] = {
            name: {
                "loop": ours,
                "target": target,
                "measured": measured[name],
                "met": None
                if measured[name] is None
                else (measured[name] >= target if name.startswith("speedup") else measured[name] <= target),
            }
            for name, target in GOALS[args.model].items()
        }
    return values


def _cell(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """One section per call: its loops side by side, then the UNet calls and the goals."""
    lines = ["# GPU bench", "", "Made by benchmarks/gpu_bench.py from the rows of its JSON file.", ""]
    for call in dict.fromkeys(row["call"] for row in rows):
        mine = [row for row in rows if row["call"] == call]
        head = mine[0]

        def of(kind: str, mine: list[dict] = mine) -> dict:
            return {row.get("key"): row for row in mine if row["row"] == kind}

        load, capture, summary_row = of("load").get(None), of("capture").get(None), of("summary").get(None)
        notes = (
            [f"load {_cell(load['seconds'], digits=1)} s (weights drawn on {load['weights_drawn_on']})"]
            if load
            else []
        )
        if capture and "error" in capture:
            notes.append(f"**compile + capture failed: {capture['error']}**")
        elif capture:
            notes.append(f"compile + capture {_cell(capture['seconds'], digits=1)} s ({capture['capture']})")
        lines += [
            f"## {head['model']} {head.get('size', '?')}², batch {head['batch']}, compile backend "
            f"{head['compile_backend']}: {head['device']}",
            "",
            f"{head['date']}, torch {head['torch']}, CUDA {head['cuda']}, {head['dtype']}, "
            f"{head['steps']} steps, mask_reused_step {head['mask_reused_step']}; {'; '.join(notes)}."
            + (" **CPU dry run: the numbers mean nothing.**" if head["dry_run"] else ""),
            "",
            "| loop | first run (s) | p50 (s) | p90 (s) | runs | ms/step | mask-update step (ms) | "
            "mask-reuse step (ms) | peak GPU (GB) | three-call / loop | latents rel. L2 vs batched | "
            "mask agreement |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for loop in LOOPS:
            first, timing, kind = (
                of("first_run").get(loop),
                of("timing").get(loop, {}),
                of("step_kind").get(loop, {}),
            )
            if first is None:
                continue
            check = first["parity"]
            cells = [
                loop,
                _cell(first["seconds"]),
                _cell(timing.get("median_s")),
                _cell(timing.get("p90_s")),
                str(timing.get("runs", 0)),
                _cell(timing.get("ms_per_step"), digits=1),
                _cell(kind.get("mask_update_ms"), digits=1),
                _cell(kind.get("mask_reuse_ms"), digits=1),
                _cell(first["peak_gpu_bytes"], 1e-9, 2),
                _cell(timing.get("speedup_vs_three_call"), digits=2),
                f"{check['latents_rel_l2']:.2e}",
                f"{check['mask_support_agreement']:.4f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        calls = of("unet_call")
        if calls:
            listed = ", ".join(f"{name} {_cell(row['median_ms'], digits=1)}" for name, row in calls.items())
            lines += [
                "",
                f"Eager UNet calls alone (median ms): {listed}. Step kinds of the eager loops add "
                "these up (UNet only); the compiled loop's are timed whole loops.",
            ]
        for name, goal in ((summary_row or {}).get("goals") or {}).items():
            lines.append(
                f"- goal {name} ({goal['loop']}): target {goal['target']}, measured "
                f"{_cell(goal['measured'], digits=3)}, {'met' if goal['met'] else 'not met'}"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="sd15", help="sd15, sdxl (random full-size weights), tiny, tiny-sd15"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="interleaved timed runs of each loop")
    parser.add_argument("--unet-repeats", type=int, default=5, help="timed calls of each eager UNet call")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--mask-reused-step", type=int, default=12)
    parser.add_argument("--size", type=int, default=None, help="default: the model's own size")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="on a GPU (the CPU runs fp32)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma list of {', '.join(LOOPS)}")
    parser.add_argument(
        "--compile-backend",
        default="none",
        help="torch.compile backend of the compiled loop, or 'none' (CUDA graphs over eager kernels)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode; on a GPU never one with inductor's own CUDA graphs ('reduce-overhead', "
        "'max-autotune'): the CUDA graphs are ours",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="gpu-bench", help="output file stem")
    args = parser.parse_args(argv)
    args.loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    if unknown := set(args.loops) - set(LOOPS):
        parser.error(f"unknown loops {sorted(unknown)}: use {', '.join(LOOPS)}")
    if args.device.startswith("cuda") and inductor_records_graphs(args.compile_mode):
        parser.error(
            f"--compile-mode {args.compile_mode} turns on inductor's own CUDA graphs inside ours: "
            "use max-autotune-no-cudagraphs or the default"
        )
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --device cpu for a dry run")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return bench(args)


if __name__ == "__main__":
    # Phases (and the engines' capture lines) with wall-clock stamps: a cut stage shows how far it got.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        measured_rows = main()
    except KeyboardInterrupt as interrupt:
        phase.stopped(interrupt)
        raise
    # Status 1 when a row records an error (the rows measured around it are kept).
    sys.exit(1 if any("error" in row for row in measured_rows) else 0)
