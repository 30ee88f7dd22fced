"""Step-level batching: requests join and leave one running batch at step boundaries.

A `RunningBatch` serves one family of prepared buckets of a `GraphLoop`: same size, subject slots
and graph settings, several row counts (e.g. 1, 2, 4, 8). Its active rows always fill rows
[0, used) of the smallest bucket that holds them, and each step replays that bucket's captured
step, so a lone request pays for one row, not for the largest batch. Between two steps:

* finished rows leave (their x̂₀ and final masks are handed back) and cancelled rows are dropped;
* the remaining rows are compacted, and moved to a smaller bucket's state when they fit one
  (`LoopState.copy_rows`: step index, sampler state, masks, schedule rows, conditioning, image K/V);
* waiting requests join at row `used` (moving everyone to a larger bucket first when needed):
  `LoopState.load_rows` writes a request's conditioning, noise and image K/V at step 0, and
  `RowSchedule.load` gives those rows the request's own schedule.

Each row carries its own step index, step count, guidance scale, mask scope and mask-reuse step,
so requests with different step counts and mask-reuse steps share one UNet batch; what changes the
captured operations (scheduler family, mask mode, overlap, size, subject slots) selects the family.
Rows in their mask-update phase come first. A step runs a MASK_UPDATE graph while any active row
is in that phase, the MASK_REUSE graph otherwise; when the graphs were prepared with
`partial_guidance`, the guidance (text-only) pass covers only the smallest captured prefix (1, 2,
4 ... rows) holding the updating rows, else every row (rows past their phase keep their masks
either way: the step updates a row's mask only while it is in that phase). Rows past `used` are
parked at step 0 with zero latents, so their (discarded) computation stays finite. Rows do not
interact: a request's result does not depend on its companions beyond floating-point reduction
order.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from engines.compiled import GraphLoop
from engines.static_loop import Bucket, GraphSettings
from realcustom.step import Conditioning, ImageKeyValues, LoopState, StepKind


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
        # (bucket, kind, guidance rows) -> step; MASK_UPDATE with every row is (bucket, kind, batch).
        self.steps = {}
        for key, step in graphs.steps.items():
            bucket = Bucket(key.batch, key.height, key.width, key.subjects)
            if bucket in buckets and key.settings == settings:
                self.steps[bucket, StepKind(key.kind), key.guidance_rows or bucket.batch] = step
        # Per bucket, the guidance rows its MASK_UPDATE steps cover, smallest first.
        self.guidance_rows = {
            bucket: sorted(
                rows for b, kind, rows in self.steps if b == bucket and kind is StepKind.MASK_UPDATE
            )
            for bucket in buckets
        }
        self.bucket = buckets[0]
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

    # ---- membership (between steps) -------------------------------------------------------------

    @torch.no_grad()
    def join(self, request: RowRequest) -> bool:
        """Load `request` into rows at step 0; False when it does not fit now."""
        if request.subjects > self.subjects:
            raise ValueError(f"{request.subjects} subjects exceed the bucket's {self.subjects} slots")
        if request.rows > self.free_rows:
            return False
        start = self._settle(request)
        state = self.state
        rows = state.load_rows(
            self.graphs.pipeline.unet,
            request.cond,
            request.latents,
            request.mask_reused_step,
            start,
            request.key_values,
        )
        state.schedule.load(request.num_steps, rows)
        return True

    @torch.no_grad()
    def cancel(self, key: Hashable) -> bool:
        """Drop a request's rows now (between steps); False when it is not in the batch."""
        slot = self._find(key)
        if slot is None:
            return False
        self.slots.remove(slot)
        self._settle()
        return True

    def _find(self, key: Hashable) -> _Slot | None:
        return next((slot for slot in self.slots if slot.request.key == key), None)

    def progress(self, key: Hashable) -> tuple[int, int] | None:
        """(steps done, steps) of a request in the batch."""
        slot = self._find(key)
        return None if slot is None else (slot.step, slot.request.num_steps)

    def snapshot(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A request's current x̂₀ [rows, C, h, w] and masks [rows, S, h, w] (copies; previews)."""
        slot = self._find(key)
        if slot is None:
            return None
        return self.state.x0[slot.rows].clone(), self.state.masks[slot.rows, : slot.request.subjects].clone()

    def _settle(self, joining: RowRequest | None = None) -> int:
        """Lay the active rows (and `joining`'s) out in rows [0, used) of the smallest bucket that
        holds them: rows in their mask-update phase first (the guidance pass covers a prefix), then
        in arrival order. Moves rows (mid-loop) only where their place changes; returns where
        `joining` goes (its rows are the caller's to load)."""
        new = None if joining is None else _Slot(joining, -1)
        slots = sorted(self.slots + ([new] if new else []), key=lambda slot: not slot.updating())
        used = sum(slot.request.rows for slot in slots)
        target = next(bucket for bucket in self.buckets if bucket.batch >= used)
        moves: list[tuple[int, int]] = []
        start = 0
        for slot in slots:
            if slot is not new:
                moves += [(slot.start + i, start + i) for i in range(slot.request.rows)]
            slot.start = start
            start += slot.request.rows
        moves = [(src, dst) for src, dst in moves if src != dst or target != self.bucket]
        destination = self.graphs.states[target, self.settings]
        if moves:
            destination.copy_rows(self.state, [src for src, _ in moves], [dst for _, dst in moves])
        self.slots, self.bucket = slots, target
        self._park(destination, used)
        return -1 if new is None else new.start

    @staticmethod
    def _park(state: LoopState, start: int) -> None:
        """Rows from `start` on step inside the graph too: zero latents at step 0 keep them finite
        (slices, so no host-to-device copy at a step boundary)."""
        if start < state.rows:
            state.latents[start:].zero_()
            state.step[start:].zero_()

    # ---- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Run one step for every active row; return the requests whose loop ended."""
        if not self.slots:
            return []
        updating = sum(slot.request.rows for slot in self.slots if slot.updating())
        if updating:  # the guidance pass on the smallest captured prefix holding those rows
            rows = next(rows for rows in self.guidance_rows[self.bucket] if rows >= updating)
            self.steps[self.bucket, StepKind.MASK_UPDATE, rows]()
        else:
            self.steps[self.bucket, StepKind.MASK_REUSE, self.bucket.batch]()
        self.graphs.stats["graph_replays"] += 1
        finished = []
        state = self.state
        for slot in list(self.slots):
            slot.step += 1
            if slot.step == slot.request.num_steps:
                latents = state.x0[slot.rows].clone()
                masks = state.masks[slot.rows, : slot.request.subjects].clone()
                finished.append(Finished(slot.request.key, latents, masks))
                self.slots.remove(slot)
        self._settle()
        return finished
