"""Where a webhook may go: https to public addresses, unless the operator allows a host.

Checked twice: when the job is submitted (a clear 422) and again right before every attempt,
whose connection then goes to the addresses just checked (`Destination.addresses`), so a DNS
answer that changes in between (DNS rebinding) cannot turn a checked name into an internal address.

Host names are resolved by the system resolver on a small pool of threads of their own, never on
the event loop's default executor: a resolver that hangs (a hostile name server) can only hold
these threads, each lookup is abandoned after `RESOLVE_TIMEOUT_S`, and nothing else waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import queue
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

# Longest DNS resolution of a webhook host (a lookup still queued for a thread counts too).
RESOLVE_TIMEOUT_S = 5.0
# Lookups at once; a hung system resolver holds a thread past RESOLVE_TIMEOUT_S (until its own
# timeouts end it), so these are kept apart from every other thread pool.
RESOLVER_THREADS = 8
MAX_URL_LENGTH = 2000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 ranges that carry an IPv4 address, judged by the address they carry (below): NAT64 (RFC
# 6052), 6to4 (RFC 3056), Teredo (RFC 4380). The local-use NAT64 prefix (RFC 8215) translates into
# the operator's own network, and site-local fec0::/10 (deprecated by RFC 3879) is private by
# definition: both are refused whatever they carry.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT (RFC 2765)
ISATAP_IDS = (0x00005EFE, 0x02005EFE)  # interface ids ::0:5efe:a.b.c.d and ::200:5efe:a.b.c.d


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


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries: IPv4-mapped, -compatible and -translated forms,
    NAT64, 6to4, both ends of Teredo, an ISATAP interface id."""
    value = int(address)
    low = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    found = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if value >> 32 == 0 or address in IPV4_TRANSLATED or address in NAT64:
        found.append(low)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if (value >> 32) & 0xFFFFFFFF in ISATAP_IDS:
        found.append(low)
    return found


def public(address: IPAddress) -> bool:
    """Reachable on the internet: not private, loopback, link-local, site-local, multicast,
    reserved, shared (CGNAT) nor unspecified, and an IPv6 form that carries an IPv4 address only
    when that address is public too (an IPv4-mapped one is that IPv4 address)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return public(address.ipv4_mapped)
        if address in NAT64_LOCAL or address in SITE_LOCAL:
            return False
        if not all(public(carried) for carried in embedded_ipv4(address)):
            return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_link_local or address.is_loopback
    )


class _ResolverThreads:
    """Daemon threads that run the system resolver: unlike a ThreadPoolExecutor's, a thread stuck
    in a lookup never delays the process' exit."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._lookups: queue.SimpleQueue = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    async def getaddrinfo(self, host: str, port: int) -> list:
        with self._lock:
            if not self._started:
                for index in range(self._count):
                    threading.Thread(target=self._run, name=f"webhook-resolver-{index}", daemon=True).start()
                self._started = True
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._lookups.put((loop, answer, host, port))
        return await answer

    def _run(self) -> None:
        while True:
            loop, answer, host, port = self._lookups.get()
            if answer.cancelled():  # abandoned while queued
                continue
            try:
                outcome = (answer.set_result, socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
            except Exception as error:  # OSError, or UnicodeError for a name IDNA cannot encode
                outcome = (answer.set_exception, error)
            with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, answer, *outcome)


def _settle(answer: asyncio.Future, settle, value) -> None:
    if not answer.done():
        settle(value)


_resolver = _ResolverThreads(RESOLVER_THREADS)


async def lookup(host: str, port: int) -> list[IPAddress]:
    """The addresses of a host name, from the system resolver on the resolver threads."""
    infos = await _resolver.getaddrinfo(host, port)
    # The scope of a link-local IPv6 answer ("fe80::1%eth0") is dropped: such answers are refused.
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


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
                addresses = await lookup(target.host, target.port)
        except TimeoutError:
            raise WebhookUrlError(
                f"the host {target.host} did not resolve within {RESOLVE_TIMEOUT_S:.0f} s"
            ) from None
        except (OSError, UnicodeError) as error:
            raise WebhookUrlError(f"the host {target.host} does not resolve ({error})") from None
    if not addresses:
        raise WebhookUrlError(f"the host {target.host} has no address")
    if not target.allow_listed:
        for address in addresses:
            if not public(address):
                raise WebhookUrlError(
                    f"the host {target.host} resolves to {address}, a private, loopback, link-local, "
                    "site-local or reserved address (or one that carries such an IPv4 address); "
                    "webhooks only go to public addresses"
                )
    return Destination(target, list(dict.fromkeys(addresses)))
