"""Between queue jobs (bytes, JSON) and the method's jobs (realcustom.jobs: PIL images)."""

from __future__ import annotations

import time

from realcustom.jobs import GenerationJob, GenerationOutput, SubjectInput
from realcustom.lora.requests import LoRAChoice
from service.images import encode_image
from service.queue.protocol import JobResult, JobSpec
from service.worker.subject_cache import TokenCache


def to_generation_job(spec: JobSpec, cache: TokenCache) -> GenerationJob:
    """The job as the method takes it; the references were decoded once, at the edge, and those
    whose tokens a worker computed before come with them (service/worker/subject_cache.py)."""
    subjects = tuple(
        SubjectInput(
            image=subject.to_image(),
            target=subject.target,
            token_indices=tuple(subject.token_indices),
            **cache.inputs(subject),
        )
        for subject in spec.subjects
    )
    return GenerationJob(
        id=spec.id,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        subjects=subjects,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        mask_scope=spec.mask_scope,
        mask_reused_step=spec.mask_reused_step,
        seed=spec.seed,
        num_images=spec.num_images,
        return_masks=spec.return_masks,
        scheduler=spec.scheduler,
        timesteps=None if spec.timesteps is None else tuple(spec.timesteps),
        eta=spec.eta,
        loras=tuple(LoRAChoice(lora.name, lora.scale) for lora in spec.loras),
    )


def to_result(
    spec: JobSpec, output: GenerationOutput, queue_wait_s: float, worker: str, prepare_s: float = 0.0
) -> JobResult:
    """Encode the images in the requested format (masks as PNG)."""
    return JobResult(
        images=[encode_image(image, spec.output_format) for image in output.images],
        masks=[encode_image(mask, "png") for mask in output.masks] if output.masks is not None else None,
        queue_wait_seconds=queue_wait_s,
        inference_seconds=output.inference_seconds,
        prepare_seconds=prepare_s,
        finished_at=time.time(),
        worker=worker,
    )
