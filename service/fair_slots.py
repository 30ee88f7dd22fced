"""Slots shared by API keys: at most `slots` holders, at most `per_owner` of them from one owner,
and while owners wait, each freed slot goes to the next waiting owner in turn (round robin), each
owner's own requests in arrival order.

A burst from one key therefore waits behind that key's own requests, never in front of everyone
else's: another key always finds `slots - per_owner` slots the burst cannot take, and when slots
are contended every waiting key gets the next free one in turn. Used for the intake
(`INTAKE_CONCURRENCY`, asyncio) and the decoder processes (`DECODE_CONCURRENCY`, threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

Waiter = TypeVar("Waiter")


class FairShare(Generic[Waiter]):
    """The policy, without any waiting: who holds, who waits, who is served next. Not thread-safe."""

    def __init__(self, slots: int, per_owner: int) -> None:
        self.slots = slots
        self.per_owner = min(per_owner, slots)
        self.held: Counter[str] = Counter()
        # Owners with waiters, in the order they will be served (a dict keeps insertion order).
        self._waiting: dict[str, deque[Waiter]] = {}

    @property
    def holders(self) -> int:
        return sum(self.held.values())

    def request(self, owner: str, waiter: Waiter) -> bool:
        """True: `owner` holds a slot now. False: `waiter` is queued until `release` grants it.
        (A free slot never coexists with a waiter that could take it: `release` grants those.)"""
        if self.holders < self.slots and self.held[owner] < self.per_owner and owner not in self._waiting:
            self.held[owner] += 1
            return True
        self._waiting.setdefault(owner, deque()).append(waiter)
        return False

    def cancel(self, owner: str, waiter: Waiter) -> None:
        """Drop a waiter that gave up (it was not granted)."""
        queue = self._waiting.get(owner)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[owner]

    def release(self, owner: str) -> list[tuple[str, Waiter]]:
        """`owner` gives a slot back; returns the waiters granted a slot now (they hold it)."""
        self.held[owner] -= 1
        if self.held[owner] <= 0:
            del self.held[owner]
        granted = []
        while self.holders < self.slots:
            next_owner = next((name for name in self._waiting if self.held[name] < self.per_owner), None)
            if next_owner is None:
                break
            queue = self._waiting.pop(next_owner)  # re-inserted last: its turn is over
            granted.append((next_owner, queue.popleft()))
            self.held[next_owner] += 1
            if queue:
                self._waiting[next_owner] = queue
        return granted

    def waiting(self, owner: str | None = None) -> int:
        if owner is not None:
            return len(self._waiting.get(owner, ()))
        return sum(len(queue) for queue in self._waiting.values())


class AsyncFairSlots:
    """FairShare for coroutines: `async with slots.hold(owner): ...`; a cancelled waiter leaves no
    trace (nor a slot held)."""

    def __init__(self, slots: int, per_owner: int) -> None:
        self.share: FairShare[asyncio.Future[None]] = FairShare(slots, per_owner)

    @contextlib.asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.share.request(owner, future):
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # granted just before the cancel
                    self._release(owner)
                else:
                    self.share.cancel(owner, future)
                raise
        try:
            yield
        finally:
            self._release(owner)

    def _release(self, owner: str) -> None:
        pending = [owner]
        while pending:
            for granted_owner, future in self.share.release(pending.pop()):
                if future.cancelled():  # its task is gone: the slot goes to the next in turn
                    pending.append(granted_owner)
                else:
                    future.set_result(None)


class ThreadFairSlots:
    """FairShare for threads (the decoders run in the threadpool): `with slots.hold(owner): ...`."""

    def __init__(self, slots: int, per_owner: int) -> None:
        self.share: FairShare[threading.Event] = FairShare(slots, per_owner)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, owner: str) -> Iterator[None]:
        granted = threading.Event()
        with self._lock:
            if self.share.request(owner, granted):
                granted.set()
        granted.wait()
        try:
            yield
        finally:
            with self._lock:
                woken = self.share.release(owner)
            for _, event in woken:
                event.set()
