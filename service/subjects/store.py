"""Where subjects and their projected tokens live: Redis beside the queue, or the all-in-one process.

A subject is its normalised image (decoded at the edge, 8-bit RGB) with its owner, kept
`SUBJECT_TTL_S` from its last upload. Its projected tokens are computed by the first worker that
needs them and written back under the image's feature key (service/subjects/ids.py) with the same
TTL, so every other worker skips the encoders. Both live in the queue's byte budget
(`QUEUE_MAX_BYTES`) while they exist, as expiring holdings (service/queue/budget.py in process,
the `budget_*` functions of service/queue/redis_scripts.py in Redis): expired ones free their bytes
and their memory, and running counters, never a walk over every subject, say what is held.

Subjects and tokens together take at most `SUBJECT_MAX_BYTES`; the subjects of one API key at most
its share of it (`SUBJECT_KEY_SHARE`, or its tier's); tokens are a cache and give way, soonest
expiry first, to a subject that fits its owner's share.

The API side is asyncio; the token side is blocking, called from a worker's preparation thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from redis.exceptions import OutOfMemoryError

from service.queue.budget import ByteBudget, Holding
from service.queue.memory import InProcessQueue
from service.queue.protocol import JobQueue, QueueFullError
from service.queue.redis_scripts import DELETE, PUT
from service.queue.redis_streams import RedisStreamsQueue
from service.queue.storage import RedisStorage
from service.settings import DEFAULT_TIER, Settings


@dataclass(frozen=True)
class Subject:
    id: str
    owner: str
    key: str  # feature key of the image (service/subjects/ids.py)
    width: int
    height: int
    image: bytes  # 8-bit RGB, row-major
    expires_at: float  # unix time
    tier: str = DEFAULT_TIER  # its owner's key class (the owner's share of the subject budget)

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
        "subjects_full",
    )


def key_subjects_full(held: int, size: int, share: int, retry_after_s: int) -> QueueFullError:
    return QueueFullError(
        f"the subjects of this API key hold {held} bytes; this one's {size} bytes would pass its share of "
        f"the subject budget, {share} bytes. Delete subjects you no longer use, or send the photo inline",
        retry_after_s,
        "key_subjects_full",
    )


def key_share_of(settings: Settings) -> Callable[[str], int]:
    """Tier -> the bytes the subjects of one of its keys may hold."""
    return lambda tier: int(settings.tier_policy(tier).subject_share * settings.subject_budget)


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
    """The all-in-one process: dictionaries, bytes held in its in-process queue's budget, which
    drops an expired subject or token (and its memory) as soon as any call purges it."""

    def __init__(
        self,
        queue: InProcessQueue,
        ttl_s: float,
        budget: int,
        key_share: Callable[[str], int] | None = None,
    ) -> None:
        self._bytes: ByteBudget = queue.budget
        self._retry_after_s = queue.retry_after_s
        self._ttl_s = ttl_s
        self._budget = budget
        self._key_share = key_share or (lambda _tier: budget)
        self._subjects: dict[str, Subject] = {}
        self._tokens: dict[str, StoredTokens] = {}
        self._bytes.on_expired("subject", self._expired)
        self._bytes.on_expired("tokens", self._expired)

    def _expired(self, entry: str, _holding: Holding) -> None:
        kind, _, ident = entry.partition(":")
        (self._subjects if kind == "subject" else self._tokens).pop(ident, None)

    def _make_room(self, size: int, evict: bool) -> None:
        """Room for `size` more bytes of subjects (evicting tokens when `evict`), or QueueFullError."""
        while True:
            used = self._bytes.kind_bytes("subject", "tokens")
            if used + size <= self._budget and self._bytes.held + size <= self._bytes.max_bytes:
                return
            if not (evict and self._bytes.evict("tokens")):
                if used + size > self._budget:
                    raise subjects_full(used, size, self._budget, self._retry_after_s)
                raise QueueFullError.for_bytes(
                    self._bytes.held, size, self._bytes.max_bytes, self._retry_after_s
                )

    async def put(self, subject: Subject) -> Subject:
        now = time.time()
        self._bytes.purge(now)
        entry = f"subject:{subject.id}"
        if self._bytes.get(entry) is None:
            mine, share = self._bytes.owner_bytes(subject.owner, ("subject",)), self._key_share(subject.tier)
            if share < self._budget and mine + subject.size > share:  # else the budget's check says it
                raise key_subjects_full(mine, subject.size, share, self._retry_after_s)
            self._make_room(subject.size, evict=True)
        subject = replace(subject, expires_at=now + self._ttl_s)
        self._bytes.hold(entry, subject.size, "subject", subject.owner, subject.tier, subject.expires_at)
        self._subjects[subject.id] = subject
        return subject

    async def get(self, subject_id: str) -> Subject | None:
        self._bytes.purge(time.time())
        return self._subjects.get(subject_id)

    async def delete(self, subject_id: str) -> bool:
        subject = self._subjects.pop(subject_id, None)
        self._bytes.release(f"subject:{subject_id}")
        if subject is None:
            return False
        self._tokens.pop(subject.key, None)
        self._bytes.release(f"tokens:{subject.key}")
        return True

    def get_tokens(self, key: str) -> StoredTokens | None:
        self._bytes.purge(time.time())
        return self._tokens.get(key)

    def put_tokens(self, key: str, tokens: StoredTokens) -> bool:
        now = time.time()
        self._bytes.purge(now)
        entry = f"tokens:{key}"
        if self._bytes.get(entry) is None:
            try:
                self._make_room(tokens.size, evict=False)
            except QueueFullError:
                return False
        self._bytes.hold(entry, tokens.size, "tokens", expires=now + self._ttl_s)
        self._tokens[key] = tokens
        return True

    async def close(self) -> None:
        self._subjects.clear()
        self._tokens.clear()


def _text(fields: dict[bytes, bytes], name: str) -> str:
    return fields[name.encode()].decode()


class RedisSubjectStore:
    """Subjects and tokens in the queue's Redis, under the queue's hash tag (one Cluster slot),
    through the queue's storage (one connection pool) when given."""

    def __init__(self, settings: Settings, storage: RedisStorage | None = None) -> None:
        self._owns_storage = storage is None
        self._storage = storage or RedisStorage(settings)
        self._keys = self._storage.keys
        self._ttl_s = settings.subject_ttl_s
        self._max_bytes = settings.queue_max_bytes
        self._subject_budget = settings.subject_budget
        self._key_share = key_share_of(settings)
        self._retry_after_s = settings.queue_full_retry_after_s
        self._put = self._storage.script(PUT)
        self._delete = self._storage.script(DELETE)

    def _put_args(
        self, kind: str, ident: str, size: int, owner: str, tier: str, expires: float, fields
    ) -> list:
        flat = [item for pair in fields.items() for item in pair]
        share = self._key_share(tier) if kind == "subject" else 0
        return [
            kind,
            ident,
            size,
            repr(expires),
            self._max_bytes,
            self._subject_budget,
            owner,
            tier,
            share,
            *flat,
        ]

    async def put(self, subject: Subject) -> Subject:
        subject = replace(subject, expires_at=time.time() + self._ttl_s)
        fields = {
            "owner": subject.owner,
            "tier": subject.tier,
            "key": subject.key,
            "width": subject.width,
            "height": subject.height,
            "expires_at": subject.expires_at,
            "image": subject.image,
        }
        args = self._put_args(
            "subject", subject.id, subject.size, subject.owner, subject.tier, subject.expires_at, fields
        )
        async with self._storage.errors():
            outcome, held = await self._put(keys=[self._keys.stream], args=args)
        if outcome == b"bytes":
            raise QueueFullError.for_bytes(int(held), subject.size, self._max_bytes, self._retry_after_s)
        if outcome == b"subjects":
            raise subjects_full(int(held), subject.size, self._subject_budget, self._retry_after_s)
        if outcome == b"key_subjects":
            share = self._key_share(subject.tier)
            raise key_subjects_full(int(held), subject.size, share, self._retry_after_s)
        return subject

    async def get(self, subject_id: str) -> Subject | None:
        async with self._storage.errors():
            fields = await self._storage.client.hgetall(self._keys.subject(subject_id))
        if not fields or b"image" not in fields:
            return None
        return Subject(
            id=subject_id,
            owner=_text(fields, "owner"),
            key=_text(fields, "key"),
            width=int(fields[b"width"]),
            height=int(fields[b"height"]),
            image=fields[b"image"],
            expires_at=float(fields[b"expires_at"]),
            tier=fields.get(b"tier", DEFAULT_TIER.encode()).decode(),
        )

    async def delete(self, subject_id: str) -> bool:
        async with self._storage.errors():
            return bool(await self._delete(keys=[self._keys.stream], args=[subject_id]))

    def get_tokens(self, key: str) -> StoredTokens | None:
        with self._storage.blocking() as client:
            fields = client.hgetall(self._keys.tokens(key))
        if not fields or b"data" not in fields:
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
        args = self._put_args("tokens", key, tokens.size, "", "", time.time() + self._ttl_s, fields)
        put = self._storage.blocking_script(PUT)
        with self._storage.blocking() as client:
            try:
                outcome, _held = put(client=client, keys=[self._keys.stream], args=args)
            except OutOfMemoryError:
                return False
        return outcome == b"ok"

    async def close(self) -> None:
        if self._owns_storage:
            await self._storage.close()


# The store of this process once the API opened one: the embedded worker shares it (the in-process
# queue's subjects exist nowhere else). A separate worker opens its own from its settings.
_opened: SubjectStore | None = None


def open_subject_store(settings: Settings, queue: JobQueue) -> SubjectStore:
    """The store beside `queue`: in its Redis, through its storage, when it is the Redis queue."""
    global _opened
    if isinstance(queue, RedisStreamsQueue):
        _opened = RedisSubjectStore(settings, queue.storage)
    else:
        assert isinstance(queue, InProcessQueue)
        _opened = MemorySubjectStore(
            queue, settings.subject_ttl_s, settings.subject_budget, key_share_of(settings)
        )
    return _opened


def process_store(settings: Settings) -> SubjectStore | None:
    """The store a worker of this process reads tokens from: the API's, else one of its own (Redis);
    None without Redis and without an API in the process."""
    global _opened
    if _opened is None and settings.redis_url:
        _opened = RedisSubjectStore(settings)
    return _opened
