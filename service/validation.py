"""Edge validation: a request body becomes a `JobSpec` or a 4xx `ApiError`.

Everything a worker could trip over is checked here, once, so inner layers only see valid jobs:
the settings with the pipeline's own rules (`realcustom.settings_check`) plus the deployment's
limits, a fast-mode preset expanded (`realcustom.presets`), the adapters against the rules and the
names the workers serve (`realcustom.lora.requests`), every target located in the prompt, every
reference decoded (`realcustom.decoding`, the decoder of every entry point). The job carries the
located tokens and the decoded references, so workers neither tokenize nor decode. CPU-heavy: the
API runs it in a worker thread (service/api/intake.py), never on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

from PIL import Image
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from realcustom.cost import generation_cost
from realcustom.decoding import ImageRejectedError
from realcustom.lora.requests import LoRAChoice, check_loras
from realcustom.native_size import native_size
from realcustom.phrases import PromptTooLongError, check_prompt_length, locate_phrase
from realcustom.presets import PRESETS, FastPreset
from realcustom.settings_check import Limits, SettingsError, check_generation
from service.decoders import DecoderPool
from service.errors import ApiError
from service.queue.protocol import JobSpec, LoRASpec, SubjectSpec
from service.schemas import CustomizeRequest, JobRequest
from service.settings import DEFAULT_TIER, Settings
from service.subjects.store import Subject

# A 422 lists this many problems, then how many more there are: its size stays bounded.
MAX_REPORTED_ERRORS = 5
# JSON values a body may hold (counted by its commas, which base64 never contains): a request is
# a few fields, its subjects and two prompts of at most 2000 characters.
MAX_JSON_SEPARATORS = 5000


def _reject(
    field: str | None, message: str, code: str = "invalid_request", status_code: int = 422
) -> ApiError:
    return ApiError(status_code, code, message, field=field)


def parse_json(body: bytes) -> Any:
    """JSON with bounded work: the number of values is checked before parsing, nesting bounded."""
    if body.count(b",") > MAX_JSON_SEPARATORS:
        raise _reject(
            None,
            f"the body holds more than {MAX_JSON_SEPARATORS} JSON values; a request is a prompt, a few "
            "settings and a handful of subjects",
            code="body_too_complex",
            status_code=413,
        )
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise _reject(
            None, "the JSON body is nested too deeply", code="invalid_json", status_code=400
        ) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise _reject(
            None, f"the body is not valid JSON ({error})", code="invalid_json", status_code=400
        ) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid number")


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return f"unknown field `{field}`; remove it (see the request schema in /docs)"
    message = error["msg"].removeprefix("Value error, ")
    return f"`{field}`: {message}"


def validation_error(error: ValidationError) -> ApiError:
    """The first few problems and how many more: the reply stays small whatever the body."""
    errors = error.errors(include_url=False, include_input=False)
    parts = [_describe(item) for item in errors[:MAX_REPORTED_ERRORS]]
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more problems")
    first_field = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
    return _reject(first_field or None, "; ".join(parts))


def parse_request(
    data: Any, settings: Settings, model: type[CustomizeRequest] = CustomizeRequest
) -> CustomizeRequest:
    """The body as a `model` (`JobRequest` for /jobs); the subject count is checked before any subject is."""
    subjects = data.get("subjects") if isinstance(data, dict) else None
    if isinstance(subjects, list) and len(subjects) > settings.max_subjects:
        raise _reject("subjects", f"send at most {settings.max_subjects} subjects (got {len(subjects)})")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None


def limits(settings: Settings) -> Limits:
    return Limits(settings.min_side, settings.max_side, settings.max_steps, settings.max_num_images)


def _check_settings(request: CustomizeRequest, settings: Settings) -> None:
    try:
        check_generation(request, limits=limits(settings))
    except SettingsError as error:
        raise _reject(error.field, str(error)) from None


def _check_priority(request: CustomizeRequest, settings: Settings, tier: str) -> str:
    """The job's priority: the one asked for, if the caller's tier allows it, else the tier's default."""
    allowed = settings.tier_policy(tier).priorities
    if request.priority is None:
        return allowed[0]
    if request.priority not in allowed:
        raise ApiError(
            403,
            "priority_not_allowed",
            f"this API key may send {' or '.join(allowed)} jobs, not {request.priority}; set `priority` to "
            f"{allowed[0]} (or leave it out)",
            field="priority",
        )
    return request.priority


# What a preset sets (a request that selects one leaves these out).
PRESET_FIELDS = ("num_inference_steps", "guidance_scale", "mask_reused_step")


def _apply_preset(request: CustomizeRequest) -> tuple[CustomizeRequest, FastPreset | None]:
    """The request with its preset's steps, guidance and mask schedule, and the preset (sampler,
    timesteps, eta); 422 for an unknown preset or a field the preset sets given beside it."""
    if request.preset is None:
        return request, None
    chosen = PRESETS.get(request.preset)
    if chosen is None:
        raise _reject(
            "preset",
            f"unknown preset {request.preset!r}; choose one of {', '.join(sorted(PRESETS))} (GET /v1/models)",
            code="unknown_preset",
        )
    for field in PRESET_FIELDS:
        if field in request.model_fields_set:
            raise _reject(
                field,
                f"preset {chosen.name!r} sets {field} ({chosen.settings()[field]}); leave {field} out or "
                "drop the preset",
            )
    values = chosen.settings()
    return request.model_copy(update={field: values[field] for field in PRESET_FIELDS}), chosen


def _check_loras(request: CustomizeRequest, settings: Settings, served: Mapping[str, int]) -> list[LoRASpec]:
    """The request's adapters with their ranks, by the rules the workers apply
    (realcustom/lora/requests.py) and the names they serve."""
    choices = [LoRAChoice(lora.name, lora.scale) for lora in request.loras]
    try:
        check_loras(choices, settings.lora_max_per_request, served=served)
    except SettingsError as error:
        if settings.lora_slots == 0 and error.code == "unknown_lora":
            raise _reject(
                "loras", "this deployment serves no LoRA adapters (LORA_SLOTS is 0)", code="unknown_lora"
            ) from None
        raise _reject(error.field, str(error), code=error.code) from None
    return [LoRASpec(name=choice.name, scale=choice.scale, rank=served[choice.name]) for choice in choices]


def _check_cost(request: CustomizeRequest, settings: Settings, lora_rank: int) -> float:
    """The request's cost (realcustom/cost.py), or 422 past the cost cap of one request."""
    cost = generation_cost(request, len(request.subjects), lora_rank)
    cap = settings.request_cost_cap
    if cost > cap:
        raise _reject(
            None,
            f"this request costs {cost:.4g} megapixel-steps (width x height / 10^6 x num_inference_steps x "
            "num_images, +3 % per extra subject, x 0.6 without CFG, +0.084 % per LoRA rank); one request "
            f"may cost at most {cap:.4g}. Lower the size, the steps or the number of images",
            code="request_too_costly",
        )
    return cost


def _locate_targets(request: CustomizeRequest, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token indices of every target (the phrases' one implementation: realcustom.phrases)."""
    for field, prompt in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        try:
            if prompt is not None:
                check_prompt_length(tokenizer, prompt)
        except PromptTooLongError as error:
            raise _reject(field, str(error), code="prompt_too_long") from None
    located = []
    for index, subject in enumerate(request.subjects):
        field = f"subjects[{index}].target"
        try:
            located.append(locate_phrase(tokenizer, request.prompt, subject.target))
        except PromptTooLongError as error:
            raise _reject(field, str(error), code="prompt_too_long") from None
        except ValueError as error:  # PhraseNotFoundError
            raise _reject(field, str(error), code="target_not_in_prompt") from None
    return located


def decode_upload(
    data: bytes, field: str, settings: Settings, decoders: DecoderPool, owner: str
) -> Image.Image:
    """One uploaded photo, size-checked, then decoded by a decoder process in `owner`'s fair turn
    (its cost bounded by its header, then by the process's limits)."""
    if len(data) > settings.max_image_bytes:
        raise _reject(
            field,
            f"the image is {len(data)} bytes; the limit is {settings.max_image_bytes}. "
            "Send a smaller or more compressed image.",
            code="image_too_large",
            status_code=413,
        )
    try:
        return decoders.decode(data, owner)
    except ImageRejectedError as error:  # invalid_image, or image_too_complex past a cost bound
        raise _reject(field, str(error), code=error.code) from None


def _decode_images(
    request: CustomizeRequest,
    settings: Settings,
    decoders: DecoderPool,
    owner: str,
    stored: dict[str, Subject],
) -> list[tuple[Image.Image, bool]]:
    """(image, from a stored subject) per subject: each distinct upload decoded once, stored
    subjects (`stored`, by id, looked up by the intake) read as they were normalised."""
    decoded: dict[bytes, Image.Image] = {}
    references = []
    for index, subject in enumerate(request.subjects):
        if subject.image is None:
            found = stored[subject.subject_id]
            references.append((Image.frombytes("RGB", (found.width, found.height), found.image), True))
            continue
        if subject.image not in decoded:
            field = f"subjects[{index}].image"
            decoded[subject.image] = decode_upload(subject.image, field, settings, decoders, owner)
        references.append((decoded[subject.image], False))
    return references


def request_hash(request: CustomizeRequest) -> str:
    """Hash of the canonical request (images by their digest): what an Idempotency-Key stands for."""
    # Unset options (None) leave no trace, so `/customize` and `/jobs` (which adds webhook options)
    # hash the same request alike.
    canonical = request.model_dump(mode="json", exclude={"subjects"}, exclude_none=True)
    canonical["subjects"] = [
        {"target": subject.target, "subject_id": subject.subject_id}
        if subject.image is None
        else {"target": subject.target, "image_sha256": hashlib.sha256(subject.image).hexdigest()}
        for subject in request.subjects
    ]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def build_job_spec(
    request: CustomizeRequest,
    settings: Settings,
    tokenizer: PreTrainedTokenizerBase,
    owner: str,
    decoders: DecoderPool,
    stored: dict[str, Subject] | None = None,
    tier: str = DEFAULT_TIER,
    adapters: Mapping[str, int] | None = None,
) -> JobSpec:
    """Validate a request and turn it into the job the queue carries (owned by `owner`, of key class
    `tier`); `stored`: the subjects its `subject_id`s name, already looked up (and owned by `owner`);
    `adapters`: the adapters the workers serve, name -> rank (service/adapters.py)."""
    size = native_size(settings.model)
    request = request.model_copy(
        update={
            "width": size if request.width is None else request.width,
            "height": size if request.height is None else request.height,
        }
    )
    request, fast = _apply_preset(request)
    _check_settings(request, settings)
    priority = _check_priority(request, settings, tier)
    loras = _check_loras(request, settings, adapters or {})
    _check_cost(request, settings, sum(lora.rank for lora in loras))
    token_indices = _locate_targets(request, tokenizer)
    references = _decode_images(request, settings, decoders, owner, stored or {})
    now = time.time()
    return JobSpec(
        id=uuid.uuid4().hex,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        subjects=[
            SubjectSpec.from_image(image, subject.target, indices, shared)
            for (image, shared), subject, indices in zip(
                references, request.subjects, token_indices, strict=True
            )
        ],
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
        owner=owner,
        request_hash=request_hash(request),
        webhook=request.webhook() if isinstance(request, JobRequest) else None,
        priority=priority,
        tier=tier,
        weight=settings.tier_policy(tier).weight,
        scheduler=fast.scheduler if fast else "dpm",
        timesteps=list(fast.timesteps) if fast and fast.timesteps else None,
        eta=fast.eta if fast else None,
        loras=loras,
        preset=fast.name if fast else None,
    )
