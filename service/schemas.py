"""HTTP request and response bodies (pydantic), with the examples shown in the OpenAPI docs."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from service.images import OutputFormat
from service.queue.protocol import JobState, WebhookTarget
from service.webhooks.events import EVENTS, WebhookEvent
from service.webhooks.outbox import WebhookStatus

# Characters of base64 decoded per call (a multiple of 4, so chunks decode independently).
BASE64_CHUNK = 1 << 20
# 1x1 white PNG, small enough to keep the docs readable.
EXAMPLE_IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"


def _decode_base64(value: Any) -> Any:
    """Accept base64 text (optionally a data: URL) from JSON, raw bytes from multipart uploads."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("image must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        # In chunks: one call on a 30 MB string would hold the GIL (and stall the event loop) ~0.2 s.
        return b"".join(
            base64.b64decode(value[start : start + BASE64_CHUNK], validate=True)
            for start in range(0, len(value), BASE64_CHUNK)
        )
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64; send the file bytes base64-encoded") from None


ImageBytes = Annotated[
    bytes,
    BeforeValidator(_decode_base64),
    WithJsonSchema(
        {"type": "string", "format": "byte", "description": "PNG, JPEG or WebP file, base64-encoded."}
    ),
]


class SubjectIn(BaseModel):
    """One reference subject: its photo (or the id of one uploaded to `POST /subjects`) and the
    prompt phrase it is bound to."""

    model_config = ConfigDict(extra="forbid")

    image: ImageBytes | None = None
    subject_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Id from `POST /subjects` instead of `image`: the stored photo, encoded once.",
    )
    target: str = Field(
        min_length=1, max_length=200, description="Phrase of the prompt that names the subject, e.g. `cat`."
    )

    @model_validator(mode="after")
    def _one_reference(self) -> SubjectIn:
        if (self.image is None) == (self.subject_id is None):
            raise ValueError("give either `image` or `subject_id` (exactly one)")
        return self


class SubjectUpload(BaseModel):
    """A subject to store once and reuse by id (`POST /subjects`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image": EXAMPLE_IMAGE}]})

    image: ImageBytes


class SubjectInfo(BaseModel):
    """A stored subject: pass `id` as `subject_id` in place of an image."""

    id: str = Field(description="Derived from the normalised image, its owner and the model version.")
    expires_at: float = Field(description="Unix time it is dropped unless uploaded again.")
    width: int = Field(description="Width of the normalised (decoded) image.")
    height: int


class LoRAIn(BaseModel):
    """One LoRA adapter of a request and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=100, description="An adapter the deployment serves (`GET /v1/loras`)."
    )
    scale: float = Field(1.0, description="Its strength, within ±4: 1 = as trained, 0 = off.")


class CustomizeRequest(BaseModel):
    """A customisation request: the prompt, its subjects and the sampling parameters."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a cat in the snow",
                    "subjects": [{"image": EXAMPLE_IMAGE, "target": "cat"}],
                    "width": 1024,
                    "height": 1024,
                    "num_inference_steps": 25,
                    "guidance_scale": 3.5,
                    "seed": 42,
                    "output_format": "png",
                },
                {
                    "prompt": "a cat wearing a red scarf",
                    "subjects": [{"subject_id": "3f1c9a0e5b7d4c2a8e6f1b0d9c7a5e3b", "target": "cat"}],
                    "seed": 42,
                },
            ]
        },
    )

    # Numeric rules (sizes, steps, mask settings, counts) are the pipeline's own, checked with the
    # deployment's limits by realcustom.settings_check (service/validation.py), not repeated here.
    prompt: str = Field(min_length=1, max_length=2000, description="Text prompt; must contain every target.")
    negative_prompt: str | None = Field(
        None, max_length=2000, description="What to avoid; absent = the model's default negative prompt."
    )
    subjects: list[SubjectIn] = Field(
        min_length=1, description="Reference subjects (one or more, at most `MAX_SUBJECTS`)."
    )
    width: int | None = Field(
        None,
        description="Output width in pixels, a multiple of 32 within the service's limits; absent = the "
        "model's native size (`GET /v1/models`).",
    )
    height: int | None = Field(None, description="Output height in pixels; as `width`.")
    num_inference_steps: int = Field(25, description="Denoising steps, 1 to `MAX_STEPS`.")
    guidance_scale: float = Field(
        3.5,
        ge=0.0,
        le=30.0,
        description="Classifier-free guidance scale; at most 1 = no classifier-free guidance: the image "
        "follows the conditional prediction alone and each step computes one generation pass per image "
        "instead of two (what distilled few-step adapters expect; values below 1 no longer blend toward the "
        "unconditional "
        "prediction).",
    )
    mask_scope: float = Field(0.25, description="Share of the image the subject mask may cover, in (0, 1].")
    mask_reused_step: int = Field(
        12,
        description="Step (1 to `MAX_STEPS`) from which the subject mask is frozen and reused; at or "
        "past the last step the mask is recomputed at every step.",
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Random seed; random (and returned) when absent."
    )
    num_images: int = Field(1, description="Images generated for this prompt, 1 to `MAX_NUM_IMAGES`.")
    output_format: OutputFormat = Field(
        "png", description="Encoding of the returned images; absent = the image type of `Accept`, else PNG."
    )
    return_masks: bool = Field(False, description="Also return the subject masks (PNG).")
    loras: list[LoRAIn] = Field(
        default_factory=list,
        description="LoRA adapters applied to this request's images, each with its scale (at most "
        "`LORA_MAX_PER_REQUEST`, each named once; `GET /v1/loras` lists those served). Multipart: one "
        "`lora` field per adapter, `name` or `name=scale`.",
    )
    preset: str | None = Field(
        None,
        description="A fast-mode preset (`GET /v1/models` lists them, e.g. `sdxl-lightning-4step`): it sets "
        "`num_inference_steps`, the sampler, `guidance_scale` and `mask_reused_step` as its adapter family "
        "was distilled for; those fields must then be left out. The adapter itself is named in `loras`.",
    )
    priority: Literal["interactive", "batch"] | None = Field(
        None,
        description="`interactive` jobs are taken before `batch` jobs, which run when no interactive job "
        "waits (at least one every `BATCH_MAX_WAIT_S` while they wait). Absent = `interactive`, or `batch` "
        "for an API key whose tier allows only batch (403 `priority_not_allowed` for a priority the key's "
        "tier does not allow).",
    )


def _split_events(value: Any) -> Any:
    """A multipart form sends the events as one comma-separated field."""
    if isinstance(value, str):
        return [event.strip() for event in value.split(",") if event.strip()]
    return value


class JobRequest(CustomizeRequest):
    """A request of `POST /jobs`: a customisation, optionally announced by a webhook when it ends."""

    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="https URL POSTed a signed event (Standard Webhooks) when the job ends; it must "
        "resolve to public addresses. Verify it with the secret of `GET /webhooks/secret`.",
    )
    webhook_events: Annotated[list[WebhookEvent] | None, BeforeValidator(_split_events)] = Field(
        None,
        min_length=1,
        description="Events wanted among `job.completed`, `job.failed` (also sent when the job expired) "
        "and `job.cancelled`; absent = all.",
    )

    @model_validator(mode="after")
    def _events_need_url(self) -> JobRequest:
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events is set without webhook_url; add the URL or drop the events")
        return self

    def webhook(self) -> WebhookTarget | None:
        if self.webhook_url is None:
            return None
        return WebhookTarget(url=self.webhook_url, events=list(dict.fromkeys(self.webhook_events or EVENTS)))


class Timings(BaseModel):
    """Where the time went, in seconds."""

    queue_wait: float = Field(
        description="From acceptance until the job's first denoising step on a worker (includes `prepare`)."
    )
    prepare: float = Field(
        0.0,
        description="Preparing the job to join a running batch: its references as images, token-cache "
        "lookup, text and reference encoding, projector, image K/V, noise (overlapping other jobs' steps).",
    )
    inference: float = Field(description="From the job's first denoising step until its images were decoded.")
    total: float = Field(description="From the request's arrival until the reply (synchronous calls).")


class CustomizeResponse(BaseModel):
    """The generated images of one request."""

    id: str
    images: list[str] = Field(description="Base64-encoded images in `output_format`.")
    masks: list[str] | None = Field(None, description="Base64 PNG subject masks when `return_masks`.")
    seed: int
    output_format: OutputFormat
    timings: Timings


class JobAccepted(BaseModel):
    """Reply of `POST /jobs`: where to look for the result."""

    id: str
    status: JobState
    url: str = Field(description="Path of `GET /jobs/{id}` (also the `Location` header).")


class JobStatusResponse(BaseModel):
    """State of an asynchronous job, with its result when done."""

    id: str
    status: JobState
    worker: str | None = Field(None, description="The worker that ran (or runs) the job.")
    error: str | None = None
    result: CustomizeResponse | None = None
    webhook: WebhookStatus | None = Field(
        None, description="The job's webhook once it is due: its delivery state, attempts and last error."
    )
    message: str | None = Field(
        None, description="What happens next, when that is not plain from `status` (e.g. a cancelling job)."
    )


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. `invalid_image`, `queue_full`.")
    message: str = Field(description="What is wrong and what to change.")
    field: str | None = Field(None, description="The request field at fault, when there is one.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    status: Literal["ok", "not_ready", "failing"]
    detail: dict[str, Any] = Field(default_factory=dict)


class PresetInfo(BaseModel):
    """A fast-mode preset a request selects with `preset`."""

    name: str
    family: str = Field(description="The distilled adapter family it is for.")
    scheduler: str = Field(description="Its sampler: `euler` (trailing), `lcm`, `tcd` or `ddim`.")
    num_inference_steps: int
    guidance_scale: float = Field(description="At most 1: CFG-free (one generation pass per image).")
    mask_reused_step: int = Field(description="Masks are computed at the steps before it, reused after.")
    adapter: str = Field(description="Where its authors publish the adapter (an operator loads it).")


class ModelInfo(BaseModel):
    """The model the workers serve, as the API knows it."""

    model: str = Field(description="`MODEL`: a spec name or a checkpoint directory.")
    native_size: int = Field(description="Width and height used when a request gives none.")
    min_side: int
    max_side: int
    max_steps: int
    max_num_images: int
    max_subjects: int
    max_request_cost: float | None = Field(
        description="Largest cost of one request, in megapixel-steps (width x height / 10^6 x "
        "num_inference_steps x num_images, +3 % per extra subject, x 0.6 without CFG, +0.084 % per LoRA "
        "rank): `MAX_REQUEST_COST`; null = no cap."
    )
    presets: list[PresetInfo] = Field(default_factory=list, description="Fast-mode presets (`preset`).")


class LoRALoad(BaseModel):
    """An adapter to load on every worker (`POST /v1/loras`, operators only)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "papercut"}]})

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="The name requests use; 1-100 letters, digits, '.', '_' or '-'.",
    )
    source: str | None = Field(
        None,
        max_length=300,
        description="A name in the workers' `LORA_DIR`, or a hub id of `LORA_HUB_IDS`; absent = `name` in "
        "`LORA_DIR`. Never a URL or a path.",
    )


class AdapterWorker(BaseModel):
    worker: str
    slot: int = Field(description="The bank slot the adapter occupies on that worker.")


class AdapterInfo(BaseModel):
    """One adapter as the workers report it."""

    name: str
    source: str = Field(description="Where the workers load it from (a name in LORA_DIR or a hub id).")
    status: Literal["loaded", "loading", "failed", "unloading"] = Field(
        description="`loaded` on every worker reporting (requests may name it), `loading`, `failed` (see "
        "`error`), or `unloading` (no longer served; freed once no running request uses it)."
    )
    rank: int | None = Field(None, description="Its LoRA rank, once a worker read it.")
    modules: int | None = Field(None, description="How many UNet layers it changes.")
    target_modules: list[str] = Field(
        default_factory=list,
        description="The kinds of layers it changes, e.g. `attn1.to_q`, `ff.net.0.proj`.",
    )
    workers: list[AdapterWorker] = Field(default_factory=list, description="Where it is loaded.")
    error: str | None = None


class AdapterListing(BaseModel):
    """The adapters served and the limits on them (`GET /v1/loras`)."""

    enabled: bool = Field(description="The workers have adapter banks (`LORA_SLOTS` > 0).")
    slots: int = Field(description="Adapters a worker holds at once (`LORA_SLOTS`).")
    max_rank: int
    max_per_request: int
    targets: str = Field(description="Layers adapters may change (`LORA_TARGETS`).")
    workers: int = Field(description="Workers reporting their adapters now.")
    adapters: list[AdapterInfo]
