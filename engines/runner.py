"""The runner: a batch of compatible jobs -> images, in one denoising loop.

preprocess (realcustom.job_inputs: text, target tokens, reference tokens; padded to the batch's
largest subject count) -> denoise (the selected backend) -> decode. Each job's noise comes from
its own seed, so a job gives the same image alone or batched with others, up to floating-point
reduction order (on the CPU about one level in 1e-4 of the pixels differs when the batch
composition changes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from engines.backends import Backend, backend_stats, select_backend, warm_up
from engines.static_loop import GraphSettings, parse_buckets
from realcustom.denoise import LoopSettings
from realcustom.job_inputs import job_conditioning, job_latents, job_outputs
from realcustom.jobs import GenerationJob, GenerationOutput, SubjectInput
from realcustom.loading import load_pipeline
from realcustom.lora.bank import BankLayout
from realcustom.pipeline import RealCustomPipeline
from realcustom.settings_check import check_generation

logger = logging.getLogger(__name__)


class Runner:
    """Holds one loaded pipeline and one backend; runs batches of jobs that share a batch_key."""

    def __init__(self, pipeline: RealCustomPipeline, backend: Backend, model_name: str):
        self.pipeline = pipeline
        self.backend = backend
        self.model_name = model_name
        # Called on the host after every denoising step (the worker's progress-based liveness).
        self.on_step: Callable[[], None] | None = None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def stats(self) -> dict[str, int]:
        """The backend's counters (a snapshot): `graph_replays`, `graph_misses` (steps that ran
        without a captured graph), `eager_loops` (loops that fell back to the eager loop),
        `graphs_captured`. Empty for `eager`. Monotonic, so the worker can export them as counters."""
        return backend_stats(self.backend)

    @torch.no_grad()
    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationOutput]:
        if not jobs:
            return []
        first = jobs[0]
        if any(job.batch_key() != first.batch_key() for job in jobs):
            raise ValueError(
                "jobs in one batch must share a batch_key (size, steps, mask schedule, scheduler)"
            )
        check_generation(*jobs)  # the rules the API validated with, once per batch
        started = time.perf_counter()
        cond = job_conditioning(self.pipeline, jobs)
        latents = job_latents(self.pipeline, jobs)
        settings = LoopSettings(
            first.num_inference_steps,
            first.scheduler,
            first.mask_mode,
            first.mask_reused_step,
            timesteps=first.timesteps,
            eta=first.eta,
        )
        result = self.backend.denoise(self.pipeline, cond, latents, settings, self.on_step)
        return job_outputs(self.pipeline, jobs, result.latents, result.masks[-1], started)

    def warmup(self) -> None:
        """One small job end to end, so the first request does not pay for lazy initialisation."""
        size = 64 if self.model_name == "tiny" else self.pipeline.default_size
        job = GenerationJob(
            id="warmup",
            prompt="a photo of a dog",
            subjects=(SubjectInput(Image.new("RGB", (64, 64), (127, 127, 127)), "dog"),),
            width=size,
            height=size,
            num_inference_steps=2,
            mask_reused_step=1,
        )
        started = time.perf_counter()
        warm_up(self.backend)  # compile and capture the configured buckets first
        self.run([job])
        logger.info(
            "warm-up done in %.2f s (model %s, backend %s)",
            time.perf_counter() - started,
            self.model_name,
            self.backend_name,
        )


def load_runner(
    model: str = "tiny",
    backend: str = "eager",
    device: str | None = None,
    buckets: str | Sequence[str] | None = None,
    lora: BankLayout | None = None,
    schedulers: Sequence[str] = ("dpm",),
    uncond_prefixes: bool = False,
) -> Runner:
    """Load the model once and pick the backend (falling back to eager with a reason if needed).

    buckets: shapes the `compiled`/`tensorrt` backends prepare at warm-up, e.g.
    "1x1024x1024,4x1024x1024" (BATCHxHEIGHTxWIDTH[sSUBJECTS]); default: batch 1 at the model's size.
    lora: an adapter bank installed on the UNet before any state is allocated or step captured
    (per-row LoRA; adapters are loaded into it later, also after capture). TensorRT engines bind
    its slots as fp32 inputs.
    schedulers: the samplers whose steps the compiled/tensorrt backends capture (a family each;
    jobs of other samplers run alone). uncond_prefixes: the compiled backend also captures steps
    whose unconditional half covers a prefix of the rows (CFG-free rows; not for TensorRT, whose
    engines take both halves).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on GPUs, as the official pipeline runs (the SDXL VAE overflows in fp16).
    dtype = torch.bfloat16 if device.startswith("cuda") and model != "tiny" else torch.float32
    pipeline = load_pipeline(model, device=device, dtype=dtype)
    if lora is not None:
        lora.install(pipeline.unet, torch.float32 if backend == "tensorrt" else None)
    options = {}
    if backend != "eager":
        options["graph_settings"] = [GraphSettings(scheduler) for scheduler in schedulers]
        if buckets is not None:
            options["buckets"] = parse_buckets(buckets)
    if uncond_prefixes and backend == "tensorrt":
        raise ValueError("TensorRT engines run both halves of the generation pass: no unconditional prefixes")
    if uncond_prefixes and backend == "compiled":  # eager families capture them anyway
        options["partial_uncond"] = True
    return Runner(pipeline, select_backend(backend, pipeline, **options), model)
