"""Where a webhook may go: https to public addresses, unless the operator allows a host.

Checked twice: when the job is submitted (a clear 422) and again right before every attempt,
whose connection then goes to the addresses just checked (`Destination.addresses`), so a DNS
answer that changes in between (DNS rebinding) cannot turn a checked name into an internal address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# Longest DNS resolution of a webhook host.
RESOLVE_TIMEOUT_S = 5.0
MAX_URL_LENGTH = 2000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookUrlError(ValueError):
    """The URL is not one webhooks may be sent to (the message says why)."""


@dataclass(frozen=True)
class Target:
    """A parsed webhook URL."""

    scheme: str
    host: str  # lower case; an IPv6 literal without brackets
    port: int
    path: str  # path and query, at least "/"
    allow_listed: bool

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class Destination:
    target: Target
    addresses: list[IPAddress]  # the only addresses the connection may go to, tried in order


def parse_target(url: str, allow_hosts: list[str]) -> Target:
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise WebhookUrlError(f"not a valid URL ({error})") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookUrlError("the URL has no host; send an absolute https:// URL")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError("credentials in the URL are not allowed; requests are signed instead")
    allow_listed = host in {allowed.lower() for allowed in allow_hosts}
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_listed):
        raise WebhookUrlError(f"the scheme must be https (got {parts.scheme or 'none'!r})")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path, allow_listed)


def public(address: IPAddress) -> bool:
    """Reachable on the internet: not private, loopback, link-local, multicast, reserved, shared
    (CGNAT), unspecified, nor an IPv4-mapped IPv6 form of one of those."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_link_local or address.is_loopback
    )


async def resolve(target: Target) -> Destination:
    """The target's addresses, every one public unless the host is allow-listed."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM
                )
        except (TimeoutError, OSError) as error:
            reason = error or "timed out"
            raise WebhookUrlError(f"the host {target.host} does not resolve ({reason})") from None
        # The scope of a link-local IPv6 answer ("fe80::1%eth0") is dropped: such answers are refused.
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise WebhookUrlError(f"the host {target.host} has no address")
    if not target.allow_listed:
        for address in addresses:
            if not public(address):
                raise WebhookUrlError(
                    f"the host {target.host} resolves to {address}, a private, loopback, link-local or "
                    "reserved address; webhooks only go to public addresses"
                )
    return Destination(target, list(dict.fromkeys(addresses)))
