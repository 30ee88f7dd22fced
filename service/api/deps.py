"""Request dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from transformers import PreTrainedTokenizerBase

from service.api.ratelimit import RateLimiter, retry_after_header
from service.errors import ApiError
from service.queue.protocol import JobQueue
from service.schemas import CustomizeRequest
from service.settings import Settings

# Multipart field names: one file and one target per subject, paired in order.
SUBJECT_IMAGE_FIELD = "subject_image"
SUBJECT_TARGET_FIELD = "subject_target"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_tokenizer(request: Request) -> PreTrainedTokenizerBase:
    return request.app.state.tokenizer


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
TokenizerDep = Annotated[PreTrainedTokenizerBase, Depends(get_tokenizer)]


def authenticate(
    request: Request,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="`Bearer <API key>` when keys are set.")] = None,
) -> str:
    """The caller's identity: its API key, or its address when the API is open."""
    if not settings.api_keys:
        return request.client.host if request.client else "anonymous"
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and any(secrets.compare_digest(token, key) for key in settings.api_keys):
        return token
    raise ApiError(
        401,
        "unauthorized",
        "send a valid API key as `Authorization: Bearer <key>`",
        headers={"WWW-Authenticate": "Bearer"},
    )


Caller = Annotated[str, Depends(authenticate)]


def enforce_rate_limit(request: Request, caller: Caller) -> str:
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        wait_s = limiter.acquire(caller)
        if wait_s > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests for this API key; retry in {wait_s:.1f} s",
                headers=retry_after_header(wait_s),
            )
    return caller


RateLimitedCaller = Annotated[str, Depends(enforce_rate_limit)]


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return f"unknown field `{field}`; remove it (see the request schema in /docs)"
    message = error["msg"].removeprefix("Value error, ")
    return f"`{field}`: {message}"


def validation_error(error: ValidationError) -> ApiError:
    errors = error.errors(include_url=False)
    first_field = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
    return ApiError(422, "invalid_request", "; ".join(map(_describe, errors)), field=first_field or None)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid number")


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body(), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({error})") from None


async def _multipart_body(request: Request, settings: Settings) -> dict[str, Any]:
    form = await request.form(max_files=settings.max_subjects, max_fields=64)
    images: list[bytes] = []
    targets: list[str] = []
    data: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name == SUBJECT_IMAGE_FIELD:
            if not isinstance(value, UploadFile):
                raise ApiError(422, "invalid_request", f"`{name}` must be a file upload", field=name)
            images.append(await value.read())
        elif name == SUBJECT_TARGET_FIELD:
            targets.append(str(value))
        elif isinstance(value, UploadFile):
            raise ApiError(
                422, "invalid_request", f"unexpected file `{name}`; upload images as `{SUBJECT_IMAGE_FIELD}`"
            )
        else:
            data[name] = value
    if len(images) != len(targets):
        raise ApiError(
            422,
            "invalid_request",
            f"send one `{SUBJECT_TARGET_FIELD}` per `{SUBJECT_IMAGE_FIELD}` file "
            f"(got {len(targets)} targets for {len(images)} images)",
            field=SUBJECT_TARGET_FIELD,
        )
    data["subjects"] = [
        {"image": image, "target": target} for image, target in zip(images, targets, strict=True)
    ]
    return data


async def read_customize_request(request: Request, settings: SettingsDep) -> CustomizeRequest:
    """The request body as JSON (images base64) or multipart/form-data (images as files)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        data = await _multipart_body(request, settings)
    elif content_type == "application/json":
        data = await _json_body(request)
    else:
        raise ApiError(
            415, "unsupported_media_type", "send the body as application/json or multipart/form-data"
        )
    try:
        return CustomizeRequest.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None


CustomizeBody = Annotated[CustomizeRequest, Depends(read_customize_request)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Repeating a request with the same key returns the same job.",
    ),
]
