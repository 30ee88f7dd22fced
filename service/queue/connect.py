"""Redis clients for the queue, by `REDIS_URL` scheme: one server, Sentinel or Cluster.

- `redis://[:password@]host:port/db`, `rediss://...`, `unix://...`: one server (redis-py's URLs).
- `redis+sentinel://[:password@]host:port[,host:port...]/<service>[/db]` (`rediss+sentinel://` for
  TLS): the sentinels at those addresses name the primary of `<service>`. A client asks them again
  whenever its connection fails or the server it reaches is no longer a primary, so the queue
  follows a failover by itself (requests made during it get QueueUnavailableError and are retried).
- `redis+cluster://[:password@]host:port[,host:port...]` (`rediss+cluster://`): any nodes of a Redis
  Cluster; the client learns the slot map from them and refreshes it on MOVED or a failed node.

The password in the URL is the data nodes' (REDIS_PASSWORD overrides it); sentinels use
REDIS_SENTINEL_PASSWORD when they require one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


SINGLE_SCHEMES = ("redis", "rediss", "unix")


class RedisUrlError(ValueError):
    """REDIS_URL cannot be used; the message says what to change."""


def check_redis_url(url: str) -> None:
    """Raise RedisUrlError unless `url` is one of the forms above (settings call it at start-up)."""
    scheme = url.partition("://")[0]
    if scheme in SENTINEL_SCHEMES or scheme in CLUSTER_SCHEMES:
        parse_multi_host(url)
    elif scheme not in SINGLE_SCHEMES or "://" not in url:
        known = ", ".join(f"{name}://" for name in SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES)
        raise RedisUrlError(f"REDIS_URL {scheme!r}: the scheme must be one of {known}")


@dataclass(frozen=True)
class MultiHostUrl:
    """A parsed `redis+sentinel://` or `redis+cluster://` URL."""

    scheme: str
    hosts: list[tuple[str, int]]
    password: str | None
    username: str | None
    service: str = ""
    db: int = 0
    ssl: bool = False


def parse_multi_host(url: str) -> MultiHostUrl:
    scheme, _, rest = url.partition("://")
    if "?" in rest or "#" in rest:
        raise RedisUrlError(
            f"REDIS_URL: {scheme}:// takes no query options; TLS is the scheme (rediss+...), passwords "
            "are REDIS_PASSWORD and REDIS_SENTINEL_PASSWORD"
        )
    netloc, _, path = rest.partition("/")
    credentials, _, addresses = netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    hosts = []
    for address in addresses.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise RedisUrlError(
                f"REDIS_URL: {address!r} is not host:port (in {scheme}://host:port,host:port/...)"
            )
        hosts.append((host.strip("[]"), int(port)))
    parts = [part for part in path.split("/") if part]
    service, db = "", 0
    if scheme in SENTINEL_SCHEMES:
        if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise RedisUrlError(
                f"REDIS_URL: a Sentinel URL names the primary's service (and optionally a database): "
                f"{scheme}://host:26379,host:26379/<service>[/<db>], got path {path!r}"
            )
        service, db = unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0
    elif parts:
        raise RedisUrlError(
            f"REDIS_URL: a Cluster URL has no path (Cluster has only database 0), got {path!r}"
        )
    return MultiHostUrl(
        scheme=scheme,
        hosts=hosts,
        password=unquote(password) or None,
        username=unquote(username) or None,
        service=service,
        db=db,
        ssl=scheme.startswith("rediss"),
    )


def _auth(parsed: MultiHostUrl, password: str | None) -> dict:
    options: dict = {"password": password or parsed.password}
    if parsed.username:
        options["username"] = parsed.username
    if parsed.ssl:
        options["ssl"] = True
    return options


@dataclass(frozen=True)
class _ClientKind:
    """The redis-py classes of one client flavour (asyncio or blocking)."""

    single: type
    sentinel: type
    cluster: type
    node: type


_ASYNC = _ClientKind(aioredis.Redis, AsyncSentinel, AsyncRedisCluster, AsyncClusterNode)
_SYNC = _ClientKind(redis.Redis, Sentinel, RedisCluster, ClusterNode)


def _connect(kind: _ClientKind, url: str, password: str | None, sentinel_password: str | None, options):
    scheme = url.partition("://")[0]
    if scheme in SENTINEL_SCHEMES:
        parsed = parse_multi_host(url)
        sentinels = kind.sentinel(parsed.hosts, sentinel_kwargs=_sentinel_options(parsed, sentinel_password))
        return sentinels.master_for(parsed.service, db=parsed.db, **_auth(parsed, password), **options)
    if scheme in CLUSTER_SCHEMES:
        parsed = parse_multi_host(url)
        nodes = [kind.node(host, port) for host, port in parsed.hosts]
        return kind.cluster(startup_nodes=nodes, **_auth(parsed, password), **options)
    credentials = {"password": password} if password else {}
    return kind.single.from_url(url, **credentials, **options)


def connect_async(
    url: str, password: str | None, sentinel_password: str | None = None, **options
) -> aioredis.Redis | AsyncRedisCluster:
    """The asyncio client of `url` (see the module's docstring); `options` go to its connections."""
    return _connect(_ASYNC, url, password, sentinel_password, options)


def connect_sync(url: str, password: str | None, sentinel_password: str | None = None, **options):
    """The blocking client of `url`: `redis.Redis`, a Sentinel-managed one or `RedisCluster`."""
    return _connect(_SYNC, url, password, sentinel_password, options)


def _sentinel_options(parsed: MultiHostUrl, sentinel_password: str | None) -> dict:
    options: dict = {"socket_timeout": 2, "socket_connect_timeout": 2}
    if sentinel_password:
        options["password"] = sentinel_password
    if parsed.ssl:
        options["ssl"] = True
    return options
