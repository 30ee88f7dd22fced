"""The webhook of a submitted job, checked before the job is accepted (a clear 422 otherwise)."""

from __future__ import annotations

from service.errors import ApiError
from service.settings import Settings
from service.webhooks.addresses import WebhookUrlError, parse_target, resolve


async def check_webhook_url(url: str, settings: Settings) -> None:
    if settings.webhook_secret is None:
        raise ApiError(
            422,
            "webhooks_disabled",
            "this deployment sends no webhooks (WEBHOOK_SECRET is not set); poll GET /jobs/{id} instead",
            field="webhook_url",
        )
    try:
        await resolve(parse_target(url, settings.webhook_allow_hosts))
    except WebhookUrlError as error:
        raise ApiError(422, "invalid_webhook_url", f"webhook_url: {error}", field="webhook_url") from None
