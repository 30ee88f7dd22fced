"""Exception handlers: every error reply has the shape of `ErrorResponse`."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service import metrics
from service.errors import ApiError
from service.queue.protocol import QueueFullError, QueueUnavailableError
from service.validation import MAX_REPORTED_ERRORS

logger = logging.getLogger(__name__)


def _reply(
    status_code: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}},
        status_code=status_code,
        headers=headers,
    )


async def _api_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    metrics.REQUESTS_REJECTED.labels(error.code).inc()
    return _reply(error.status_code, error.code, error.message, error.field, error.headers)


async def _request_validation(_request: Request, error: Exception) -> JSONResponse:
    """Headers and path parameters (bodies are validated by service.validation)."""
    assert isinstance(error, RequestValidationError)
    errors = error.errors()
    parts = [
        f"`{'.'.join(str(p) for p in item['loc'])}`: {item['msg']}" for item in errors[:MAX_REPORTED_ERRORS]
    ]
    return _reply(422, "invalid_request", "; ".join(parts))


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return _reply(error.status_code, "http_error", str(error.detail), headers=error.headers)


async def _queue_unavailable(_request: Request, error: Exception) -> JSONResponse:
    logger.warning("queue unavailable: %s", error)
    return _reply(
        503, "queue_unavailable", "the job queue is unreachable; retry shortly", headers={"Retry-After": "1"}
    )


async def _limit_reached(_request: Request, error: Exception) -> JSONResponse:
    """A limit that a route did not map itself: still the 429 that names it, never a 500."""
    assert isinstance(error, QueueFullError)
    metrics.REQUESTS_REJECTED.labels(error.code).inc()
    return _reply(429, error.code, str(error), headers={"Retry-After": str(max(1, error.retry_after_s))})


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """Never the exception's text (it may hold internals): an id to find it in the log."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=error)
    return _reply(500, "internal_error", f"internal error {error_id}; quote this id when reporting it")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(QueueUnavailableError, _queue_unavailable)
    app.add_exception_handler(QueueFullError, _limit_reached)
