"""One delivery attempt: a signed POST to a checked address, bounded in time and size.

The connection goes to one of `Destination.addresses` (those `addresses.resolve` just checked, in
order, the next one when a connection is refused); the URL's host name stays in the Host header
and, for https, in TLS (SNI and certificate check), so the receiver sees an ordinary request.
Redirects are not followed (a 3xx is a failed attempt); at most `MAX_RESPONSE_BYTES` of the reply
are read, for the error message.
"""

from __future__ import annotations

import asyncio
import ssl

import certifi
import httpx

from service.webhooks.addresses import Destination

MAX_RESPONSE_BYTES = 4096
USER_AGENT = "realcustom-webhooks/1"


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificates checked against the public CAs (certifi) plus `ca_file` (an internal CA)."""
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


class DeliveryError(Exception):
    """The attempt failed; the message (bounded) is what `GET /jobs/{id}` shows as `last_error`."""


async def post(
    destination: Destination,
    body: bytes,
    headers: dict[str, str],
    connect_timeout_s: float,
    timeout_s: float,
    tls: ssl.SSLContext,
) -> None:
    """POST `body`; returns on a 2xx reply, raises DeliveryError otherwise."""
    target = destination.target
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
    headers = {
        **headers,
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    try:
        # The whole attempt is bounded too: a receiver dripping bytes resets each read timeout.
        async with (
            asyncio.timeout(connect_timeout_s + timeout_s),
            httpx.AsyncClient(verify=tls, timeout=timeout, follow_redirects=False, trust_env=False) as client,
        ):
            for index, address in enumerate(destination.addresses):
                host = f"[{address}]" if address.version == 6 else str(address)
                url = f"{target.scheme}://{host}:{target.port}{target.path}"
                try:
                    async with client.stream(
                        "POST", url, content=body, headers=headers, extensions=extensions
                    ) as response:
                        if response.is_success:
                            return
                        excerpt = b""
                        async for chunk in response.aiter_raw():
                            excerpt += chunk
                            if len(excerpt) >= MAX_RESPONSE_BYTES:
                                break
                        break
                except httpx.ConnectError:
                    if index == len(destination.addresses) - 1:
                        raise
    except TimeoutError:
        raise DeliveryError(f"no reply within {connect_timeout_s + timeout_s:.0f} s") from None
    except httpx.HTTPError as error:
        raise DeliveryError(f"{type(error).__name__}: {error}"[:300]) from None
    text = excerpt[:200].decode(errors="replace").strip()
    raise DeliveryError(f"HTTP {response.status_code}" + (f": {text}" if text else ""))
