"""The adapter registry on both backends (the all-in-one process' memory, Redis beside the queue):
what is wanted, what each worker reports, which reports are live, and what a request may name."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from service.adapters import (
    REPORT_TTL_HEARTBEATS,
    LoadedAdapter,
    MemoryAdapterRegistry,
    WorkerAdapters,
    open_registry,
    served,
)
from service.queue import create_queue
from service.settings import Settings


def loaded(name: str, source: str, rank: int = 8, slot: int = 0) -> LoadedAdapter:
    return LoadedAdapter(name=name, source=source, rank=rank, modules=3, kinds=["attn1.to_q"], slot=slot)


async def exercise(settings: Settings) -> None:
    queue = create_queue(settings)
    registry = open_registry(settings, queue)
    try:
        assert open_registry(settings, queue) is registry or settings.redis_url
        assert await registry.want("style", "style") is None
        assert await registry.want("style", "style") is None  # the same again: nothing changes
        assert await registry.want("style", "owner/repo") == "style"  # another source: refused
        assert await registry.want("fast", "owner/repo") is None
        assert await registry.wanted() == {"style": "style", "fast": "owner/repo"}
        # No live worker: the wanted adapters, priced at the largest rank served.
        assert await served(registry, settings) == {"style": 64, "fast": 64}

        now = time.time()
        await registry.report(WorkerAdapters(worker="w1", at=now, loaded=[loaded("style", "style", 8)]))
        await registry.report(
            WorkerAdapters(
                worker="w2", at=now, loaded=[loaded("style", "style", 8), loaded("fast", "owner/repo", 4)]
            )
        )
        stale = now - REPORT_TTL_HEARTBEATS * settings.heartbeat_s - 1
        await registry.report(WorkerAdapters(worker="gone", at=stale))
        assert sorted(report.worker for report in await registry.reports()) == ["w1", "w2"]
        # Only what every live worker has loaded: w1 lacks `fast`.
        assert await served(registry, settings) == {"style": 8}
        assert await registry.drop("style") and not await registry.drop("style")
        assert await served(registry, settings) == {}
        assert await served(registry, settings.model_copy(update={"lora_slots": 0})) == {}
    finally:
        await queue.close()


def test_registry_in_process() -> None:
    asyncio.run(exercise(Settings(lora_slots=2, heartbeat_s=0.5)))
    assert isinstance(open_registry(Settings(), create_queue(Settings())), MemoryAdapterRegistry)


@pytest.mark.integration
def test_registry_in_redis(redis_server) -> None:
    settings = Settings(
        lora_slots=2, heartbeat_s=0.5, redis_url=redis_server.url, queue_name=f"loras-{uuid.uuid4().hex[:8]}"
    )
    asyncio.run(exercise(settings))
