"""The runner: a batch of compatible jobs -> images, in one denoising loop.

preprocess (text, target tokens, reference tokens; padded to the batch's largest subject count)
-> denoise (the selected backend) -> decode. Each job's noise comes from its own seed, so a job
gives the same image alone or batched with others, up to floating-point reduction order (on the
CPU about one level in 1e-4 of the pixels differs when the batch composition changes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from engines.backends import Backend, select_backend
from engines.jobs import GenerationJob, GenerationOutput, SubjectInput
from engines.static_loop import parse_buckets
from realcustom.denoise import Conditioning, LoopSettings
from realcustom.loading import load_pipeline
from realcustom.pipeline import RealCustomPipeline, mask_to_image
from realcustom.settings_check import check_generation
from realcustom.tokenizer import CLIP_CONTEXT_LENGTH

logger = logging.getLogger(__name__)


def _pad_subjects(rows: list[torch.Tensor], count: int) -> torch.Tensor:
    """[S_j, ...] per job -> [jobs, count, ...], zero rows for missing subjects (they get zero masks)."""
    padded = [F.pad(row, (0, 0) * (row.ndim - 1) + (0, count - row.shape[0])) for row in rows]
    return torch.stack(padded)


def _target_rows(pipeline: RealCustomPipeline, job: GenerationJob) -> torch.Tensor:
    """τ rows [S, 77]: the token indices located at the edge (the job spec carries them), else
    located here (library callers, warm-up)."""
    if not all(subject.token_indices for subject in job.subjects):
        return pipeline.target_tokens(job.prompt, [subject.target for subject in job.subjects])
    rows = torch.zeros(len(job.subjects), CLIP_CONTEXT_LENGTH, dtype=pipeline.dtype, device=pipeline.device)
    for row, subject in zip(rows, job.subjects, strict=True):
        row[list(subject.token_indices)] = 1
    return rows


def _reference_tokens(
    pipeline: RealCustomPipeline, jobs: Sequence[GenerationJob]
) -> list[list[torch.Tensor]]:
    """Projected tokens of every subject of every job: precomputed ones as given (a subject cache),
    the others encoded, every distinct photo once (it may serve several phrases or jobs)."""
    missing = [subject for job in jobs for subject in job.subjects if subject.tokens is None]
    started = time.perf_counter()
    encoded = pipeline.reference_tokens([subject.image for subject in missing]) if missing else []
    seconds = (time.perf_counter() - started) / max(len({id(s.image) for s in missing}), 1)
    fresh = iter(encoded)
    rows = []
    for job in jobs:
        row = []
        for subject in job.subjects:
            if subject.tokens is not None:
                row.append(subject.tokens.to(pipeline.device, pipeline.dtype))
                continue
            tokens = next(fresh)
            if subject.on_encoded is not None:
                subject.on_encoded(tokens, seconds)
            row.append(tokens)
        rows.append(row)
    return rows


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
        return dict(getattr(self.backend, "stats", {}))

    @torch.no_grad()
    def conditioning(self, jobs: Sequence[GenerationJob]) -> Conditioning:
        """Per-sample conditioning of a batch: job j contributes `num_images` identical rows."""
        pipeline = self.pipeline
        counts = torch.tensor([job.num_images for job in jobs], device=pipeline.device)
        num_subjects = max(len(job.subjects) for job in jobs)

        text = pipeline.encode_prompt([job.prompt for job in jobs])
        negative = pipeline.negative_embeddings(len(jobs), jobs[0].negative_prompt)
        targets = _pad_subjects([_target_rows(pipeline, job) for job in jobs], num_subjects)
        tokens = _pad_subjects(
            [torch.stack(subject_tokens) for subject_tokens in _reference_tokens(pipeline, jobs)],
            num_subjects,
        )
        black = pipeline.black_image_tokens().unsqueeze(1).expand(len(jobs), num_subjects, -1, -1)

        def per_sample(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.repeat_interleave(counts, dim=0)

        width, height = jobs[0].width, jobs[0].height
        return Conditioning(
            prompt_embeds=per_sample(text.tokens),
            negative_prompt_embeds=per_sample(negative.tokens),
            pooled=per_sample(text.pooled),
            negative_pooled=per_sample(negative.pooled),
            time_ids=pipeline.time_ids(int(counts.sum()), height, width),
            image_tokens=per_sample(tokens),
            negative_image_tokens=per_sample(black),
            target_tokens=per_sample(targets),
            guidance_scale=per_sample(
                torch.tensor([job.guidance_scale for job in jobs], device=pipeline.device)
            ),
            mask_scope=per_sample(
                torch.tensor([job.mask_scope for job in jobs], dtype=torch.float64, device=pipeline.device)
            ),
        )

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
        cond = self.conditioning(jobs)
        latents = self.pipeline.prepare_latents(
            [job.seed for job in jobs], [job.num_images for job in jobs], first.height, first.width
        )
        settings = LoopSettings(
            first.num_inference_steps, first.scheduler, first.mask_mode, first.mask_reused_step
        )
        result = self.backend.denoise(self.pipeline, cond, latents, settings, self.on_step)
        images = self.pipeline.decode(result.latents)
        elapsed = time.perf_counter() - started

        outputs, row = [], 0
        for job in jobs:
            rows = range(row, row + job.num_images)
            masks = None
            if job.return_masks:
                size = (job.width, job.height)
                final = result.masks[-1]  # [B, S, h, w]
                masks = [mask_to_image(final[i, s], size) for i in rows for s in range(len(job.subjects))]
            outputs.append(GenerationOutput([images[i] for i in rows], masks, elapsed))
            row += job.num_images
        return outputs

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
        prepare = getattr(self.backend, "warmup", None)
        if prepare is not None:  # compile and capture the configured buckets first
            prepare()
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
) -> Runner:
    """Load the model once and pick the backend (falling back to eager with a reason if needed).

    buckets: shapes the `compiled`/`tensorrt` backends prepare at warm-up, e.g.
    "1x1024x1024,4x1024x1024" (BATCHxHEIGHTxWIDTH[sSUBJECTS]); default: batch 1 at the model's size.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on GPUs, as the official pipeline runs (the SDXL VAE overflows in fp16).
    dtype = torch.bfloat16 if device.startswith("cuda") and model != "tiny" else torch.float32
    pipeline = load_pipeline(model, device=device, dtype=dtype)
    options = {} if buckets is None or backend == "eager" else {"buckets": parse_buckets(buckets)}
    return Runner(pipeline, select_backend(backend, pipeline, **options), model)
