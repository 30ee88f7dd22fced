"""The step planner: every decision of step-level batching, as a pure function of plain data.

At each step boundary the worker describes what it holds (`Boundary`: the rows that keep running,
the ones that leave, the prepared jobs waiting, the families a job may join) and the planner
answers with a `StepPlan`: which jobs join which family, which run alone, and per family the
layout of the next step (where each job's rows sit, which bucket steps, how many rows the
guidance pass covers). The executor (`engines.step_scheduler.StepScheduler` over
`engines.step_batching.RunningBatch`) applies the plan and reports back nothing but finished rows.
No torch, no model, no I/O: the planner is tested in milliseconds (tests/engines/test_planner.py).

Order of admission (the jobs that join, when rows are free):

1. jobs already started in the queue (`WaitingJob.committed`: a previous plan admitted them);
2. overdue heads: each owner's jobs form one queue per priority (by deadline, then arrival); the
   first of such a queue (its head) that has been the head for `max_wait` boundaries or more goes
   first, oldest first; one that does not fit reserves its family (nothing else joins it until the
   overdue head has): the starvation bound. Ages count from becoming the head, not from arrival,
   so an owner's own backlog never becomes "overdue" as a whole and cannot push other owners back
   to arrival order when the worker is overloaded;
3. interactive jobs, then batch jobs (batch fills the rows interactive jobs left): within a
   priority, owners take turns by weighted fair queuing on cost (`realcustom.cost`): the owner
   whose admitted cost / weight is lowest goes first (an owner that comes back after idling starts
   at the backlogged owners' level, so idling banks no credit); an owner's own jobs go by deadline,
   then arrival. A job that does not fit is passed over (smaller jobs of others may fit).

Layout of a family: rows in their mask-update phase first (the guidance pass covers a prefix),
otherwise in their present order (rows move only where they must), joining jobs after the rows
of their phase; rows compact to [0, used) of the smallest bucket that holds them. Where the family
also has steps whose generation pass runs the unconditional half on a prefix only (CFG-free rows,
guidance <= 1, need no unconditional sample), rows with CFG go first within their phase, or the
phases go within CFG-first order: of the two, the layout whose guidance prefix plus unconditional
prefix holds fewer rows (the work of a step beyond its B conditional rows).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")
Family = Hashable


@dataclass(frozen=True)
class FamilyShape:
    """What one family of running rows can hold: its buckets' row counts (ascending) and, per
    bucket, the guidance prefixes captured for it (ascending; the bucket itself = every row) and
    the unconditional prefixes of its generation pass (ascending from 0, ending at the bucket; None:
    every row only)."""

    buckets: tuple[int, ...]
    guidance: tuple[tuple[int, ...], ...]
    uncond: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be ascending row counts >= 1, got {self.buckets}")
        if len(self.guidance) != len(self.buckets):
            raise ValueError("one tuple of guidance prefixes per bucket")
        for bucket, prefixes in zip(self.buckets, self.guidance, strict=True):
            if not prefixes or prefixes[-1] != bucket or list(prefixes) != sorted(set(prefixes)):
                raise ValueError(f"guidance prefixes of bucket {bucket} must ascend and end at it")
        if self.uncond is not None:
            if len(self.uncond) != len(self.buckets):
                raise ValueError("one tuple of unconditional prefixes per bucket")
            for bucket, prefixes in zip(self.buckets, self.uncond, strict=True):
                if not prefixes or prefixes[-1] != bucket or list(prefixes) != sorted(set(prefixes)):
                    raise ValueError(f"unconditional prefixes of bucket {bucket} must ascend and end at it")
                if prefixes[0] < 0:
                    raise ValueError("unconditional prefixes are row counts >= 0")

    @classmethod
    def of(cls, buckets: Iterable[int], partial_guidance: bool, partial_uncond: bool = False) -> FamilyShape:
        """Buckets whose guidance prefixes are 1, 2, 4 ... below each bucket (when captured), and
        whose unconditional prefixes are 0, 1, 2, 4 ... (when captured)."""
        ordered = tuple(sorted(set(buckets)))
        guidance = tuple((*_powers(bucket, partial_guidance), bucket) for bucket in ordered)
        uncond = None
        if partial_uncond:
            uncond = tuple((0, *_powers(bucket, True), bucket) for bucket in ordered)
        return cls(ordered, guidance, uncond)

    @property
    def capacity(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, used: int) -> int:
        return next(bucket for bucket in self.buckets if bucket >= used)

    def guidance_for(self, bucket: int, updating: int) -> int | None:
        """Rows the next step's guidance pass covers: the smallest prefix holding the updating rows
        (`updating`: the end of the last one); None when no row updates its masks (the step reuses
        them)."""
        if updating == 0:
            return None
        prefixes = self.guidance[self.buckets.index(bucket)]
        return next(rows for rows in prefixes if rows >= updating)

    def uncond_for(self, bucket: int, cfg_end: int) -> int | None:
        """Rows the unconditional half of the next generation pass covers: the smallest captured
        prefix holding every row with CFG (`cfg_end`: the end of the last one); None = every row."""
        if self.uncond is None:
            return None
        prefixes = self.uncond[self.buckets.index(bucket)]
        rows = next(rows for rows in prefixes if rows >= cfg_end)
        return None if rows == bucket else rows


def _powers(bucket: int, partial: bool) -> list[int]:
    """1, 2, 4 ... below `bucket` (none unless `partial`)."""
    prefixes, rows = [], 1
    while partial and rows < bucket:
        prefixes.append(rows)
        rows *= 2
    return prefixes


@dataclass(frozen=True)
class RunningRows:
    """One running job's rows, as they stand at the boundary (in their family's present order)."""

    key: Hashable
    family: Family
    rows: int
    steps_left: int  # steps still to run (>= 1: a job whose loop ended has left already)
    updating: bool  # its next step updates its masks (before its mask-reuse step)
    owner: str = ""
    priority: Priority = "interactive"
    cfg: bool = True  # its rows need the unconditional sample (guidance > 1)


@dataclass(frozen=True)
class WaitingJob:
    """A prepared job waiting to join. `family` None: it runs its whole loop alone."""

    key: Hashable
    family: Family | None
    rows: int
    cost: float
    arrival: int  # the boundary it became ready at (ages count boundaries)
    owner: str = ""
    weight: float = 1.0
    priority: Priority = "interactive"
    deadline: float = float("inf")
    committed: bool = False  # started in the queue already: placed first, never refused
    cfg: bool = True  # its rows need the unconditional sample (guidance > 1)


@dataclass(frozen=True)
class Boundary:
    """Everything the planner reads: one step boundary, as plain data."""

    step: int
    running: tuple[RunningRows, ...] = ()
    waiting: tuple[WaitingJob, ...] = ()
    families: Mapping[Family, FamilyShape] = field(default_factory=dict)
    leaving: frozenset = frozenset()  # running keys that leave now (cancelled, failed)
    admit: bool = True  # False: place committed jobs only


@dataclass(frozen=True)
class Placement:
    key: Hashable
    start: int
    rows: int
    updating: bool
    cfg: bool = True


@dataclass(frozen=True)
class FamilyLayout:
    """The next step of one family: rows [0, used) of the `bucket`-row state, the guidance pass
    on its first `guidance` rows (None: masks are reused), the unconditional half of the
    generation pass on its first `uncond` rows (None: every row of the bucket)."""

    bucket: int
    rows: tuple[Placement, ...]
    guidance: int | None
    uncond: int | None = None

    @property
    def used(self) -> int:
        return sum(placement.rows for placement in self.rows)

    @property
    def keys(self) -> list[Hashable]:
        return [placement.key for placement in self.rows]


@dataclass(frozen=True)
class Join:
    key: Hashable
    family: Family


@dataclass(frozen=True)
class StepPlan:
    """What the executor does at a boundary, in this order: `leave`, run `alone` jobs, then lay
    out every family (`layouts`, joining jobs loaded at their placement) and step."""

    leave: tuple[Hashable, ...] = ()
    joins: tuple[Join, ...] = ()
    alone: tuple[Hashable, ...] = ()
    layouts: Mapping[Family, FamilyLayout] = field(default_factory=dict)
    deferred: tuple[Hashable, ...] = ()  # committed jobs that did not fit (they wait, committed)
    reserved: frozenset = frozenset()  # families an overdue head that did not fit holds for itself

    @property
    def admitted(self) -> tuple[Hashable, ...]:
        return tuple(join.key for join in self.joins) + self.alone


Row = tuple  # (key, rows, updating) or (key, rows, updating, cfg); cfg defaults to True


def layout(shape: FamilyShape, rows: Sequence[Row]) -> FamilyLayout:
    """(key, rows, updating[, cfg]) in present order (joining jobs last) -> the family's next step."""
    entries = [(row[0], row[1], row[2], row[3] if len(row) > 3 else True) for row in rows]
    used = sum(count for _, count, _, _ in entries)
    if used > shape.capacity:
        raise ValueError(f"{used} rows exceed the family's capacity of {shape.capacity}")
    bucket = shape.bucket_for(used)
    orders = [lambda row: not row[2]]  # stable: present order within a phase
    if shape.uncond is not None:
        orders = [lambda row: (not row[2], not row[3]), lambda row: (not row[3], not row[2])]
    best = None
    for order in orders:
        placements, start, updating_end, cfg_end = [], 0, 0, 0
        for key, count, updating, cfg in sorted(entries, key=order):
            placements.append(Placement(key, start, count, updating, cfg))
            start += count
            updating_end = start if updating else updating_end
            cfg_end = start if cfg else cfg_end
        guidance = shape.guidance_for(bucket, updating_end)
        uncond = shape.uncond_for(bucket, cfg_end)
        work = (guidance or 0) + (bucket if uncond is None else uncond)
        if best is None or work < best[0]:
            best = (work, FamilyLayout(bucket, tuple(placements), guidance, uncond))
    return best[1]


class Planner:
    """Fair admission across owners and priorities, with a starvation bound; holds only its
    accounting between boundaries: admitted cost / weight per owner, and since when each owner
    queue's head has been its head.

    max_wait: boundaries an owner queue's head may be passed over before it goes first. A head
    then joins within max_wait + (overdue heads ahead of it in its family + 1) x (the most steps a
    running job has left) boundaries of becoming the head; a job with k jobs of its owner and
    priority ahead of it, within k + 1 such bounds (tests/engines/test_planner.py checks both).
    """

    def __init__(self, max_wait: int = 64) -> None:
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.max_wait = max_wait
        self._served: dict[str, float] = {}  # admitted cost / weight per owner (virtual time)
        self._backlogged: set[str] = set()  # owners with jobs waiting at the last boundary
        self._last_start = 0.0  # virtual time of the latest admission
        # (priority, owner) -> (its head's key, the boundary it became the head at)
        self._heads: dict[tuple[str, str], tuple[Hashable, int]] = {}

    def served(self, owner: str) -> float:
        return self._served.get(owner, 0.0)

    def plan(self, boundary: Boundary) -> StepPlan:
        families = boundary.families
        staying = [row for row in boundary.running if row.key not in boundary.leaving]
        free = {family: shape.capacity for family, shape in families.items()}
        for row in staying:
            free[row.family] -= row.rows
        joins: list[WaitingJob] = []
        alone: list[WaitingJob] = []
        deferred: list[WaitingJob] = []

        def fits(job: WaitingJob) -> bool:
            if job.family is None:
                return True
            if job.family not in families:
                raise ValueError(f"job {job.key!r} names family {job.family!r} the boundary does not offer")
            if job.rows > families[job.family].capacity:
                raise ValueError(f"job {job.key!r} has more rows than its family holds: it runs alone")
            return job.rows <= free[job.family]

        def take(job: WaitingJob) -> None:
            if job.family is None:
                alone.append(job)
            else:
                free[job.family] -= job.rows
                joins.append(job)

        committed = (job for job in boundary.waiting if job.committed)
        for job in sorted(committed, key=lambda job: (job.arrival, str(job.key))):
            (take if fits(job) else deferred.append)(job)
        reserved = self._admit(boundary, fits, take) if boundary.admit else set()

        layouts = {}
        by_family: dict[Family, list[tuple[Hashable, int, bool]]] = defaultdict(list)
        for row in staying:
            by_family[row.family].append((row.key, row.rows, row.updating, row.cfg))
        for job in joins:
            by_family[job.family].append((job.key, job.rows, True, job.cfg))  # a joining job starts at step 0
        for family, rows in by_family.items():
            layouts[family] = layout(families[family], rows)
        return StepPlan(
            leave=tuple(row.key for row in boundary.running if row.key in boundary.leaving),
            joins=tuple(Join(job.key, job.family) for job in joins),
            alone=tuple(job.key for job in alone),
            layouts=layouts,
            deferred=tuple(job.key for job in deferred),
            reserved=frozenset(reserved),
        )

    # ---- fair admission -------------------------------------------------------------------------

    def _admit(self, boundary: Boundary, fits, take) -> set[Family]:
        """Overdue heads, then owners in fair order per priority; the families reserved."""
        candidates = [job for job in boundary.waiting if not job.committed]
        self._catch_up({job.owner for job in candidates})
        queues: dict[tuple[str, str], list[WaitingJob]] = defaultdict(list)
        for job in candidates:
            queues[job.priority, job.owner].append(job)
        for jobs in queues.values():
            jobs.sort(key=lambda job: (job.deadline, job.arrival, str(job.key)))
        since = self._head_ages(boundary.step, queues)
        overdue = sorted(
            (jobs[0] for queue, jobs in queues.items() if boundary.step - since[queue] >= self.max_wait),
            key=lambda job: (since[job.priority, job.owner], job.arrival, str(job.key)),
        )
        reserved: set[Family] = set()
        admitted: set[Hashable] = set()
        for job in overdue:
            if job.family is not None and job.family in reserved:
                continue
            if fits(job):
                self._charge(job)
                take(job)
                admitted.add(job.key)
            else:
                reserved.add(job.family)
        for priority in PRIORITIES:
            turns = {
                owner: [job for job in jobs if job.key not in admitted and job.family not in reserved]
                for (queue_priority, owner), jobs in queues.items()
                if queue_priority == priority
            }
            turns = {owner: jobs for owner, jobs in turns.items() if jobs}
            while turns:
                owner = min(turns, key=lambda o: (self.served(o), turns[o][0].arrival, o))
                job = turns[owner].pop(0)
                if not turns[owner]:
                    del turns[owner]
                if fits(job):
                    self._charge(job)
                    take(job)
        return reserved

    def _head_ages(self, step: int, queues: Mapping[tuple[str, str], list[WaitingJob]]) -> dict:
        """Per owner queue, the boundary its present head became its head: kept while the head
        stays; a head that took over from an admitted one starts now; the first head of a queue
        this planner had not seen starts when it became ready."""
        since = {}
        for queue, jobs in queues.items():
            head = jobs[0].key
            known = self._heads.get(queue)
            if known is not None and known[0] == head:
                since[queue] = known[1]
            else:
                since[queue] = step if known is not None else min(jobs[0].arrival, step)
        self._heads = {queue: (jobs[0].key, since[queue]) for queue, jobs in queues.items()}
        return since

    def _catch_up(self, backlogged: set[str]) -> None:
        """An owner that starts waiting again resumes at the level of those that kept waiting (or
        of the latest admission): idle time is not credit. Owners at or below it are forgotten."""
        kept = [self.served(owner) for owner in backlogged & self._backlogged]
        floor = min(kept) if kept else self._last_start
        for owner in backlogged - self._backlogged:
            self._served[owner] = max(self.served(owner), floor)
        for owner in [o for o, served in self._served.items() if o not in backlogged and served <= floor]:
            del self._served[owner]
        self._backlogged = backlogged

    def _charge(self, job: WaitingJob) -> None:
        self._last_start = self.served(job.owner)
        self._served[job.owner] = self._last_start + job.cost / job.weight


# ---- which family a job joins (what the executor can hold) ---------------------------------------


@dataclass(frozen=True)
class JobShape:
    """What decides a job's family: its size, subjects, rows (images) and graph settings."""

    height: int
    width: int
    subjects: int
    rows: int
    settings: Hashable
    capturable: bool  # its sampler steps on the device (a host-stepped one runs alone)


@dataclass(frozen=True)
class PreparedBucket:
    batch: int
    height: int
    width: int
    subjects: int
    settings: Hashable


def choose_family(
    job: JobShape, max_rows: int, prepared: Iterable[PreparedBucket] | None = None
) -> tuple[int, int, int, Hashable] | None:
    """(height, width, subject slots, settings) of the family the job joins, or None: it runs alone.

    `prepared` None: families are made on demand (eager), one per exact shape. Else the job goes to
    the family with the fewest subject slots among the prepared buckets of its size and settings
    that hold its subjects and its rows."""
    if not job.capturable or job.rows > max_rows:
        return None
    if prepared is None:
        return job.height, job.width, job.subjects, job.settings
    slots = sorted(
        bucket.subjects
        for bucket in prepared
        if bucket.settings == job.settings
        and (bucket.height, bucket.width) == (job.height, job.width)
        and bucket.subjects >= job.subjects
        and bucket.batch >= job.rows
    )
    return (job.height, job.width, slots[0], job.settings) if slots else None
