"""A worker's adapter bank follows the adapter registry (service/adapters.py), between steps.

At start-up, before the worker reports ready: its `LORA_ADAPTERS` are added to the registry's wanted
adapters, then every wanted adapter is loaded (one of `LORA_ADAPTERS` that fails stops the worker:
a configuration error; any other failure is reported). While it serves, at most every `SYNC_S`
at a step boundary:

* a wanted adapter not loaded yet is read (file or hub, parsed and checked against the UNet) on a
  thread of its own while the batch steps, then written into a free slot on the stepping thread,
  between two steps: captured graphs read the slots in place, so nothing is recaptured;
* a loaded adapter no longer wanted (or now wanted from another source) is unloaded once no job
  holds it (jobs hold their adapters from preparation to their end);
* the worker reports what it has loaded and what failed, at every change and every heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engines.step_scheduler import StepScheduler
from realcustom.lora.adapter import LoRAAdapter, LoRAError
from realcustom.lora.files import load_adapter
from service.adapters import AdapterRegistry, FailedAdapter, LoadedAdapter, WorkerAdapters
from service.cancelling import cancel_in_background
from service.queue.protocol import QueueFullError
from service.settings import Settings

logger = logging.getLogger(__name__)

# Least time between two looks at the registry (an admin's load waits about this much longer).
SYNC_S = 0.5

BetweenSteps = Callable[..., Awaitable[Any]]


class AdapterSync:
    def __init__(
        self,
        registry: AdapterRegistry,
        scheduler: StepScheduler,
        settings: Settings,
        worker: str,
        between_steps: BetweenSteps,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._bank = scheduler.adapters
        self._settings = settings
        self._worker = worker
        self._between_steps = between_steps  # runs a function on the stepping thread, between steps
        self._sources: dict[str, str] = {}  # loaded adapters: name -> source
        self._failed: dict[str, FailedAdapter] = {}
        self._reading: dict[str, tuple[str, asyncio.Task[LoRAAdapter]]] = {}
        self._next_sync = 0.0
        self._reported_at = 0.0

    @property
    def enabled(self) -> bool:
        return self._bank is not None

    async def start(self) -> None:
        """Register `LORA_ADAPTERS`, load every wanted adapter and report (before ready)."""
        if not self.enabled:
            return
        startup = dict(self._settings.lora_startup)
        for name, source in startup.items():
            existing = await self._registry.want(name, source)
            if existing is not None:
                logger.warning(
                    "LORA_ADAPTERS names %s from %s, but the deployment serves it from %s: serving that",
                    name,
                    source,
                    existing,
                )
        for name, source in (await self._registry.wanted()).items():
            try:
                adapter = await asyncio.to_thread(self._read, name, source)
                await self._between_steps(self._scheduler.load_adapter, adapter)
            except Exception as error:
                if startup.get(name) == source:
                    raise RuntimeError(
                        f"LORA_ADAPTERS: adapter {name!r} ({source}) cannot be loaded: {error}"
                    ) from error
                self._fail(name, source, error)
                continue
            self._loaded(name, source)
        await self._report()

    async def sync(self) -> None:
        """At a step boundary: follow the registry (see the module docstring). An unreachable
        registry raises QueueUnavailableError (the worker loop retries); a full one is skipped."""
        now = time.monotonic()
        if not self.enabled or now < self._next_sync:
            return
        self._next_sync = now + SYNC_S
        try:
            await self._follow(await self._registry.wanted())
        except QueueFullError as error:  # Redis at maxmemory: the report waits for the next sync
            logger.warning("could not report the adapters: %s", error)

    async def _follow(self, wanted: dict[str, str]) -> None:
        changed = False
        for name, source in list(self._sources.items()):
            if wanted.get(name) != source and not self._bank.held(name):
                try:
                    await self._between_steps(self._scheduler.unload_adapter, name)
                except LoRAError:  # a job took it meanwhile: unloaded at a later sync
                    continue
                del self._sources[name]
                logger.info("unloaded LoRA adapter %s", name)
                changed = True
        for name, failure in list(self._failed.items()):
            if wanted.get(name) != failure.source:  # dropped: a later load is tried afresh
                del self._failed[name]
                changed = True
        for name, source in wanted.items():
            if name not in self._sources and name not in self._failed and name not in self._reading:
                self._reading[name] = (
                    source,
                    asyncio.create_task(asyncio.to_thread(self._read, name, source)),
                )
        for name, (source, task) in list(self._reading.items()):
            if not task.done():
                continue
            del self._reading[name]
            if wanted.get(name) != source or name in self._sources:
                task.exception()  # retrieved: a failed read of a dropped adapter is not an error
                continue  # dropped, or still loaded from its old source: read again later
            try:
                await self._between_steps(self._scheduler.load_adapter, task.result())
            except Exception as error:
                self._fail(name, source, error)
            else:
                self._loaded(name, source)
            changed = True
        if changed or time.monotonic() - self._reported_at >= self._settings.heartbeat_s:
            await self._report()

    def _read(self, name: str, source: str) -> LoRAAdapter:
        """A thread of its own: the file (or hub download), parsed and checked against the UNet."""
        return load_adapter(
            source,
            self._scheduler.pipeline.unet.unet,
            name=name,
            lora_dir=self._settings.lora_dir,
            max_rank=self._bank.rank,
            hub_ids=self._settings.lora_allowed_hub_ids,
        )

    def _loaded(self, name: str, source: str) -> None:
        self._sources[name] = source
        logger.info("loaded LoRA adapter %s from %s", name, source)

    def _fail(self, name: str, source: str, error: Exception) -> None:
        logger.warning("LoRA adapter %s (%s) cannot be loaded: %s", name, source, error)
        self._failed[name] = FailedAdapter(source=source, error=str(error))

    async def _report(self) -> None:
        loaded = [
            LoadedAdapter(
                name=entry["name"],
                source=self._sources[entry["name"]],
                rank=entry["rank"],
                modules=entry["modules"],
                kinds=entry["kinds"],
                slot=entry["slot"],
            )
            for entry in self._bank.describe()
            if entry["name"] in self._sources
        ]
        report = WorkerAdapters(worker=self._worker, at=time.time(), loaded=loaded, failed=dict(self._failed))
        await self._registry.report(report)
        self._reported_at = time.monotonic()

    def close(self) -> None:
        cancel_in_background(*(task for _source, task in self._reading.values()))
