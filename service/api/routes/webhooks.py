"""`GET /webhooks/secret`: the caller's webhook signing secret (service/webhooks/signing.py)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import Caller, SettingsDep, owner_of
from service.api.openapi import ERROR_RESPONSES
from service.errors import ApiError
from service.webhooks.signing import signing_secret

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookSecret(BaseModel):
    secret: str = Field(
        description="`whsec_` + base64 key of this API key's webhooks (Standard Webhooks): verify the "
        "`webhook-signature` header of each delivery with it."
    )


@router.get(
    "/secret",
    response_model=WebhookSecret,
    responses=ERROR_RESPONSES,
    summary="The signing secret of this API key's webhooks",
)
async def webhook_secret(caller: Caller, settings: SettingsDep) -> WebhookSecret:
    if settings.webhook_secret is None:
        raise ApiError(
            404, "webhooks_disabled", "this deployment sends no webhooks (WEBHOOK_SECRET is not set)"
        )
    return WebhookSecret(secret=signing_secret(settings.webhook_secret.get_secret_value(), owner_of(caller)))
