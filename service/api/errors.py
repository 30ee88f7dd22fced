"""Exception handlers: every error reply has the shape of `ErrorResponse`."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import ApiError
from service.queue.protocol import QueueFullError, QueueUnavailableError
from service.validation import MAX_REPORTED_ERRORS

logger = logging.getLogger(__name__)

# nginx's "client closed request": recorded in metrics, never seen by the client that left.
CLIENT_GONE = 499


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


async def _client_gone(_request: Request, _error: Exception) -> Response:
    """The client left while its body was read (or the server cut a body past BODY_TIMEOUT_S):
    nobody reads this reply. Not an internal error: counted as 499 (nginx's "client closed
    request") in the request metrics, like a synchronous request whose client left."""
    return Response(status_code=CLIENT_GONE)


class InternalErrors:
    """Pure ASGI: an exception no handler took becomes a 500 `internal_error`, never with the
    exception's text (it may hold internals), with an id that the log has with the traceback.
    Unlike Starlette's last-resort handler, which re-raises to the server (uvicorn then drops the
    keep-alive connection), the request ends normally and the connection stays usable; once a
    reply has started nothing can replace it, so the exception goes on and the server closes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            if started:
                raise
            error_id = uuid.uuid4().hex[:12]
            logger.error(
                "internal error %s on %s %s", error_id, scope["method"], scope["path"], exc_info=error
            )
            reply = _reply(
                500, "internal_error", f"internal error {error_id}; quote this id when reporting it"
            )
            await reply(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(QueueUnavailableError, _queue_unavailable)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(QueueFullError, _limit_reached)
