"""Edge validation: a `CustomizeRequest` becomes a `JobSpec` or a 4xx `ApiError`.

Everything a worker could trip over is checked here, once, so inner layers only see valid jobs:
limits from the settings, every image decoded, every target phrase located in the prompt and the
prompt's token count.
"""

from __future__ import annotations

import secrets
import time
import uuid

from transformers import PreTrainedTokenizerBase

from realcustom.phrases import MAX_PROMPT_TOKENS, PhraseNotFoundError, count_prompt_tokens, locate_phrase
from service.errors import ApiError
from service.images import ImageRejectedError, decode_subject_image
from service.queue.protocol import JobSpec, SubjectSpec
from service.schemas import CustomizeRequest
from service.settings import Settings


def _reject(field: str, message: str, code: str = "invalid_request", status_code: int = 422) -> ApiError:
    return ApiError(status_code, code, message, field=field)


def _check_limits(request: CustomizeRequest, settings: Settings) -> None:
    for name in ("width", "height"):
        value = getattr(request, name)
        if not settings.min_side <= value <= settings.max_side:
            raise _reject(name, f"{name} must be between {settings.min_side} and {settings.max_side}")
    if request.num_inference_steps > settings.max_steps:
        raise _reject("num_inference_steps", f"num_inference_steps must be at most {settings.max_steps}")
    # A mask_reused_step past the last step is valid: the mask is then recomputed at every step.
    if request.mask_reused_step > settings.max_steps:
        raise _reject("mask_reused_step", f"mask_reused_step must be at most {settings.max_steps}")
    if request.num_images > settings.max_num_images:
        raise _reject("num_images", f"num_images must be at most {settings.max_num_images}")
    if len(request.subjects) > settings.max_subjects:
        raise _reject("subjects", f"send at most {settings.max_subjects} subjects")


def _check_prompt(request: CustomizeRequest, tokenizer: PreTrainedTokenizerBase) -> None:
    tokens = count_prompt_tokens(tokenizer, request.prompt)
    if tokens > MAX_PROMPT_TOKENS:
        raise _reject(
            "prompt",
            f"the prompt is {tokens} tokens long; the text encoder reads at most {MAX_PROMPT_TOKENS}. "
            "Shorten the prompt.",
            code="prompt_too_long",
        )
    for index, subject in enumerate(request.subjects):
        try:
            locate_phrase(tokenizer, request.prompt, subject.target)
        except PhraseNotFoundError as error:
            raise _reject(f"subjects[{index}].target", str(error), code="target_not_in_prompt") from None
        except ValueError as error:  # e.g. the phrase lies beyond the encoder's context
            raise _reject(f"subjects[{index}].target", str(error), code="prompt_too_long") from None


def _check_images(request: CustomizeRequest, settings: Settings) -> None:
    for index, subject in enumerate(request.subjects):
        field = f"subjects[{index}].image"
        if len(subject.image) > settings.max_image_bytes:
            raise _reject(
                field,
                f"the image is {len(subject.image)} bytes; the limit is {settings.max_image_bytes}. "
                "Send a smaller or more compressed image.",
                code="image_too_large",
                status_code=413,
            )
        try:
            decode_subject_image(
                subject.image, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side
            )
        except ImageRejectedError as error:
            raise _reject(field, str(error), code="invalid_image") from None


def build_job_spec(
    request: CustomizeRequest, settings: Settings, tokenizer: PreTrainedTokenizerBase
) -> JobSpec:
    """Validate a request and turn it into the job the queue carries."""
    _check_limits(request, settings)
    _check_prompt(request, tokenizer)
    _check_images(request, settings)
    now = time.time()
    return JobSpec(
        id=uuid.uuid4().hex,
        prompt=request.prompt,
        subjects=[SubjectSpec(image=subject.image, target=subject.target) for subject in request.subjects],
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        mask_scope=request.mask_scope,
        mask_reused_step=request.mask_reused_step,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        num_images=request.num_images,
        output_format=request.output_format,
        return_masks=request.return_masks,
        enqueued_at=now,
        deadline=now + settings.job_timeout_s,
    )
