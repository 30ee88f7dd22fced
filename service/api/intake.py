"""From an HTTP request to an enqueued job, with bounded memory and off the event loop.

A bounded number of requests read, validate and enqueue at once (`INTAKE_CONCURRENCY`, at most
`INTAKE_CONCURRENCY_PER_KEY` per API key, waiting keys served round robin: service/fair_slots.py):
the others wait with their bodies still in the kernel's socket buffers, so at most that many JSON
bodies and decoded jobs sit in memory. Parsing and the tokenizer run in a worker thread, images
are decoded by `DECODE_CONCURRENCY` decoder processes (service/decoders.py, fair across keys
too), so the event loop keeps answering probes. Multipart uploads are spooled to disk by the form
parser and read in the worker thread.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from transformers import PreTrainedTokenizerBase

from service.adapters import AdapterRegistry, served
from service.api import results
from service.api.ratelimit import retry_after_header
from service.cancelling import cancel_in_background
from service.decoders import DecoderPool
from service.errors import ApiError
from service.fair_slots import AsyncFairSlots
from service.images import MEDIA_TYPES
from service.queue.protocol import JobQueue, JobRecord
from service.schemas import CustomizeRequest, JobRequest, SubjectUpload
from service.settings import DEFAULT_TIER, Settings
from service.subjects.resolve import resolve_subjects
from service.subjects.store import SubjectStore
from service.validation import build_job_spec, decode_upload, parse_json, parse_request, validation_error
from service.webhooks.submission import check_webhook_url

# Multipart field names: one file and one target per subject, paired in order.
SUBJECT_IMAGE_FIELD = "subject_image"
SUBJECT_TARGET_FIELD = "subject_target"
# In place of a file: a subject stored with `POST /subjects` (in the subjects' order, like the files).
SUBJECT_ID_FIELD = "subject_id"
# One per adapter: `name` or `name=scale` (the JSON body's `loras`).
LORA_FIELD = "lora"
# The multipart file of `POST /subjects`.
SUBJECT_UPLOAD_FIELD = "image"
# Non-file multipart fields: the request has about fifteen.
MAX_FORM_FIELDS = 64


@dataclass(frozen=True)
class Accepted:
    """An enqueued job and how to answer. The job's spec (the decoded references) is not kept: a
    synchronous request waits for its result holding only the record."""

    record: JobRecord
    raw_media_type: str | None  # answer with the raw image of this type; None = JSON
    arrived: float  # time.perf_counter() when the intake began (timings' `total` counts from it)


class Intake:
    def __init__(self, settings: Settings, tokenizer: PreTrainedTokenizerBase) -> None:
        self._settings = settings
        self._tokenizer = tokenizer
        self._slots = AsyncFairSlots(settings.intake_concurrency, settings.intake_concurrency_per_key)
        # Jobs ready but for their webhook host's resolution, waiting outside the slots.
        self._resolving = asyncio.Semaphore(settings.intake_concurrency)
        self.decoders = DecoderPool(settings)

    def close(self) -> None:
        self.decoders.close()

    async def enqueue(
        self,
        request: Request,
        owner: str,
        queue: JobQueue,
        idempotency_key: str | None,
        subjects: SubjectStore,
        accept: str | None = None,
        model: type[CustomizeRequest] = CustomizeRequest,
        tier: str = DEFAULT_TIER,
        adapters: AdapterRegistry | None = None,
    ) -> Accepted:
        """Read, validate (as a `model`) and enqueue within one slot, for a caller of key class
        `tier`. `accept`: the Accept header of a route that may answer with a raw image."""
        arrived = time.perf_counter()
        async with self._slots.hold(owner):
            data = await self._read_in_time(request)
            parsed, raw_media_type = await run_in_threadpool(self._parse, data, accept, model)
            del data
            webhook = self._check_webhook(parsed)
            try:
                stored = await resolve_subjects(parsed, owner, subjects)
                # What the workers serve, read only for requests that name adapters.
                ranks = await served(adapters, self._settings) if parsed.loras and adapters else {}
                spec = await run_in_threadpool(
                    build_job_spec,
                    parsed,
                    self._settings,
                    self._tokenizer,
                    owner,
                    self.decoders,
                    stored,
                    tier,
                    ranks,
                )
            except BaseException as error:
                cancel_in_background(webhook)
                if isinstance(error, ApiError):
                    results.count_refusal(error, tier, parsed.priority or "")
                raise
            del parsed
            if webhook.done():
                await webhook
                return Accepted(await results.submit(queue, spec, idempotency_key), raw_media_type, arrived)
            if self._resolving.locked():
                cancel_in_background(webhook)
                raise ApiError(
                    503,
                    "webhook_checks_busy",
                    "too many webhook hosts are being resolved at once; retry shortly",
                    field="webhook_url",
                    headers=retry_after_header(1),
                )
            await self._resolving.acquire()
        try:
            await webhook
            return Accepted(await results.submit(queue, spec, idempotency_key), raw_media_type, arrived)
        finally:
            self._resolving.release()

    def _check_webhook(self, request: CustomizeRequest) -> asyncio.Future[None]:
        """The check of the request's webhook URL, started now (it resolves the host)."""
        target = request.webhook() if isinstance(request, JobRequest) else None
        if target is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        check = asyncio.ensure_future(check_webhook_url(target.url, self._settings))
        # A check cancelled or never awaited (the request failed first) must not log its error.
        check.add_done_callback(lambda task: task.cancelled() or task.exception())
        return check

    async def decode_subject(self, request: Request, owner: str) -> Image.Image:
        """`POST /subjects`: its one photo (JSON `image` or multipart file `image`), decoded as
        `/customize` decodes references, within one intake slot of `owner`."""
        async with self._slots.hold(owner):
            data = await self._read_in_time(request, subject_upload=True)
            return await run_in_threadpool(self._decode_subject, data, owner)

    def _decode_subject(self, data: Any, owner: str) -> Image.Image:
        if isinstance(data, bytes):
            data = parse_json(data)
        try:
            upload = SubjectUpload.model_validate(data)
        except ValidationError as error:
            raise validation_error(error) from None
        return decode_upload(upload.image, "image", self._settings, self.decoders, owner)

    async def _read_in_time(self, request: Request, subject_upload: bool = False) -> Any:
        """The body, or 408 when it takes longer than BODY_TIMEOUT_S to arrive."""
        try:
            async with asyncio.timeout(self._settings.body_timeout_s):
                return await self._read(request, subject_upload)
        except TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"the request body took longer than {self._settings.body_timeout_s:.0f} s to arrive",
                headers={"Connection": "close"},  # the rest of the body may still come: no next request
            ) from None

    async def _read(self, request: Request, subject_upload: bool = False) -> Any:
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            return await (self._read_subject_form if subject_upload else self._read_form)(request)
        if content_type == "application/json":
            # Not request.body(): it caches the body on the request, which a synchronous request
            # holds until its job ends (measured: +1.4x the body per waiting request).
            return b"".join([chunk async for chunk in request.stream()])
        raise ApiError(
            415, "unsupported_media_type", "send the body as application/json or multipart/form-data"
        )

    async def _read_form(self, request: Request) -> dict[str, Any]:
        form = await request.form(max_files=self._settings.max_subjects, max_fields=MAX_FORM_FIELDS)
        references: list[UploadFile | str] = []  # each subject's file or stored id, in order
        targets: list[str] = []
        loras: list[dict[str, str]] = []
        data: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name == SUBJECT_IMAGE_FIELD:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", f"`{name}` must be a file upload", field=name)
                references.append(value)
            elif name == SUBJECT_ID_FIELD:
                if isinstance(value, UploadFile):
                    raise ApiError(
                        422, "invalid_request", f"`{name}` is text: a stored subject's id", field=name
                    )
                references.append(value)
            elif name == SUBJECT_TARGET_FIELD:
                targets.append(str(value))
            elif name == LORA_FIELD and not isinstance(value, UploadFile):
                adapter, has_scale, scale = value.partition("=")
                loras.append({"name": adapter, "scale": scale} if has_scale else {"name": adapter})
            elif isinstance(value, UploadFile):
                raise ApiError(
                    422,
                    "invalid_request",
                    f"unexpected file `{name}`; upload images as `{SUBJECT_IMAGE_FIELD}`",
                )
            else:
                data[name] = value
        if len(references) != len(targets):
            raise ApiError(
                422,
                "invalid_request",
                f"send one `{SUBJECT_TARGET_FIELD}` per subject (a `{SUBJECT_IMAGE_FIELD}` file or a "
                f"`{SUBJECT_ID_FIELD}`; got {len(targets)} targets for {len(references)} subjects)",
                field=SUBJECT_TARGET_FIELD,
            )
        data["subjects"] = list(zip(references, targets, strict=True))
        if loras:
            data["loras"] = loras
        return data

    async def _read_subject_form(self, request: Request) -> dict[str, Any]:
        form = await request.form(max_files=1, max_fields=1)
        upload = form.get(SUBJECT_UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise ApiError(
                422, "invalid_request", f"upload the photo as the file field `{SUBJECT_UPLOAD_FIELD}`"
            )
        try:
            if upload.size is not None and upload.size > self._settings.max_image_bytes:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"the image is {upload.size} bytes; the limit is {self._settings.max_image_bytes}. "
                    "Send a smaller or more compressed image.",
                    field=SUBJECT_UPLOAD_FIELD,
                )
            return {"image": await upload.read()}
        finally:
            await upload.close()

    def _read_files(self, data: dict[str, Any]) -> None:
        """Multipart: the spooled files, read here (in the worker thread), each checked by size first."""
        subjects, uploads = [], data["subjects"]
        try:
            for index, (upload, target) in enumerate(uploads):
                if isinstance(upload, str):
                    subjects.append({"subject_id": upload, "target": target})
                    continue
                if upload.size is not None and upload.size > self._settings.max_image_bytes:
                    raise ApiError(
                        413,
                        "image_too_large",
                        f"the image is {upload.size} bytes; the limit is {self._settings.max_image_bytes}. "
                        "Send a smaller or more compressed image.",
                        field=f"subjects[{index}].image",
                    )
                upload.file.seek(0)
                subjects.append({"image": upload.file.read(), "target": target})
        finally:
            # The request (and its form) lives until the job ends: free the spooled files now.
            for upload, _target in uploads:
                if not isinstance(upload, str):
                    upload.file.close()
        data["subjects"] = subjects

    def _parse(
        self, data: Any, accept: str | None, model: type[CustomizeRequest]
    ) -> tuple[CustomizeRequest, str | None]:
        if isinstance(data, bytes):
            data = parse_json(data)
        else:
            self._read_files(data)
        request = parse_request(data, self._settings, model)
        del data  # the parsed body: only the request model is needed from here on
        raw_media_type = negotiate(accept, request) if accept is not None else None
        if raw_media_type is not None:
            output_format = next(name for name, media in MEDIA_TYPES.items() if media == raw_media_type)
            request = request.model_copy(update={"output_format": output_format})
        return request, raw_media_type


JSON_TYPES = {"application/json", "application/*", "*/*"}


def negotiate(accept: str, request: CustomizeRequest) -> str | None:
    """The media type of a raw-image reply, None for JSON, or 406 when Accept cannot be met.

    An image type in Accept asks for the raw bytes of one image; with `output_format` absent the
    image is encoded in that type, with it set they must agree.
    """
    accepted = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    if not accepted or any(media in JSON_TYPES for media in accepted):
        return None
    wanted = [media for media in accepted if media in MEDIA_TYPES.values() or media == "image/*"]
    if not wanted:
        raise ApiError(
            406,
            "not_acceptable",
            "this endpoint answers application/json or image/png, image/jpeg, image/webp; "
            f"Accept is {accept!r}",
        )
    if request.num_images != 1:
        raise ApiError(
            406, "not_acceptable", "a raw image reply holds one image; set num_images to 1 or accept JSON"
        )
    if request.return_masks:
        raise ApiError(
            406,
            "not_acceptable",
            "masks are only returned in the JSON reply; accept application/json to get them, "
            "or drop return_masks",
        )
    produced = MEDIA_TYPES[request.output_format]
    if "output_format" not in request.model_fields_set:
        return produced if "image/*" in wanted else wanted[0]
    if "image/*" not in wanted and produced not in wanted:
        raise ApiError(
            406,
            "not_acceptable",
            f"Accept asks for {', '.join(wanted)} but output_format is {request.output_format}; "
            "make them match",
        )
    return produced
