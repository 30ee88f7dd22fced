"""Standard Webhooks signing (https://www.standardwebhooks.com), one secret per API key.

A key's secret is derived, never stored: HMAC-SHA256 of the server's `WEBHOOK_SECRET` over the
job owner (the hash of the caller's scope that every job keeps, `service/api/deps.owner_of`). So
the delivery loop signs with the job's owner alone, every API replica derives the same secret,
and a key holder reads its own at `GET /webhooks/secret`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def signing_secret(server_secret: str, owner: str) -> str:
    """The `whsec_...` secret of the jobs of `owner`."""
    digest = hmac.new(server_secret.encode(), f"webhook-signing\0{owner}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


def signed_headers(secret: str, message_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    """The `webhook-id`, `webhook-timestamp` and `webhook-signature` headers of one attempt."""
    now = now or datetime.now(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body.decode()),
    }
