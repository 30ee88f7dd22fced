"""The byte budget of the all-in-one process: what each job, result, subject and token entry holds
against `QUEUE_MAX_BYTES`, with running totals per owner, tier and kind.

The in-process queue and the in-process subject store share one budget. Entries that expire
(results after `RESULT_TTL_S`, subjects and tokens after `SUBJECT_TTL_S`) sit in a heap by expiry:
`purge` frees exactly the expired ones and tells their owner module (listeners by kind) to drop
the data, so memory is given back and no operation walks every entry. The Redis backend keeps the
same counters in Lua (redis_scripts.py, `budget_*`). A lock makes each call atomic: the embedded
worker's token writer (a thread) shares the budget with the event loop.
"""

from __future__ import annotations

import heapq
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["job", "result", "subject", "tokens"]
# Kinds an owner's queue share counts (its subjects have their own share of SUBJECT_MAX_BYTES).
QUEUE_KINDS: tuple[Kind, ...] = ("job", "result")


@dataclass(frozen=True)
class Holding:
    size: int
    owner: str
    tier: str
    kind: Kind
    expires: float | None  # time.time(); None = until released


class ByteBudget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._holdings: dict[str, Holding] = {}
        self._by_owner: dict[str, Counter[str]] = {}
        self._by_tier: Counter[str] = Counter()
        self._by_kind: Counter[str] = Counter()
        # Per kind, so an eviction finds the soonest-expiring entry of its kind without a walk.
        self._expiry: dict[str, list[tuple[float, str]]] = {}
        self._listeners: dict[str, Callable[[str, Holding], None]] = {}
        self._lock = threading.RLock()

    def on_expired(self, kind: Kind, listener: Callable[[str, Holding], None]) -> None:
        """Call `listener(key, holding)` for every entry of `kind` that `purge` (or `evict`) frees."""
        self._listeners[kind] = listener

    def purge(self, now: float) -> None:
        with self._lock:
            for heap in self._expiry.values():
                while heap and heap[0][0] <= now:
                    self._drop(*heapq.heappop(heap))

    def evict(self, kind: Kind) -> bool:
        """Free the entry of `kind` that expires soonest (a cache giving up room); False when none."""
        with self._lock:
            heap = self._expiry.get(kind, [])
            while heap:
                if self._drop(*heapq.heappop(heap)):
                    return True
            return False

    def _drop(self, expires: float, key: str) -> bool:
        holding = self._holdings.get(key)
        if holding is None or holding.expires != expires:
            return False  # released or refreshed since (the heap forgets lazily)
        self.release(key)
        listener = self._listeners.get(holding.kind)
        if listener is not None:
            listener(key, holding)
        return True

    def get(self, key: str) -> Holding | None:
        return self._holdings.get(key)

    def hold(
        self, key: str, size: int, kind: Kind, owner: str = "", tier: str = "", expires: float | None = None
    ) -> None:
        """Count `size` bytes under `key` (replacing what it held), until `expires` or `release`."""
        with self._lock:
            self.release(key)
            holding = Holding(size, owner, tier, kind, expires)
            self._holdings[key] = holding
            self._count(holding, size)
            if expires is not None:
                heap = self._expiry.setdefault(kind, [])
                heapq.heappush(heap, (expires, key))
                if len(heap) > 2 * len(self._holdings) + 64:  # refreshed entries left stale copies
                    self._expiry[kind] = [
                        (h.expires, k) for k, h in self._holdings.items() if h.kind == kind and h.expires
                    ]
                    heapq.heapify(self._expiry[kind])

    def release(self, key: str) -> Holding | None:
        with self._lock:
            holding = self._holdings.pop(key, None)
            if holding is not None:
                self._count(holding, -holding.size)
            return holding

    def _count(self, holding: Holding, size: int) -> None:
        self.held += size
        self._by_kind[holding.kind] += size
        if holding.tier:
            self._by_tier[holding.tier] += size
        if holding.owner:
            counts = self._by_owner.setdefault(holding.owner, Counter())
            counts[holding.kind] += size
            if not any(counts.values()):
                del self._by_owner[holding.owner]

    def owner_bytes(self, owner: str, kinds: tuple[Kind, ...] = QUEUE_KINDS) -> int:
        counts = self._by_owner.get(owner)
        return sum(counts[kind] for kind in kinds) if counts else 0

    def holds_anything(self, owner: str) -> bool:
        return owner in self._by_owner

    def kind_bytes(self, *kinds: Kind) -> int:
        return sum(self._by_kind[kind] for kind in kinds)

    def tier_bytes(self, tier: str) -> int:
        return self._by_tier[tier]
