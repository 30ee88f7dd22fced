"""OpenAPI details FastAPI cannot infer: one body accepted as JSON or multipart/form-data."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.intake import LORA_FIELD, SUBJECT_ID_FIELD, SUBJECT_IMAGE_FIELD, SUBJECT_TARGET_FIELD
from service.schemas import CustomizeRequest, ErrorResponse, JobRequest

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in (
        (400, "Malformed body"),
        (401, "Missing or wrong API key"),
        (403, "The API key's tier does not allow this `priority`; an admin route without an admin key"),
        (404, "No such job of this caller"),
        (406, "The Accept header cannot be met"),
        (408, "The body took longer than BODY_TIMEOUT_S to arrive"),
        (409, "The job was cancelled / cannot be cancelled"),
        (413, "Body or image too large, or a body with too many JSON values"),
        (415, "Unsupported content type"),
        (
            422,
            "Invalid field, a request over the cost cap (`request_too_costly`), or an Idempotency-Key reused "
            "with another body: the message says what to change",
        ),
        (
            429,
            "A limit refuses the request for now (`code` names it: queue_full, key_queue_full, "
            "key_cost_in_flight, deadline_unmeetable, subjects_full, key_subjects_full, rate_limited, "
            "too_many_streams); see Retry-After",
        ),
        (500, "The generation failed, or an internal error (with an id to report)"),
        (503, "Queue unreachable; see Retry-After"),
        (
            504,
            "The job missed its deadline: a queued job is dropped, a running one finishes (GET /jobs/{id})",
        ),
    )
}
RAW_IMAGE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or the raw image with `Accept: image/png` (jpeg, webp) and one image.",
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("image/png", "image/jpeg", "image/webp")
        },
    }
}
# Each generation route's body model (/jobs adds the webhook fields).
_BODY_MODELS: dict[str, type[CustomizeRequest]] = {"/customize": CustomizeRequest, "/jobs": JobRequest}


def _multipart_schema(request_schema: dict[str, Any]) -> dict[str, Any]:
    properties = {
        name: field
        for name, field in request_schema["properties"].items()
        if name not in ("subjects", "loras")
    }
    properties[LORA_FIELD] = {
        "type": "array",
        "items": {"type": "string"},
        "description": "One per LoRA adapter: `name` (scale 1) or `name=scale`, e.g. `papercut=0.8`.",
    }
    properties[SUBJECT_IMAGE_FIELD] = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": "One reference image file per subject (PNG, JPEG or WebP).",
    }
    properties[SUBJECT_ID_FIELD] = {
        "type": "array",
        "items": {"type": "string"},
        "description": "In place of a file: the id of a subject stored with `POST /subjects`. Subjects "
        "are taken in the order their file or id fields appear.",
    }
    properties[SUBJECT_TARGET_FIELD] = {
        "type": "array",
        "items": {"type": "string"},
        "description": "The target phrase of each subject, in the order of the subjects.",
    }
    return {"type": "object", "properties": properties, "required": ["prompt", SUBJECT_TARGET_FIELD]}


def install_openapi(app: FastAPI) -> None:
    """Document the generation body under both content types, with examples."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in _BODY_MODELS.items():
            request_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(request_schema.pop("$defs", {}))
            components[model.__name__] = request_schema
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                    "multipart/form-data": {"schema": _multipart_schema(request_schema)},
                },
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
