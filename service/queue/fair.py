"""Tenant-fair order of queued jobs: start-time fair queuing by cost, one order per priority class.

Each owner (API key) is a flow with its tier's weight. A job of cost `c` (realcustom/cost.py) gets
the start tag `S = max(V, F)` and moves its owner's finish tag to `F = S + c / weight`; jobs are
taken in order of start tag (ties: acceptance order), and `V`, the class's virtual time, follows
the start tag of the last job taken. An owner that was idle starts at `V`, level with the head of
every backlog, so a light key's job waits behind about one job of each other busy key, never behind
a heavy key's whole backlog; busy keys share the cost taken in proportion to their weights.

`interactive` jobs are taken before `batch` ones, which are taken only when no interactive job
waits, except that while batch jobs wait one is taken at least every `batch_max_wait_s`.

The Redis queue does the same arithmetic in Lua (redis_scripts.py: SUBMIT, TAKE, CANCEL, RELEASE)
on the same numbers (tags are stored with 17 significant digits), so both backends hand out the
same jobs in the same order (tests/service/test_queue_contract.py).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

CLASSES = ("interactive", "batch")


def order_member(seq: int, job_id: str) -> str:
    """A job's member in its class's order: acceptance sequence first, so equal tags keep arrival order."""
    return f"{seq:015d}:{job_id}"


@dataclass(frozen=True)
class Entry:
    job_id: str
    owner: str
    priority: str
    cost: float
    tag: float
    member: str

    @property
    def key(self) -> tuple[float, str]:
        return self.tag, self.member


@dataclass
class _Flow:
    """One owner's queued work in one class."""

    queued_cost: float = 0.0
    queued: int = 0
    finish: float = 0.0
    weight: float = 1.0


class FairOrder:
    """The in-process queue's order (one event loop: no locking)."""

    def __init__(self, batch_max_wait_s: float) -> None:
        self._batch_max_wait_s = batch_max_wait_s
        self._virtual = dict.fromkeys(CLASSES, 0.0)
        self._flows: dict[tuple[str, str], _Flow] = {}
        self._entries: dict[str, Entry] = {}
        self._heaps: dict[str, list[tuple[float, str, str]]] = {c: [] for c in CLASSES}
        self._queued_cost = dict.fromkeys(CLASSES, 0.0)
        self._queued = dict.fromkeys(CLASSES, 0)
        self._batch_at = 0.0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries

    def start_tag(self, owner: str, priority: str) -> float:
        flow = self._flows.get((priority, owner))
        return max(self._virtual[priority], flow.finish if flow else 0.0)

    def push(self, job_id: str, owner: str, priority: str, cost: float, weight: float, now: float) -> Entry:
        tag = self.start_tag(owner, priority)
        flow = self._flows.setdefault((priority, owner), _Flow())
        flow.finish = tag + cost / weight
        flow.weight = weight
        self._seq += 1
        entry = Entry(job_id, owner, priority, cost, tag, order_member(self._seq, job_id))
        self._add(entry, now)
        return entry

    def restore(self, entry: Entry, now: float) -> None:
        """A job given back (its worker stopped before starting it) waits again in its place."""
        self._add(entry, now)

    def _add(self, entry: Entry, now: float) -> None:
        if entry.priority == "batch" and not self._queued["batch"]:
            self._batch_at = now  # the starvation clock starts when batch work appears
        flow = self._flows.setdefault((entry.priority, entry.owner), _Flow())
        flow.queued_cost += entry.cost
        flow.queued += 1
        self._queued_cost[entry.priority] += entry.cost
        self._queued[entry.priority] += 1
        self._entries[entry.job_id] = entry
        heapq.heappush(self._heaps[entry.priority], (entry.tag, entry.member, entry.job_id))

    def remove(self, job_id: str) -> Entry | None:
        """Take a job out of the order (cancelled while queued); the heap forgets it lazily."""
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            self._unqueue(entry)
        return entry

    def _unqueue(self, entry: Entry) -> None:
        flow = self._flows[(entry.priority, entry.owner)]
        flow.queued -= 1
        flow.queued_cost = flow.queued_cost - entry.cost if flow.queued else 0.0
        self._queued[entry.priority] -= 1
        remaining = self._queued[entry.priority]
        self._queued_cost[entry.priority] = (
            self._queued_cost[entry.priority] - entry.cost if remaining else 0.0
        )

    def pop(self, now: float) -> Entry | None:
        """The next job to hand out: interactive first, batch when none waits or when it has waited
        `batch_max_wait_s` since the last batch job was taken (or since batch work appeared)."""
        batch_waits = self._head("batch") is not None
        interactive_waits = self._head("interactive") is not None
        if batch_waits and (not interactive_waits or now - self._batch_at >= self._batch_max_wait_s):
            priority = "batch"
        elif interactive_waits:
            priority = "interactive"
        else:
            return None
        _tag, _member, job_id = heapq.heappop(self._heaps[priority])
        entry = self._entries.pop(job_id)
        self._unqueue(entry)
        self._virtual[priority] = max(self._virtual[priority], entry.tag)
        if priority == "batch":
            self._batch_at = now
        return entry

    def _head(self, priority: str) -> tuple[float, str, str] | None:
        heap = self._heaps[priority]
        while heap and self._entries.get(heap[0][2], None) is None:
            heapq.heappop(heap)  # removed (cancelled) or popped and restored under the same key
        return heap[0] if heap else None

    def position(self, job_id: str) -> int | None:
        """Jobs that will be handed out before this one as the order stands (None: not in it)."""
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        same = (other for other in self._entries.values() if other.priority == entry.priority)
        ahead = sum(1 for other in same if other.key < entry.key)
        if entry.priority == "batch":
            ahead += self._queued["interactive"]
        return ahead

    def cost_ahead(self, owner: str, priority: str) -> float:
        """Queued cost that would be taken before a new job of `owner`: all of its own, of every other
        busy owner the part whose fair share falls before the new job's start tag (the fluid
        approximation of the order), and for a batch job all interactive work."""
        tag = self.start_tag(owner, priority)
        ahead = self._queued_cost["interactive"] if priority == "batch" else 0.0
        for (flow_priority, flow_owner), flow in self._flows.items():
            if flow_priority != priority or not flow.queued:
                continue
            if flow_owner == owner:
                ahead += flow.queued_cost
            else:
                ahead += min(max(flow.queued_cost - (flow.finish - tag) * flow.weight, 0.0), flow.queued_cost)
        return ahead

    def forget(self, owner: str) -> None:
        """Drop an owner's finish tags once it holds nothing in the queue (as Redis drops its hash)."""
        for priority in CLASSES:
            flow = self._flows.get((priority, owner))
            if flow is not None and not flow.queued:
                del self._flows[(priority, owner)]
