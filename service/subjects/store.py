"""Where subjects and their projected tokens live: Redis beside the queue, or the all-in-one process.

A subject is its normalised image (decoded at the edge, 8-bit RGB) with its owner, kept
`SUBJECT_TTL_S` from its last upload. Its projected tokens are computed by the first worker that
needs them and written back under the image's feature key (service/subjects/ids.py) with the same
TTL, so every other worker skips the encoders. Both count against the queue's byte budget
(`QUEUE_MAX_BYTES`) while they exist: in Redis as members of the queue's result set (score = expiry),
which the queue's SUBMIT script already purges, so expired subjects free their bytes as results do.

The API side is asyncio; the token side is blocking, called from a worker's preparation thread.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.exceptions import OutOfMemoryError, RedisError

from service.queue.connect import connect_async, connect_sync
from service.queue.keys import QueueKeys
from service.queue.memory import InProcessQueue
from service.queue.protocol import JobQueue, QueueFullError, QueueUnavailableError
from service.settings import Settings


@dataclass(frozen=True)
class Subject:
    id: str
    owner: str
    key: str  # feature key of the image (service/subjects/ids.py)
    width: int
    height: int
    image: bytes  # 8-bit RGB, row-major
    expires_at: float  # unix time

    @property
    def size(self) -> int:
        """Bytes counted against the budget."""
        return len(self.image) + len(self.owner) + len(self.key) + 64


@dataclass(frozen=True)
class StoredTokens:
    """Projected tokens [T, C] as raw bytes, and what encoding them cost (for `seconds saved`)."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    encode_s: float

    @property
    def size(self) -> int:
        return len(self.data) + 64


def subjects_full(held: int, size: int, budget: int, retry_after_s: int) -> QueueFullError:
    return QueueFullError(
        f"stored subjects hold {held} bytes; this one's {size} bytes would pass their share of the queue, "
        f"{budget} bytes (SUBJECT_MAX_BYTES). Delete subjects you no longer use, or send the photo inline",
        retry_after_s,
    )


class SubjectStore(Protocol):
    async def put(self, subject: Subject) -> Subject:
        """Store (or refresh) a subject; QueueFullError when it would pass the byte budget."""
        ...

    async def get(self, subject_id: str) -> Subject | None: ...

    async def delete(self, subject_id: str) -> bool:
        """Remove a subject and its tokens; False when it did not exist."""
        ...

    def get_tokens(self, key: str) -> StoredTokens | None:
        """Blocking: the shared tokens of a feature key, if a worker stored them."""
        ...

    def put_tokens(self, key: str, tokens: StoredTokens) -> bool:
        """Blocking: share tokens for `SUBJECT_TTL_S`; False when over the byte budget."""
        ...

    async def close(self) -> None: ...


class MemorySubjectStore:
    """The all-in-one process: dictionaries, bytes counted by its in-process queue."""

    def __init__(self, queue: InProcessQueue, ttl_s: float, budget: int) -> None:
        self._queue = queue
        self._ttl_s = ttl_s
        self._budget = budget
        self._subjects: dict[str, Subject] = {}
        self._tokens: dict[str, tuple[StoredTokens, float]] = {}

    def _held(self, replacing: str) -> int:
        """Bytes of live subjects and tokens, but the entry `replacing`."""
        now = time.time()
        subjects = sum(
            s.size for s in self._subjects.values() if s.expires_at > now and f"subject:{s.id}" != replacing
        )
        tokens = sum(
            t.size
            for key, (t, expires_at) in self._tokens.items()
            if expires_at > now and f"tokens:{key}" != replacing
        )
        return subjects + tokens

    def _hold(self, entry: str, size: int) -> None:
        held = self._held(entry)
        if held + size > self._budget:
            raise subjects_full(held, size, self._budget, self._queue.retry_after_s)
        self._queue.hold_bytes(entry, size, self._ttl_s)

    async def put(self, subject: Subject) -> Subject:
        self._hold(f"subject:{subject.id}", subject.size)
        subject = _with_expiry(subject, time.time() + self._ttl_s)
        self._subjects[subject.id] = subject
        return subject

    async def get(self, subject_id: str) -> Subject | None:
        subject = self._subjects.get(subject_id)
        if subject is not None and subject.expires_at <= time.time():
            del self._subjects[subject_id]
            return None
        return subject

    async def delete(self, subject_id: str) -> bool:
        subject = self._subjects.pop(subject_id, None)
        self._queue.release_bytes(f"subject:{subject_id}")
        if subject is None:
            return False
        self._tokens.pop(subject.key, None)
        self._queue.release_bytes(f"tokens:{subject.key}")
        return True

    def get_tokens(self, key: str) -> StoredTokens | None:
        tokens, expires_at = self._tokens.get(key, (None, 0.0))
        return tokens if expires_at > time.time() else None

    def put_tokens(self, key: str, tokens: StoredTokens) -> bool:
        try:
            self._hold(f"tokens:{key}", tokens.size)
        except QueueFullError:
            return False
        self._tokens[key] = (tokens, time.time() + self._ttl_s)
        return True

    async def close(self) -> None:
        self._subjects.clear()
        self._tokens.clear()


# KEYS: the value's hash, the queue's byte counter, its result set, the subjects' set. ARGV: member
# ("<size>:..."), size, expiry (unix ms), byte budget, subjects' budget, now (unix s), then the
# hash's fields. Expired members are purged as SUBMIT does; a value already counted (a refresh) is
# not counted twice. The subjects' set (score = expiry, no counter: it holds few, large members)
# bounds what subjects take of the budget. No allow-oom: at maxmemory Redis refuses it before any write.
PUT = """#!lua
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do freed = freed + tonumber(string.match(member, '^(%d+):')) end
  redis.call('DECRBY', KEYS[2], freed)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[6])
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  local subjects = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    subjects = subjects + tonumber(string.match(member, '^(%d+):'))
  end
  if subjects + tonumber(ARGV[2]) > tonumber(ARGV[5]) then return {'subjects', tostring(subjects)} end
  local held = tonumber(redis.call('GET', KEYS[2]) or '0')
  if held + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return {'bytes', tostring(held)} end
  redis.call('INCRBY', KEYS[2], ARGV[2])
end
local expires = tonumber(ARGV[3]) / 1000
redis.call('ZADD', KEYS[3], expires, ARGV[1])
redis.call('ZADD', KEYS[4], expires, ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return {'ok', ''}
"""

# KEYS: the subject's hash, its tokens' hash, the byte counter, the result set, the subjects' set.
# ARGV: the members' suffixes (after "<size>"). Returns 1 when the subject existed.
DELETE = """#!lua flags=allow-oom
local function drop(key, suffix)
  local size = redis.call('HGET', key, 'size')
  if not size then return 0 end
  if redis.call('ZREM', KEYS[4], size .. suffix) == 1 then redis.call('DECRBY', KEYS[3], size) end
  redis.call('ZREM', KEYS[5], size .. suffix)
  return redis.call('DEL', key)
end
local removed = drop(KEYS[1], ARGV[1])
if removed == 1 then drop(KEYS[2], ARGV[2]) end
return removed
"""


def _text(fields: dict[bytes, bytes], name: str) -> str:
    return fields[name.encode()].decode()


class RedisSubjectStore:
    """Subjects and tokens in the queue's Redis, under the queue's hash tag (one Cluster slot)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self._settings = settings
        self._keys = QueueKeys(settings.queue_name)
        self._ttl_s = settings.subject_ttl_s
        self._max_bytes = settings.queue_max_bytes
        self._subject_budget = settings.subject_budget
        self._retry_after_s = settings.queue_full_retry_after_s
        self._client = connect_async(settings.redis_url, *self._passwords())
        self._put = self._client.register_script(PUT)
        self._delete = self._client.register_script(DELETE)
        self._sync: redis.Redis | None = None  # opened by the first token call (workers)
        self._sync_put = None

    def _passwords(self) -> tuple[str | None, str | None]:
        secret, sentinel = self._settings.redis_password, self._settings.redis_sentinel_password
        return (
            secret.get_secret_value() if secret else None,
            sentinel.get_secret_value() if sentinel else None,
        )

    def _subject_key(self, subject_id: str) -> str:
        return f"{self._keys.tag}:subject:{subject_id}"

    def _tokens_key(self, key: str) -> str:
        return f"{self._keys.tag}:tokens:{key}"

    @property
    def _subjects_key(self) -> str:
        """Sorted set: "<size>:subject:<id>" and "<size>:tokens:<key>" -> expiry (unix s)."""
        return f"{self._keys.tag}:subjects"

    def _budget_keys(self) -> list[str]:
        return [self._keys.bytes, self._keys.results, self._subjects_key]

    def _put_args(self, member: str, size: int, fields: dict[str, bytes | str | int | float]) -> list:
        expires_ms = int((time.time() + self._ttl_s) * 1000)
        flat = [item for pair in fields.items() for item in pair]
        now = time.time()
        return [
            f"{size}:{member}",
            size,
            expires_ms,
            self._max_bytes,
            self._subject_budget,
            now,
            "size",
            size,
            *flat,
        ]

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except OutOfMemoryError as error:
            raise QueueFullError("the queue's Redis is at its memory limit", self._retry_after_s) from error
        except (RedisError, OSError) as error:
            raise QueueUnavailableError(f"Redis is unreachable: {error}") from error

    async def put(self, subject: Subject) -> Subject:
        subject = _with_expiry(subject, time.time() + self._ttl_s)
        fields = {
            "owner": subject.owner,
            "key": subject.key,
            "width": subject.width,
            "height": subject.height,
            "expires_at": subject.expires_at,
            "image": subject.image,
        }
        keys = [self._subject_key(subject.id), *self._budget_keys()]
        async with self._errors():
            outcome, held = await self._put(
                keys=keys, args=self._put_args(f"subject:{subject.id}", subject.size, fields)
            )
        if outcome == b"bytes":
            raise QueueFullError.for_bytes(int(held), subject.size, self._max_bytes, self._retry_after_s)
        if outcome == b"subjects":
            raise subjects_full(int(held), subject.size, self._subject_budget, self._retry_after_s)
        return subject

    async def get(self, subject_id: str) -> Subject | None:
        async with self._errors():
            fields = await self._client.hgetall(self._subject_key(subject_id))
        if not fields:
            return None
        return Subject(
            id=subject_id,
            owner=_text(fields, "owner"),
            key=_text(fields, "key"),
            width=int(fields[b"width"]),
            height=int(fields[b"height"]),
            image=fields[b"image"],
            expires_at=float(fields[b"expires_at"]),
        )

    async def delete(self, subject_id: str) -> bool:
        subject = await self.get(subject_id)
        if subject is None:
            return False
        keys = [self._subject_key(subject_id), self._tokens_key(subject.key), *self._budget_keys()]
        async with self._errors():
            return bool(
                await self._delete(keys=keys, args=[f":subject:{subject_id}", f":tokens:{subject.key}"])
            )

    @contextlib.contextmanager
    def _sync_client(self) -> Iterator[redis.Redis]:
        if self._sync is None:
            self._sync = connect_sync(self._settings.redis_url, *self._passwords(), socket_timeout=5)
            self._sync_put = self._sync.register_script(PUT)
        try:
            yield self._sync
        except (RedisError, OSError) as error:
            raise QueueUnavailableError(f"Redis is unreachable: {error}") from error

    def get_tokens(self, key: str) -> StoredTokens | None:
        with self._sync_client() as client:
            fields = client.hgetall(self._tokens_key(key))
        if not fields:
            return None
        return StoredTokens(
            data=fields[b"data"],
            shape=tuple(int(side) for side in _text(fields, "shape").split(",")),
            dtype=_text(fields, "dtype"),
            encode_s=float(fields[b"encode_s"]),
        )

    def put_tokens(self, key: str, tokens: StoredTokens) -> bool:
        fields = {
            "shape": ",".join(str(side) for side in tokens.shape),
            "dtype": tokens.dtype,
            "encode_s": tokens.encode_s,
            "data": tokens.data,
        }
        keys = [self._tokens_key(key), *self._budget_keys()]
        with self._sync_client() as client:
            try:
                outcome, _held = self._sync_put(
                    client=client, keys=keys, args=self._put_args(f"tokens:{key}", tokens.size, fields)
                )
            except OutOfMemoryError:
                return False
        return outcome == b"ok"

    async def close(self) -> None:
        await self._client.aclose()
        if self._sync is not None:
            self._sync.close()


def _with_expiry(subject: Subject, expires_at: float) -> Subject:
    return Subject(
        subject.id, subject.owner, subject.key, subject.width, subject.height, subject.image, expires_at
    )


# The store of this process once the API opened one: the embedded worker shares it (the in-process
# queue's subjects exist nowhere else). A separate worker opens its own from its settings.
_opened: SubjectStore | None = None


def open_subject_store(settings: Settings, queue: JobQueue) -> SubjectStore:
    """The store beside `queue` (Redis when `REDIS_URL` is set)."""
    global _opened
    if settings.redis_url:
        _opened = RedisSubjectStore(settings)
    else:
        assert isinstance(queue, InProcessQueue)
        _opened = MemorySubjectStore(queue, settings.subject_ttl_s, settings.subject_budget)
    return _opened


def process_store(settings: Settings) -> SubjectStore | None:
    """The store a worker of this process reads tokens from: the API's, else one of its own (Redis);
    None without Redis and without an API in the process."""
    global _opened
    if _opened is None and settings.redis_url:
        _opened = RedisSubjectStore(settings)
    return _opened
