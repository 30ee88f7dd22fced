"""The step planner, torch-free: its invariants on generated boundaries (hypothesis), fairness and
the starvation bound over simulated runs, and which family a job joins. The whole file runs in
well under 5 s and never imports torch (the last test checks both in a fresh interpreter)."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.planner import (
    Boundary,
    FamilyShape,
    JobShape,
    Planner,
    PreparedBucket,
    RunningRows,
    StepPlan,
    WaitingJob,
    choose_family,
    layout,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- generated boundaries -----------------------------------------------------------------------


@st.composite
def boundaries(draw) -> Boundary:
    families = {}
    for index in range(draw(st.integers(1, 3))):
        sizes = draw(st.sets(st.sampled_from([1, 2, 3, 4, 6, 8]), min_size=1, max_size=4))
        families[f"f{index}"] = FamilyShape.of(sizes, draw(st.booleans()), draw(st.booleans()))
    running, keys = [], iter(range(10_000))
    for family, shape in families.items():
        free = shape.capacity
        for _ in range(draw(st.integers(0, 4))):
            if free == 0:
                break
            rows = draw(st.integers(1, free))
            free -= rows
            running.append(
                RunningRows(
                    f"r{next(keys)}",
                    family,
                    rows,
                    steps_left=draw(st.integers(1, 30)),
                    updating=draw(st.booleans()),
                    owner=draw(st.sampled_from("abc")),
                    cfg=draw(st.booleans()),
                )
            )
    step = draw(st.integers(0, 200))
    waiting = []
    for _ in range(draw(st.integers(0, 8))):
        family = draw(st.sampled_from([*families, None]))
        capacity = families[family].capacity if family is not None else 8
        waiting.append(
            WaitingJob(
                f"w{next(keys)}",
                family,
                rows=draw(st.integers(1, capacity)),
                cost=draw(st.floats(0.01, 50)),
                arrival=draw(st.integers(0, step)),
                owner=draw(st.sampled_from("abcd")),
                weight=draw(st.sampled_from([0.5, 1.0, 4.0])),
                priority=draw(st.sampled_from(["interactive", "batch"])),
                committed=draw(st.booleans()) and draw(st.booleans()),
                cfg=draw(st.booleans()),
            )
        )
    leaving = frozenset(draw(st.sets(st.sampled_from([r.key for r in running]))) if running else ())
    return Boundary(step, tuple(running), tuple(waiting), families, leaving, admit=draw(st.booleans()))


def check_plan(boundary: Boundary, plan: StepPlan, max_wait: int) -> None:
    waiting = {job.key: job for job in boundary.waiting}
    joined = [join.key for join in plan.joins]
    admitted = joined + list(plan.alone)
    assert len(admitted) == len(set(admitted)) and set(admitted) <= set(waiting)
    assert all(waiting[key].family is None for key in plan.alone)
    assert all(waiting[join.key].family == join.family for join in plan.joins)
    if not boundary.admit:
        assert all(waiting[key].committed for key in admitted)
    committed = {key for key, job in waiting.items() if job.committed}
    assert committed <= set(admitted) | set(plan.deferred)

    # No row lost or duplicated: the staying rows and the joining jobs, each once, in its family.
    staying = {row.key: row for row in boundary.running if row.key not in boundary.leaving}
    placed = [(family, p) for family, lay in plan.layouts.items() for p in lay.rows]
    keys = [p.key for _, p in placed]
    assert len(keys) == len(set(keys)) and set(keys) == set(staying) | set(joined)
    assert set(plan.leave) == set(boundary.leaving)
    for family, p in placed:
        source = staying.get(p.key) or waiting[p.key]
        assert (source.family, source.rows) == (family, p.rows)
        assert p.updating == (staying[p.key].updating if p.key in staying else True)
        assert p.cfg == source.cfg

    for family, lay in plan.layouts.items():
        shape = boundary.families[family]
        # Compact from row 0, capacity never exceeded, the smallest bucket that holds the rows.
        start = 0
        for p in lay.rows:
            assert p.start == start
            start += p.rows
        assert lay.used == start <= lay.bucket <= shape.capacity
        assert lay.bucket == min(b for b in shape.buckets if b >= lay.used)
        # Every mask-updating row inside the guidance prefix; the smallest captured prefix.
        updating = [p for p in lay.rows if p.updating]
        if not updating:
            assert lay.guidance is None
        else:
            assert lay.guidance is not None
            assert all(p.start + p.rows <= lay.guidance for p in updating)
            prefixes = shape.guidance[shape.buckets.index(lay.bucket)]
            assert lay.guidance == min(g for g in prefixes if g >= max(p.start + p.rows for p in updating))
        # Every row with CFG inside the unconditional prefix (None: every row), the smallest captured.
        cfg_end = max((p.start + p.rows for p in lay.rows if p.cfg), default=0)
        if shape.uncond is None:
            assert lay.uncond is None
        else:
            prefixes = shape.uncond[shape.buckets.index(lay.bucket)]
            smallest = min(u for u in prefixes if u >= cfg_end)
            assert lay.uncond == (None if smallest == lay.bucket else smallest)
            # No worse than keeping the phases first (the layout without CFG-free prefixes).
            rows = sorted(lay.rows, key=lambda p: (not p.updating, not p.cfg))
            phases_first = layout(replace(shape, uncond=None), [(p.key, p.rows, p.updating) for p in rows])
            uncond_rows = lay.bucket if lay.uncond is None else lay.uncond
            assert (lay.guidance or 0) + uncond_rows <= (phases_first.guidance or 0) + lay.bucket
        # Work-conserving: a job left waiting does not fit, or an overdue head reserved its family.
        if boundary.admit:
            free = shape.capacity - lay.used
            for job in boundary.waiting:
                if job.family == family and job.key not in admitted and not job.committed:
                    assert job.rows > free or family in plan.reserved, job
    # A reserved family holds a job left waiting that is overdue (a head ages no faster than a job).
    for family in plan.reserved:
        assert boundary.admit
        assert any(
            job.family == family and job.key not in admitted and boundary.step - job.arrival >= max_wait
            for job in boundary.waiting
        ), family
    if boundary.admit:
        alone = [job.key for job in boundary.waiting if job.family is None and not job.committed]
        assert set(alone) <= set(plan.alone)


@SETTINGS
@given(boundaries(), st.integers(0, 50))
def test_every_plan_keeps_the_invariants(boundary, max_wait):
    check_plan(boundary, Planner(max_wait).plan(boundary), max_wait)


# ---- simulated runs -----------------------------------------------------------------------------


@dataclass
class Sim:
    """Boundaries of one worker: arrivals join a bounded waiting list (the worker holds at most
    `hold` jobs), admitted jobs run `steps` steps and leave."""

    planner: Planner
    families: dict
    hold: int = 16
    step: int = 0

    def __post_init__(self):
        self.running: list[list] = []  # [RunningRows, steps_left]
        self.waiting: list[WaitingJob] = []
        self.steps: dict = {}
        self.arrival: dict = {}
        self.admitted_at: dict = {}
        self.served: dict[str, float] = {}
        self.ahead: dict = {}  # jobs of the same owner and priority waiting when a job was offered
        self.head_at: dict = {}  # the boundary a job became the first of its owner queue

    def offer(self, job: WaitingJob, steps: int) -> bool:
        if len(self.waiting) >= self.hold:
            return False
        self.ahead[job.key] = sum(w.owner == job.owner and w.priority == job.priority for w in self.waiting)
        self.waiting.append(replace(job, arrival=self.step))
        self.arrival[job.key] = self.step
        self.steps[job.key] = steps
        return True

    def _note_heads(self) -> None:
        heads: dict = {}
        for job in sorted(self.waiting, key=lambda job: (job.deadline, job.arrival, str(job.key))):
            heads.setdefault((job.priority, job.owner), job)
        for job in heads.values():
            self.head_at.setdefault(job.key, self.step)

    def boundary(self) -> StepPlan:
        self._note_heads()
        running = tuple(
            RunningRows(r.key, r.family, r.rows, left, left > 1, r.owner, r.priority)
            for r, left in self.running
        )
        boundary = Boundary(self.step, running, tuple(self.waiting), self.families)
        plan = self.planner.plan(boundary)
        check_plan(boundary, plan, self.planner.max_wait)
        jobs = {job.key: job for job in self.waiting}
        for key in plan.admitted:
            job = jobs[key]
            self.admitted_at[key] = self.step
            self.served[job.owner] = self.served.get(job.owner, 0.0) + job.cost
            if job.family is not None:
                row = RunningRows(key, job.family, job.rows, self.steps[key], True, job.owner, job.priority)
                self.running.append([row, self.steps[key]])
        self.waiting = [job for job in self.waiting if job.key not in set(plan.admitted)]
        # One step: every running job advances; those whose loop ends leave.
        for entry in self.running:
            entry[1] -= 1
        self.running = [entry for entry in self.running if entry[1] > 0]
        self.step += 1
        return plan


def job(key, owner, cost=1.0, rows=1, family="f", weight=1.0, priority="interactive"):
    return WaitingJob(key, family, rows, cost, 0, owner, weight, priority)


def test_shares_follow_the_weights_while_both_owners_wait():
    sim = Sim(Planner(max_wait=1000), {"f": FamilyShape.of([1, 2, 4], True)}, hold=40)
    count = 0
    for _ in range(400):
        for owner, weight in (("light", 1.0), ("heavy", 3.0)):
            while sum(j.owner == owner for j in sim.waiting) < 10:
                sim.offer(job(f"{owner}{count}", owner, weight=weight), steps=4)
                count += 1
        sim.boundary()
    ratio = sim.served["heavy"] / sim.served["light"]
    assert 2.8 <= ratio <= 3.2, ratio


def test_a_light_owner_is_not_behind_a_heavy_backlog():
    """The heavy owner holds 15 jobs waiting; the light owner's job joins at the next free row."""
    sim = Sim(Planner(max_wait=1000), {"f": FamilyShape.of([1, 2], False)}, hold=16)
    for i in range(15):
        sim.offer(job(f"h{i}", "heavy"), steps=5)
    for _ in range(3):
        sim.boundary()
    sim.offer(job("light", "light"), steps=5)
    while "light" not in sim.admitted_at:
        sim.boundary()
    assert sim.admitted_at["light"] - 3 <= 5  # the first rows that free up
    assert sum(key.startswith("h") for key in sim.admitted_at) <= 6


def test_an_owner_that_idled_banks_no_credit():
    """A fresh owner does not take every row until it has caught up with a long-served one."""
    sim = Sim(Planner(max_wait=1000), {"f": FamilyShape.of([1, 2, 4], True)}, hold=40)
    count = 0

    def feed(owner):
        nonlocal count
        while sum(j.owner == owner for j in sim.waiting) < 8:
            sim.offer(job(f"{owner}{count}", owner), steps=4)
            count += 1

    for _ in range(100):
        feed("old")
        sim.boundary()
    before = dict(sim.served)
    for _ in range(100):
        feed("old")
        feed("new")
        sim.boundary()
    old, new = sim.served["old"] - before["old"], sim.served["new"]
    assert 0.8 <= new / old <= 1.25, (old, new)


def test_interactive_joins_before_batch_and_batch_fills_spare_rows():
    planner = Planner(max_wait=100)
    families = {"f": FamilyShape.of([1, 2, 4], True)}
    waiting = (
        job("b1", "x", priority="batch"),
        job("b2", "y", priority="batch"),
        replace(job("i1", "z", rows=2), arrival=5),
    )
    running = (RunningRows("r", "f", 1, 3, False),)
    plan = planner.plan(Boundary(5, running, waiting, families))
    assert [join.key for join in plan.joins] == ["i1", "b1"]  # 1 + 2 + 1 rows of 4
    assert plan.layouts["f"].keys == ["i1", "b1", "r"]


@pytest.mark.parametrize("max_wait", [0, 3, 20])
def test_no_job_waits_longer_than_its_bound(max_wait):
    """A flood (more work than rows) of interactive jobs of many owners, batch jobs and jobs of
    every size. The first job of each owner queue (owner, priority) joins within
    max_wait + queues x (most steps a job runs) boundaries of becoming that first job (overdue
    heads ahead of it in its family each hold it at most one run); a job with k jobs of its queue
    ahead of it, within k + 1 such bounds of becoming ready."""
    rng = random.Random(max_wait)
    families = {"f": FamilyShape.of([1, 2, 4, 8], True), "g": FamilyShape.of([1, 2], False)}
    hold, most_steps = 12, 9
    owners, priorities = ["heavy"] * 6 + ["a", "b", "c"], ["interactive"] * 3 + ["batch"]
    sim = Sim(Planner(max_wait), families, hold=hold)
    for index in range(3000):
        family = rng.choice(["f", "f", "g", None])
        rows = rng.randint(1, families[family].capacity if family else 3)
        sim.offer(
            WaitingJob(
                index,
                family,
                rows,
                cost=rows * rng.uniform(0.5, 4),
                arrival=0,
                owner=rng.choice(owners),
                weight=rng.choice([1.0, 2.0]),
                priority=rng.choice(priorities),
            ),
            steps=rng.randint(1, most_steps),
        )
        sim.boundary()
    head_bound = max_wait + len(set(owners)) * len(set(priorities)) * most_steps
    admitted = [key for key in sim.arrival if key in sim.admitted_at]
    assert len(admitted) > 1000
    # A job admitted past its queue's first (that one did not fit) never waited as a head.
    as_head = max(sim.admitted_at[key] - sim.head_at.get(key, sim.admitted_at[key]) for key in admitted)
    assert as_head <= head_bound, (as_head, head_bound)
    late = [
        key for key in admitted if sim.admitted_at[key] - sim.arrival[key] > (sim.ahead[key] + 1) * head_bound
    ]
    assert not late, late[:5]
    assert all(sim.step - job.arrival <= (sim.ahead[job.key] + 1) * head_bound for job in sim.waiting)


def test_an_overloaded_owners_backlog_does_not_push_others_back_to_arrival_order():
    """The heavy owner's jobs have all waited past max_wait (the worker is overloaded by them):
    its backlog as a whole is not overdue, only its first job, so the light owner's new job still
    joins at the first rows that free up, not behind the backlog."""
    sim = Sim(Planner(max_wait=3), {"f": FamilyShape.of([1, 2], False)}, hold=16)
    for i in range(15):
        sim.offer(job(f"h{i}", "heavy"), steps=5)
    for _ in range(12):  # rows free up every 5 boundaries: the backlog ages past max_wait
        sim.boundary()
    sim.offer(job("light", "light"), steps=5)
    while "light" not in sim.admitted_at:
        sim.boundary()
    assert sim.admitted_at["light"] - 12 <= 5  # the first rows that free up
    overtaken = [key for key in sim.admitted_at if key.startswith("h") and sim.admitted_at[key] > 12]
    assert len(overtaken) <= 2, overtaken  # at most the heavy queue's one overdue head per free row


@pytest.mark.parametrize("big", ["whole-family", "batch"])
def test_a_flood_of_small_interactive_jobs_starves_nothing(big):
    """Always a one-row interactive job of several owners waiting: a job needing all 8 rows, or a
    batch job, still joins within max_wait + hold x steps boundaries."""
    max_wait, hold, steps = 10, 12, 6
    sim = Sim(Planner(max_wait), {"f": FamilyShape.of([1, 2, 4, 8], True)}, hold=hold)
    target = job("big", "patient", rows=8) if big == "whole-family" else job("big", "x", priority="batch")
    rng = random.Random(1)
    for index in range(100):
        while len(sim.waiting) < hold - 1:  # rows free up one or two at a time, never all at once
            small = job(f"s{index}-{len(sim.waiting)}", f"o{index % 3}", cost=0.1)
            sim.offer(small, steps=rng.randint(1, steps))
        if index == 5:
            sim.offer(target, steps=steps)
        sim.boundary()
    assert "big" in sim.admitted_at
    assert sim.admitted_at["big"] - sim.arrival["big"] <= max_wait + hold * steps


# ---- layout and shapes ---------------------------------------------------------------------------


def test_layout_keeps_updating_rows_first_and_order_within_a_phase():
    shape = FamilyShape.of([1, 2, 4, 8], True)
    lay = layout(shape, [("a", 1, False), ("b", 2, True), ("c", 1, False), ("new", 1, True)])
    assert lay.keys == ["b", "new", "a", "c"] and lay.bucket == 8 and lay.guidance == 4
    assert layout(shape, [("a", 1, False)]).guidance is None
    assert layout(FamilyShape.of([1, 2, 4], False), [("a", 1, True), ("b", 1, False)]).guidance == 2
    with pytest.raises(ValueError, match="capacity"):
        layout(shape, [("a", 9, True)])


def test_layout_puts_rows_with_cfg_in_the_smallest_unconditional_prefix():
    """CFG-free rows (guidance <= 1) need no unconditional sample: with unconditional prefixes
    captured, a batch of CFG-free rows runs none, and mixed rows keep CFG ones first."""
    shape = FamilyShape.of([1, 2, 4], True, partial_uncond=True)
    assert shape.uncond == ((0, 1), (0, 1, 2), (0, 1, 2, 4))
    free = layout(shape, [("a", 2, True, False), ("b", 2, False, False)])
    assert free.uncond == 0 and free.guidance == 2 and free.bucket == 4
    mixed = layout(shape, [("a", 1, True, False), ("b", 1, True, True), ("c", 2, False, False)])
    assert mixed.keys == ["b", "a", "c"] and mixed.uncond == 1 and mixed.guidance == 2
    # Updating rows without CFG, a reusing row with CFG: CFG first costs 4 + 1 rows, phases first 2 + 4.
    swapped = layout(shape, [("a", 1, True, False), ("b", 1, True, False), ("c", 1, False, True)])
    assert swapped.keys == ["c", "a", "b"] and (swapped.guidance, swapped.uncond) == (4, 1)
    every = layout(shape, [("a", 3, True, True)])
    assert every.uncond is None and every.bucket == 4
    # Without captured unconditional prefixes, CFG plays no part in the order.
    plain = layout(FamilyShape.of([1, 2, 4], True), [("a", 1, True, False), ("b", 1, True, True)])
    assert plain.keys == ["a", "b"] and plain.uncond is None


def test_family_shapes_are_checked():
    with pytest.raises(ValueError):
        FamilyShape((2, 1), ((2,), (1,)))
    with pytest.raises(ValueError):
        FamilyShape((2,), ((1,),))
    assert FamilyShape.of([4, 1, 2], True).guidance == ((1,), (1, 2), (1, 2, 4))


def test_a_job_naming_an_unknown_family_or_too_many_rows_is_refused():
    planner = Planner()
    families = {"f": FamilyShape.of([1, 2], True)}
    with pytest.raises(ValueError, match="does not offer"):
        planner.plan(Boundary(0, (), (job("x", "o", family="nope"),), families))
    with pytest.raises(ValueError, match="runs alone"):
        planner.plan(Boundary(0, (), (job("x", "o", rows=3),), families))


# ---- which family a job joins --------------------------------------------------------------------

DPM = "dpm-settings"


def prepared(*buckets):
    return [PreparedBucket(batch, 64, 64, subjects, DPM) for batch, subjects in buckets]


def test_family_holds_exactly_its_rows_and_subjects():
    shape = JobShape(64, 64, subjects=2, rows=2, settings=DPM, capturable=True)
    assert choose_family(shape, 4, prepared((2, 2))) == (64, 64, 2, DPM)
    assert choose_family(shape, 4, prepared((1, 2))) is None  # one row too few
    assert choose_family(shape, 4, prepared((2, 1))) is None  # one subject slot too few


def test_family_is_the_one_with_the_fewest_subject_slots():
    shape = JobShape(64, 64, subjects=1, rows=1, settings=DPM, capturable=True)
    assert choose_family(shape, 4, prepared((4, 3), (4, 1), (4, 2))) == (64, 64, 1, DPM)
    other_size = [PreparedBucket(4, 96, 96, 1, DPM), PreparedBucket(4, 64, 64, 1, "ddim")]
    assert choose_family(shape, 4, other_size) is None


def test_a_job_of_exactly_max_rows_images_joins_one_more_runs_alone():
    shape = JobShape(64, 64, subjects=1, rows=4, settings=DPM, capturable=True)
    assert choose_family(shape, 4) == (64, 64, 1, DPM)
    assert choose_family(replace(shape, rows=5), 4) is None
    assert choose_family(shape, 4, prepared((4, 1))) == (64, 64, 1, DPM)
    assert choose_family(replace(shape, rows=5), 4, prepared((8, 1))) is None


def test_a_host_stepped_scheduler_runs_alone():
    shape = JobShape(64, 64, subjects=1, rows=1, settings="diffusers", capturable=False)
    assert choose_family(shape, 4) is None
    assert choose_family(shape, 4, [PreparedBucket(4, 64, 64, 1, "diffusers")]) is None


# ---- torch-free and fast -------------------------------------------------------------------------


def test_this_file_runs_without_torch_in_under_5_seconds():
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys, time, pytest\n"
        "started = time.perf_counter()\n"
        f"code = pytest.main(['-q', '-p', 'no:cacheprovider', '{Path(__file__)}', "
        "'-k', 'not runs_without_torch'])\n"
        "print('SECONDS', time.perf_counter() - started)\n"
        "print('TORCH', 'torch' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "TORCH False" in done.stdout, done.stdout[-2000:]
    seconds = float(done.stdout.split("SECONDS ")[1].split()[0])
    assert seconds < 5.0, seconds
