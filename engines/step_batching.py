"""Step-level batching: the executor of one family's part of a `StepPlan` (engines/planner.py).

A `RunningBatch` serves one family of prepared buckets of a `GraphLoop`: same size, subject slots
and graph settings, several row counts (e.g. 1, 2, 4, 8). It decides nothing: the planner's
`FamilyLayout` says where each request's rows sit, which bucket steps and how many rows the
guidance pass covers; `apply` carries it out between two steps:

* rows of requests the layout leaves out are dropped (finished rows left with their step);
* the remaining rows move to their new place, into the named bucket's state when it changes
  (`LoopState.copy_rows`: step index, sampler state, masks, schedule rows, conditioning, image K/V);
* joining requests are loaded at their place (`LoopState.load_rows`: conditioning, adapters, noise
  and image K/V at step 0; `RowSchedule.load`: the request's own schedule, with its sampler's
  options: custom timesteps, TCD's eta).

Each row carries its own step index, step count, guidance scale, mask scope and mask-reuse step,
so requests with different step counts and mask-reuse steps share one UNet batch; what changes the
captured operations (scheduler family, mask mode, overlap, size, subject slots) selects the family.
A step runs the MASK_UPDATE graph whose guidance (text-only) pass covers the layout's guidance
prefix (every row updating its masks lies inside it: checked), the MASK_REUSE graph when no row
updates (rows past their phase keep their masks either way), and its generation pass runs the
unconditional half on the layout's prefix (every row with CFG lies inside it: checked; CFG-free
rows, guidance <= 1, need no unconditional sample) when the graphs were captured with unconditional
prefixes (`GraphLoop(partial_uncond=True)`), on every row otherwise. Rows past `used` are parked at step 0
with zero latents, so their (discarded) computation stays finite. Rows do not interact: a
request's result does not depend on its companions beyond floating-point reduction order.

`join`, `cancel` and `step` are the same moves for callers without a planner (tests, benchmarks):
each lays the rows out with `engines.planner.layout`, the planner's own rule.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from engines.graph_loop import GraphLoop
from engines.planner import FamilyLayout, FamilyShape, layout
from engines.static_loop import Bucket, GraphSettings
from realcustom.step import Conditioning, ImageKeyValues, LoopState, StepKind

UPDATE, REUSE = StepKind.MASK_UPDATE, StepKind.MASK_REUSE


@dataclass
class RowRequest:
    """One request's loop: `cond` and `latents` hold its samples (one row each)."""

    key: Hashable
    cond: Conditioning
    latents: torch.Tensor
    num_steps: int
    mask_reused_step: int
    # `LoopState.image_key_values(unet, cond, slots)` when computed ahead (off the stepping thread).
    key_values: ImageKeyValues | None = field(default=None, repr=False)
    # The sampler's options (realcustom.schedulers.SCHEDULER_OPTIONS): custom timesteps, TCD's eta.
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None
    # Its rows need the unconditional sample (guidance > 1); None: read from `cond.guidance_scale`.
    cfg: bool | None = None

    def __post_init__(self) -> None:
        if self.cfg is None:
            self.cfg = bool((self.cond.guidance_scale > 1).any())

    @property
    def rows(self) -> int:
        return self.cond.batch_size

    @property
    def subjects(self) -> int:
        return self.cond.image_tokens.shape[1]


@dataclass
class Finished:
    """A request whose loop ended: x̂₀ [rows, C, h, w] to decode and its final masks [rows, S, h, w]."""

    key: Hashable
    latents: torch.Tensor
    masks: torch.Tensor


@dataclass
class _Slot:
    request: RowRequest
    start: int
    step: int = 0

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.request.rows)

    def updating(self) -> bool:
        return self.step < self.request.mask_reused_step or self.step == 0


class RunningBatch:
    """The running batch of one family of prepared buckets (same size, subjects, settings)."""

    def __init__(self, graphs: GraphLoop, buckets: Sequence[Bucket], settings: GraphSettings):
        buckets = sorted(buckets, key=lambda bucket: bucket.batch)
        if not buckets or len({(b.height, b.width, b.subjects) for b in buckets}) != 1:
            raise ValueError("a running batch needs buckets of one size and subject count")
        for bucket in buckets:
            if (bucket, settings) not in graphs.states:
                raise ValueError(f"{bucket} with {settings} was not prepared: call graphs.prepare first")
        self.graphs, self.buckets, self.settings = graphs, buckets, settings
        # (bucket, kind, guidance rows, unconditional rows) -> step; every row is the bucket's batch.
        self.steps = {}
        for key, step in graphs.steps.items():
            bucket = Bucket(key.batch, key.height, key.width, key.subjects)
            if bucket in buckets and key.settings == settings:
                uncond = bucket.batch if key.uncond_rows is None else key.uncond_rows
                self.steps[bucket, StepKind(key.kind), key.guidance_rows or bucket.batch, uncond] = step
        # What the planner may ask of this family: its row counts and, per bucket, the guidance
        # prefixes its MASK_UPDATE steps cover and the unconditional prefixes of its generation pass.
        whole = [(bucket, bucket.batch) for bucket in buckets]
        guidance = [
            sorted({g for b, kind, g, u in self.steps if (b, kind, u) == (bucket, UPDATE, n)})
            for bucket, n in whole
        ]
        uncond = [
            sorted({u for b, kind, g, u in self.steps if (b, kind, g) == (bucket, REUSE, n)})
            for bucket, n in whole
        ]
        partial = any(len(prefixes) > 1 for prefixes in uncond)
        self.shape = FamilyShape(
            tuple(n for _, n in whole),
            tuple(tuple(prefixes) for prefixes in guidance),
            tuple(tuple(prefixes) for prefixes in uncond) if partial else None,
        )
        self.bucket = buckets[0]
        self.guidance: int | None = None  # the next step's guidance prefix (None: masks reused)
        self.uncond: int | None = None  # the next step's unconditional prefix (None: every row)
        self.slots: list[_Slot] = []
        self._park(self.state, 0)

    @property
    def state(self) -> LoopState:
        return self.graphs.states[self.bucket, self.settings]

    @property
    def subjects(self) -> int:
        return self.bucket.subjects

    @property
    def capacity(self) -> int:
        return self.buckets[-1].batch

    @property
    def used(self) -> int:
        return sum(slot.request.rows for slot in self.slots)

    @property
    def free_rows(self) -> int:
        return self.capacity - self.used

    @property
    def active(self) -> list[Hashable]:
        return [slot.request.key for slot in self.slots]

    def rows(self) -> list[tuple[Hashable, int, int, bool, bool]]:
        """(key, rows, steps left, updating in the next step, needs CFG) of every request, in row order."""
        return [
            (
                slot.request.key,
                slot.request.rows,
                slot.request.num_steps - slot.step,
                slot.updating(),
                slot.request.cfg,
            )
            for slot in self.slots
        ]

    # ---- applying a layout (between steps) ------------------------------------------------------

    @torch.no_grad()
    def apply(self, plan: FamilyLayout, joining: Mapping[Hashable, RowRequest] | None = None) -> None:
        """Lay the rows out as `plan` says: requests it leaves out are dropped, the others move to
        their place in its bucket, `joining` requests are loaded at theirs."""
        joining = dict(joining or {})
        current = {slot.request.key: slot for slot in self.slots}
        target = next((b for b in self.buckets if b.batch == plan.bucket), None)
        if target is None or plan.used > target.batch:
            raise ValueError(f"the plan's bucket of {plan.bucket} rows is not one of this family's")
        updating_end = cfg_end = 0
        for placement in plan.rows:
            slot = current.get(placement.key)
            request = slot.request if slot is not None else joining.get(placement.key)
            if request is None:
                raise ValueError(f"the plan places {placement.key!r}: neither running nor joining")
            if request.rows != placement.rows:
                raise ValueError(
                    f"the plan gives {placement.key!r} {placement.rows} rows, not {request.rows}"
                )
            if request.subjects > self.subjects:
                raise ValueError(f"{request.subjects} subjects exceed the bucket's {self.subjects} slots")
            if slot is None or slot.updating():
                updating_end = max(updating_end, placement.start + placement.rows)
            if request.cfg:
                cfg_end = max(cfg_end, placement.start + placement.rows)
        if set(joining) - set(plan.keys):
            raise ValueError("a joining request has no place in the plan")
        if updating_end > (plan.guidance or 0):
            raise ValueError("the plan's guidance prefix leaves out rows that update their masks")
        uncond = target.batch if plan.uncond is None else plan.uncond
        if cfg_end > uncond:
            raise ValueError("the plan's unconditional prefix leaves out rows with CFG")
        if (target, REUSE, target.batch, uncond) not in self.steps:
            raise ValueError(f"no step of {target} runs the unconditional half on {uncond} rows")
        moves: list[tuple[int, int]] = []
        slots = []
        for placement in plan.rows:
            slot = current.get(placement.key)
            if slot is None:
                slot = _Slot(joining[placement.key], placement.start)
            else:
                moves += [(slot.start + i, placement.start + i) for i in range(placement.rows)]
                slot.start = placement.start
            slots.append(slot)
        moves = [(src, dst) for src, dst in moves if src != dst or target != self.bucket]
        destination = self.graphs.states[target, self.settings]
        if moves:
            destination.copy_rows(self.state, [src for src, _ in moves], [dst for _, dst in moves])
        self.slots, self.bucket, self.guidance, self.uncond = slots, target, plan.guidance, plan.uncond
        self._park(destination, plan.used)
        for slot in slots:
            if slot.request.key in joining:
                request = slot.request
                rows = destination.load_rows(
                    self.graphs.pipeline.unet,
                    request.cond,
                    request.latents,
                    request.mask_reused_step,
                    slot.start,
                    request.key_values,
                )
                destination.schedule.load(
                    request.num_steps, rows, timesteps=request.timesteps, eta=request.eta
                )

    def layout(self, joining: Sequence[RowRequest] = (), leaving: Sequence[Hashable] = ()) -> FamilyLayout:
        """The planner's layout of the rows that stay plus `joining` (callers without a planner)."""
        rows = [
            (key, count, updating, cfg) for key, count, _, updating, cfg in self.rows() if key not in leaving
        ]
        return layout(
            self.shape, rows + [(request.key, request.rows, True, request.cfg) for request in joining]
        )

    @staticmethod
    def _park(state: LoopState, start: int) -> None:
        """Rows from `start` on step inside the graph too: zero latents at step 0 keep them finite
        (slices, so no host-to-device copy at a step boundary)."""
        if start < state.rows:
            state.latents[start:].zero_()
            state.step[start:].zero_()

    # ---- without a planner ------------------------------------------------------------------------

    def join(self, request: RowRequest) -> bool:
        """Load `request` into rows at step 0; False when it does not fit now."""
        if request.subjects > self.subjects:
            raise ValueError(f"{request.subjects} subjects exceed the bucket's {self.subjects} slots")
        if request.rows > self.free_rows:
            return False
        self.apply(self.layout([request]), {request.key: request})
        return True

    def cancel(self, key: Hashable) -> bool:
        """Drop a request's rows now (between steps); False when it is not in the batch."""
        if self._find(key) is None:
            return False
        self.apply(self.layout(leaving=[key]))
        return True

    def _find(self, key: Hashable) -> _Slot | None:
        return next((slot for slot in self.slots if slot.request.key == key), None)

    def progress(self, key: Hashable) -> tuple[int, int] | None:
        """(steps done, steps) of a request in the batch."""
        slot = self._find(key)
        return None if slot is None else (slot.step, slot.request.num_steps)

    def snapshot(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A request's current x̂₀ [rows, C, h, w] and masks [rows, S, h, w] of its own S subjects
        (copies; previews)."""
        slot = self._find(key)
        if slot is None:
            return None
        return self.state.x0[slot.rows].clone(), self.state.masks[slot.rows, : slot.request.subjects].clone()

    # ---- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Run one step for every active row; return the requests whose loop ended (their rows
        leave; the rest are laid out again by the planner's rule, for the next step's phases)."""
        if not self.slots:
            return []
        rows = self.bucket.batch
        uncond = rows if self.uncond is None else self.uncond
        if self.guidance is not None:  # the guidance pass on the layout's prefix
            self.steps[self.bucket, UPDATE, self.guidance, uncond]()
        else:
            self.steps[self.bucket, REUSE, rows, uncond]()
        stats = self.graphs.stats
        stats["graph_replays"] += 1
        # What the step computed, in UNet rows per pass (the planner's layout made it so).
        stats["steps_mask_update" if self.guidance is not None else "steps_mask_reuse"] += 1
        stats["rows_guidance"] += self.guidance or 0
        stats["rows_generation"] += rows + uncond
        finished = []
        state = self.state
        for slot in self.slots:
            slot.step += 1
            if slot.step == slot.request.num_steps:
                latents = state.x0[slot.rows].clone()
                masks = state.masks[slot.rows, : slot.request.subjects].clone()
                finished.append(Finished(slot.request.key, latents, masks))
        self.apply(self.layout(leaving=[done.key for done in finished]))
        return finished
