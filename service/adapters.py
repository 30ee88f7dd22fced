"""The adapter registry: which LoRA adapters the workers should serve, and what each one has loaded.

Workers are separate processes (any number, behind the queue), so the API never asks a worker
directly. Both sides meet in the queue's storage (Redis beside the queue, or the all-in-one
process' memory), through two records:

* **wanted**: adapter name -> source (a name in `LORA_DIR` or an allowed hub id). Operators change
  it with the admin routes (`POST /v1/loras`, `DELETE /v1/loras/{name}`); every worker adds its
  `LORA_ADAPTERS` at start-up. Each worker keeps its adapter bank equal to it, between steps
  (service/worker/adapters.py): it loads what is wanted into free slots (no recapture) and unloads
  what is no longer wanted once no running job uses it.
* **reports**: per worker, what it has loaded (name, source, rank, layers, slot) and what it failed
  to load, with the time; written at every change and every heartbeat. A report older than
  `REPORT_TTL_HEARTBEATS` heartbeats is a worker that is gone.

What a request may name (`served`): the wanted adapters every live worker has loaded, so a job can
run on whichever worker takes it. With no live worker, the wanted ones (a worker loads them before
it reports ready; their rank is not known yet and is priced at `LORA_MAX_RANK`).
"""

from __future__ import annotations

import time
import weakref
from typing import Protocol

from pydantic import BaseModel, Field

from service.queue.memory import InProcessQueue
from service.queue.protocol import JobQueue
from service.queue.redis_streams import RedisStreamsQueue
from service.queue.storage import RedisStorage
from service.settings import Settings

# A worker's report counts while younger than this many heartbeats (it reports at every one).
REPORT_TTL_HEARTBEATS = 3
# Reports of workers gone this long are deleted when another worker reports.
FORGET_REPORT_S = 3600.0


class LoadedAdapter(BaseModel):
    name: str
    source: str
    rank: int
    modules: int = Field(description="UNet layers it changes.")
    kinds: list[str] = Field(description="Those layers' kinds (`attn1.to_q`, `ff.net.0.proj`, ...).")
    slot: int


class FailedAdapter(BaseModel):
    source: str
    error: str


class WorkerAdapters(BaseModel):
    """One worker's report."""

    worker: str
    at: float = Field(description="Unix time of the report.")
    loaded: list[LoadedAdapter] = Field(default_factory=list)
    failed: dict[str, FailedAdapter] = Field(default_factory=dict)

    def has(self, name: str, source: str) -> bool:
        return any(adapter.name == name and adapter.source == source for adapter in self.loaded)


class AdapterRegistry(Protocol):
    async def wanted(self) -> dict[str, str]:
        """Adapter name -> source, as every worker should serve them."""
        ...

    async def want(self, name: str, source: str) -> str | None:
        """Add `name` from `source`; the source it already has when another (nothing changes)."""
        ...

    async def drop(self, name: str) -> bool:
        """Stop serving `name`; False when it was not wanted."""
        ...

    async def report(self, report: WorkerAdapters) -> None: ...

    async def reports(self) -> list[WorkerAdapters]:
        """The reports of live workers."""
        ...


class MemoryAdapterRegistry:
    """The all-in-one process: the API and its embedded worker share this object."""

    def __init__(self, report_ttl_s: float) -> None:
        self._wanted: dict[str, str] = {}
        self._reports: dict[str, WorkerAdapters] = {}
        self._report_ttl_s = report_ttl_s

    async def wanted(self) -> dict[str, str]:
        return dict(self._wanted)

    async def want(self, name: str, source: str) -> str | None:
        existing = self._wanted.setdefault(name, source)
        return None if existing == source else existing

    async def drop(self, name: str) -> bool:
        return self._wanted.pop(name, None) is not None

    async def report(self, report: WorkerAdapters) -> None:
        self._reports[report.worker] = report

    async def reports(self) -> list[WorkerAdapters]:
        now = time.time()
        return [report for report in self._reports.values() if now - report.at <= self._report_ttl_s]


class RedisAdapterRegistry:
    """Beside the Redis queue, through its storage (keys `loras` and `lora-reports`)."""

    def __init__(self, storage: RedisStorage, report_ttl_s: float) -> None:
        self._storage = storage
        self._keys = storage.keys
        self._report_ttl_s = report_ttl_s

    async def wanted(self) -> dict[str, str]:
        async with self._storage.errors():
            found = await self._storage.client.hgetall(self._keys.loras)
        return {name.decode(): source.decode() for name, source in found.items()}

    async def want(self, name: str, source: str) -> str | None:
        client = self._storage.client
        async with self._storage.errors():
            if await client.hsetnx(self._keys.loras, name, source):
                return None
            existing = await client.hget(self._keys.loras, name)
        if existing is None:  # dropped in between: try once more
            return await self.want(name, source)
        return None if existing.decode() == source else existing.decode()

    async def drop(self, name: str) -> bool:
        async with self._storage.errors():
            return bool(await self._storage.client.hdel(self._keys.loras, name))

    async def report(self, report: WorkerAdapters) -> None:
        async with self._storage.errors():
            await self._storage.client.hset(self._keys.lora_reports, report.worker, report.model_dump_json())

    async def reports(self) -> list[WorkerAdapters]:
        async with self._storage.errors():
            found = await self._storage.client.hgetall(self._keys.lora_reports)
        now, live, gone = time.time(), [], []
        for worker, data in found.items():
            report = WorkerAdapters.model_validate_json(data)
            if now - report.at <= self._report_ttl_s:
                live.append(report)
            elif now - report.at > FORGET_REPORT_S:
                gone.append(worker)
        if gone:
            async with self._storage.errors():
                await self._storage.client.hdel(self._keys.lora_reports, *gone)
        return live


_in_process: weakref.WeakKeyDictionary[InProcessQueue, MemoryAdapterRegistry] = weakref.WeakKeyDictionary()


def open_registry(settings: Settings, queue: JobQueue) -> AdapterRegistry:
    """The registry beside `queue`: in its Redis, or shared by everything using this in-process queue."""
    ttl = REPORT_TTL_HEARTBEATS * settings.heartbeat_s
    if isinstance(queue, RedisStreamsQueue):
        return RedisAdapterRegistry(queue.storage, ttl)
    assert isinstance(queue, InProcessQueue)
    if queue not in _in_process:
        _in_process[queue] = MemoryAdapterRegistry(ttl)
    return _in_process[queue]


async def served(registry: AdapterRegistry, settings: Settings) -> dict[str, int]:
    """Adapters a request may name now, with their ranks (see the module docstring)."""
    if settings.lora_slots == 0:
        return {}
    wanted = await registry.wanted()
    reports = await registry.reports()
    if not reports:
        return dict.fromkeys(wanted, settings.lora_max_rank)
    ranks = {}
    for name, source in wanted.items():
        if all(report.has(name, source) for report in reports):
            ranks[name] = next(a.rank for a in reports[0].loaded if a.name == name)
    return ranks
