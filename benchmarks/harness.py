"""What the benchmarks share: one synthetic request per batch size, the three loops, timing.

The loops timed (same process, same inputs):
* `three_call`: the official-style loop (benchmarks/baseline_loop.py): guidance, conditional and
  unconditional as three UNet calls of batch B, projector and image K/V recomputed in every
  image-conditioned call, a host sync per step;
* `batched`: our eager loop (realcustom.denoise): cond+uncond as one batch-2B call, projector
  output and image K/V once per request;
* `compiled`: the compiled backend (torch.compile + CUDA graphs on a GPU; on the CPU the same
  static-buffer loop without graphs, for dry runs only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from benchmarks.baseline_loop import three_call_denoise
from engines.backends import EagerBackend
from engines.runner import Runner
from realcustom.denoise import Conditioning, LoopResult, LoopSettings, denoise
from realcustom.job_inputs import job_conditioning
from realcustom.jobs import GenerationJob, SubjectInput
from realcustom.pipeline import RealCustomPipeline


@dataclass
class Request:
    cond: Conditioning
    latents: torch.Tensor
    settings: LoopSettings
    cond_tokens: Callable[[], torch.Tensor]
    negative_tokens: Callable[[], torch.Tensor]


def synthetic_request(
    pipeline: RealCustomPipeline, batch: int, size: int, steps: int, mask_reused_step: int
) -> Request:
    """One job with `batch` images (one subject), built by the runner's own conditioning code."""
    photo = Image.new("RGB", (96, 96), (180, 120, 60))
    job = GenerationJob(
        id="bench",
        prompt="a photo of a dog on the beach",
        subjects=(SubjectInput(photo, "dog"),),
        width=size,
        height=size,
        num_inference_steps=steps,
        mask_reused_step=mask_reused_step,
        num_images=batch,
    )
    runner = Runner(pipeline, EagerBackend(pipeline), pipeline.name)
    cond = job_conditioning(runner.pipeline, [job])
    latents = pipeline.prepare_latents([job.seed], [batch], size, size)
    settings = LoopSettings(steps, "dpm", ("max_norm",), mask_reused_step)
    encoder = pipeline.reference_encoder
    with torch.no_grad():
        features = encoder(encoder.to_tensor([photo]))
        black = encoder.black_features(1)

    def projected(source) -> Callable[[], torch.Tensor]:
        # The official code runs the projector on the B repeated references inside every call.
        return lambda: pipeline.project(source.expand(batch)).unsqueeze(1)

    return Request(cond, latents, settings, projected(features), projected(black))


def loops(
    pipeline: RealCustomPipeline, request: Request, compiled=None
) -> dict[str, Callable[[], LoopResult]]:
    unet, r = pipeline.unet, request
    table = {
        "three_call": lambda: three_call_denoise(
            unet, r.cond, r.latents, r.settings, r.cond_tokens, r.negative_tokens
        ),
        "batched": lambda: denoise(unet, r.cond, r.latents, r.settings),
    }
    if compiled is not None:
        table["compiled"] = lambda: compiled.denoise(pipeline, r.cond, r.latents, r.settings)
    return table


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call: CUDA events on a GPU (after a sync), perf_counter on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and p90 of timed runs (p90: the sorted run at index round(0.9 * (n - 1)))."""
    ordered = sorted(seconds)
    return {
        "median_s": statistics.median(ordered),
        "p90_s": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "runs": len(ordered),
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], runs: int, device: torch.device, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Median and p90 seconds of each function, runs interleaved (drift hits all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, device))
    return {name: summarize(values) for name, values in samples.items()}


def parity(eager: LoopResult, candidate: LoopResult) -> dict[str, float]:
    """How far a loop's result is from the eager batched loop's: latents and mask agreement."""
    expected, out = eager.latents.float(), candidate.latents.float()
    expected_masks, masks = eager.masks.float(), candidate.masks.float()
    return {
        "latents_max_abs": float((expected - out).abs().max()),
        "latents_rel_l2": float((expected - out).norm() / expected.norm().clamp_min(1e-12)),
        "mask_support_agreement": float(((expected_masks > 0) == (masks > 0)).float().mean()),
        "masks_max_abs": float((expected_masks - masks).abs().max()),
    }
