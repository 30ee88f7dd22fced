"""Request dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from service.adapters import AdapterRegistry
from service.api.intake import Accepted, Intake
from service.api.ratelimit import RateLimiter, retry_after_header
from service.errors import ApiError
from service.queue.protocol import JobQueue
from service.schemas import JobRequest
from service.settings import DEFAULT_TIER, Settings
from service.subjects.store import SubjectStore
from service.webhooks.outbox import Outbox


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_webhooks(request: Request) -> Outbox:
    return request.app.state.webhooks


def get_subjects(request: Request) -> SubjectStore:
    return request.app.state.subjects


def get_adapters(request: Request) -> AdapterRegistry:
    return request.app.state.adapters


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
WebhooksDep = Annotated[Outbox, Depends(get_webhooks)]
SubjectsDep = Annotated[SubjectStore, Depends(get_subjects)]
AdaptersDep = Annotated[AdapterRegistry, Depends(get_adapters)]


def _key_matches(token: str, keys: list[str]) -> bool:
    # As bytes: compare_digest rejects non-ASCII str, and a header may carry any latin-1 text.
    presented = token.encode()
    return any(secrets.compare_digest(presented, key.encode()) for key in keys)


def authenticate(
    request: Request,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="`Bearer <API key>` when keys are set.")] = None,
) -> str:
    """The caller's scope: its API key, or, when the API is open, the address it connects from."""
    if not settings.api_keys:
        return f"address:{request.client.host if request.client else 'unknown'}"
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and _key_matches(token, settings.api_keys):
        return f"key:{token}"
    raise ApiError(
        401,
        "unauthorized",
        "send a valid API key as `Authorization: Bearer <key>`",
        headers={"WWW-Authenticate": "Bearer"},
    )


Caller = Annotated[str, Depends(authenticate)]


def authenticate_admin(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="`Bearer <admin key>` (ADMIN_API_KEYS).")] = None,
) -> None:
    """Operators only: a key of `ADMIN_API_KEYS` (API keys never qualify)."""
    if not settings.admin_api_keys:
        raise ApiError(
            403,
            "admin_forbidden",
            "the admin routes are off on this deployment (set ADMIN_API_KEYS to use them)",
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _key_matches(token, settings.admin_api_keys):
        raise ApiError(
            403, "admin_forbidden", "this route needs an admin key: `Authorization: Bearer <admin key>`"
        )


Admin = Annotated[None, Depends(authenticate_admin)]


def owner_of(caller: str) -> str:
    """What a job stores of its creator: a hash, so keys never reach the queue."""
    return hashlib.sha256(f"owner\0{caller}".encode()).hexdigest()


def tier_of(caller: str, settings: Settings) -> str:
    """The caller's key class (`API_KEY_TIERS`); every caller of an open API is in `default`."""
    kind, _, key = caller.partition(":")
    return settings.tier_of_key(key) if kind == "key" else DEFAULT_TIER


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
AcceptHeader = Annotated[
    str | None,
    Header(description="`image/png`, `image/jpeg` or `image/webp` (one image) for the raw bytes."),
]


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Repeating a request with the same key (and the same body) returns the same job; the "
        "same key with another body is a 422.",
    ),
]


async def accept_customize(
    request: Request,
    caller: RateLimitedCaller,
    queue: QueueDep,
    idempotency_key: IdempotencyKey = None,
    accept: AcceptHeader = None,
) -> Accepted:
    intake: Intake = request.app.state.intake
    return await intake.enqueue(
        request,
        owner_of(caller),
        queue,
        idempotency_key,
        request.app.state.subjects,
        accept or "application/json",
        tier=tier_of(caller, request.app.state.settings),
        adapters=request.app.state.adapters,
    )


async def accept_job(
    request: Request, caller: RateLimitedCaller, queue: QueueDep, idempotency_key: IdempotencyKey = None
) -> Accepted:
    intake: Intake = request.app.state.intake
    return await intake.enqueue(
        request,
        owner_of(caller),
        queue,
        idempotency_key,
        request.app.state.subjects,
        model=JobRequest,
        tier=tier_of(caller, request.app.state.settings),
        adapters=request.app.state.adapters,
    )


# Auth and the rate limit are dependencies of these, so they run before the body is read.
AcceptedCustomize = Annotated[Accepted, Depends(accept_customize)]
AcceptedJob = Annotated[Accepted, Depends(accept_job)]
