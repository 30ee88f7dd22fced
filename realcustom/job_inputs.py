"""A job's loop inputs and outputs: the one conditioning builder of `GenerationJob`s.

Everything a job needs before its first step comes from here, in one call down from the engines
(`prepare_rows`: settings check, text, target tokens, reference tokens through the projector,
noise, every layer's image K/V), and its images come back through `job_outputs`. The pipeline's
single-request path (`RealCustomPipeline.__call__`) builds the same `Conditioning` from a call's
arguments; this module builds it for jobs, batched, subjects padded to the batch's maximum, each
row with its job's LoRA adapters (slots of the UNet's adapter bank) and, for a stochastic sampler
(LCM, TCD), its per-step noise drawn from the job's seed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from realcustom.jobs import GenerationJob, GenerationOutput
from realcustom.pipeline import RealCustomPipeline, mask_to_image
from realcustom.schedulers import TABLE_SCHEDULERS
from realcustom.settings_check import check_generation
from realcustom.step import Conditioning, ImageKeyValues, LoopState
from realcustom.tokenizer import CLIP_CONTEXT_LENGTH


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


@torch.no_grad()
def job_conditioning(pipeline: RealCustomPipeline, jobs: Sequence[GenerationJob]) -> Conditioning:
    """Per-sample conditioning of a batch: job j contributes `num_images` identical rows."""
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
    lora_index, lora_scale = _adapter_rows(pipeline, jobs)
    return Conditioning(
        prompt_embeds=per_sample(text.tokens),
        negative_prompt_embeds=per_sample(negative.tokens),
        pooled=per_sample(text.pooled),
        negative_pooled=per_sample(negative.pooled),
        time_ids=pipeline.time_ids(int(counts.sum()), height, width),
        image_tokens=per_sample(tokens),
        negative_image_tokens=per_sample(black),
        target_tokens=per_sample(targets),
        guidance_scale=per_sample(torch.tensor([job.guidance_scale for job in jobs], device=pipeline.device)),
        mask_scope=per_sample(
            torch.tensor([job.mask_scope for job in jobs], dtype=torch.float64, device=pipeline.device)
        ),
        lora_index=lora_index,
        lora_scale=lora_scale,
        step_noise=_step_noise(pipeline, jobs),
    )


def _adapter_rows(pipeline: RealCustomPipeline, jobs: Sequence[GenerationJob]) -> tuple:
    """Each row's adapter slots and scales ([rows, K]; None when no job names adapters)."""
    if not any(job.loras for job in jobs):
        return None, None
    bank = pipeline.unet.adapters
    if bank is None:
        raise ValueError("the job names LoRA adapters but this model serves none (no adapter bank)")
    return bank.rows([list(job.loras) for job in jobs for _ in range(job.num_images)])


def _step_noise(pipeline: RealCustomPipeline, jobs: Sequence[GenerationJob]) -> torch.Tensor | None:
    """A stochastic sampler's per-step noise of every row, from each job's own seed."""
    first = jobs[0]
    sampler = TABLE_SCHEDULERS.get(first.scheduler)
    if sampler is None or not sampler.stochastic:
        return None
    return pipeline.prepare_step_noise(
        [job.seed for job in jobs],
        [job.num_images for job in jobs],
        first.height,
        first.width,
        first.num_inference_steps,
    )


def job_latents(pipeline: RealCustomPipeline, jobs: Sequence[GenerationJob]) -> torch.Tensor:
    """Each job's noise from its own seed, so a job's image does not depend on its companions."""
    first = jobs[0]
    return pipeline.prepare_latents(
        [job.seed for job in jobs], [job.num_images for job in jobs], first.height, first.width
    )


@dataclass
class JobRows:
    """One job's loop inputs, one row per image: what joining a running batch copies in."""

    cond: Conditioning
    latents: torch.Tensor
    # Every layer's image K/V padded to the family's subject slots (LoopState.image_key_values).
    key_values: ImageKeyValues | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.cond.batch_size


@torch.no_grad()
def prepare_rows(pipeline: RealCustomPipeline, job: GenerationJob, subject_slots: int) -> JobRows:
    """All of one job's preparation, after the rules the API validated with (checked again here:
    a worker never trusts its queue)."""
    check_generation(job)
    cond = job_conditioning(pipeline, [job])
    key_values = LoopState.image_key_values(pipeline.unet, cond, subject_slots)
    return JobRows(cond, job_latents(pipeline, [job]), key_values)


@torch.no_grad()
def job_outputs(
    pipeline: RealCustomPipeline,
    jobs: Sequence[GenerationJob],
    latents: torch.Tensor,
    masks: torch.Tensor,
    started: float,
) -> list[GenerationOutput]:
    """Decode x̂₀ [rows, C, h, w] of `jobs` (rows in job order) and, where asked, their final masks
    [rows, S, h, w] (only each job's own subjects, image-major) at the image size. Inference time:
    from `started` (perf_counter) to the end of decoding."""
    images = pipeline.decode(latents)
    seconds = time.perf_counter() - started
    outputs, row = [], 0
    for job in jobs:
        rows = range(row, row + job.num_images)
        mask_images = None
        if job.return_masks:
            size = (job.width, job.height)
            mask_images = [mask_to_image(masks[i, s], size) for i in rows for s in range(len(job.subjects))]
        outputs.append(GenerationOutput([images[i] for i in rows], mask_images, seconds))
        row += job.num_images
    return outputs
